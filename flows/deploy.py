"""The `deploy` flow: serve the version a registry alias points at, verified, with rollback.

`python -m flows.deploy [--model NAME] [--alias champion] [--target mlflow|vllm] [--params P]`
`python -m flows.deploy --status [--params P]`   print the deployment log

Contract of `deploy(model=None, alias="champion", target="mlflow", params="params.yaml", ...)
-> dict`: loads the params (first task), runs `tasks.deploy.deploy` (one task: resolve, download
hash-checked, fit, smoke check, publish, record; see that module), publishes the markdown artifact
`deployment` (also when the deploy failed), and returns the DeployResult as a dict. A version
already served by the target returns status "unchanged" (so the polling deployment and repeated
webhook deliveries are no-ops); with `missing_ok` (the polling deployment) a model or alias that
does not exist yet returns status "no-alias" instead of failing. A failed deploy raises DeployError after the rollback: the flow
run is Failed with the reason.

Triggers (prefect.yaml): the `deploy` deployment runs on the event `peftflow.model.alias.set`
(emitted by flows/webhook.py when MLflow reports an alias move) and `deploy-poll` runs the same
flow every minute for stores without webhooks.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from tasks import cli

cli.apply_env_defaults()  # before prefect reads the environment

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows import runtime  # noqa: E402
from tasks import deploy as deploying  # noqa: E402
from tasks import serving_target  # noqa: E402
from tasks.config import Params, load_params  # noqa: E402
from tasks.errors import PeftflowError  # noqa: E402


@task(name="load-config", task_run_name="load-config · {path}", cache_policy=NO_CACHE)
def load_config(path: str) -> Params:
    """The params (tracking store, model name, the project's data). Unlike the pipeline flows' load
    (flows/stages.py), no check of dvc.yaml against the code: a deploy runs no DVC stage."""
    params = load_params(path)
    get_run_logger().info("params %s (sha256 %s…)", path, params.sha256[:12])
    return params


@task(name="deploy", task_run_name="deploy · {name}@{alias} → {target.kind}", cache_policy=NO_CACHE)
def deploy_task(params: Params, name: str, alias: str, target: deploying.Target, smoke_rows: int,
                tolerance: float) -> deploying.DeployResult:
    result = deploying.deploy(params, name, alias, target, smoke_rows=smoke_rows, tolerance=tolerance)
    get_run_logger().info("%s@%s v%s → %s: %s (%s)", name, alias, result.version, target.kind, result.status,
                          result.endpoint)
    return result


def _artifact(name: str, alias: str, target: str, body: str) -> None:
    create_markdown_artifact(key="deployment", markdown=f"# {name}@{alias} → {target}\n\n{body}\n",
                             description="A deployment of a registry alias")


@flow(name="deploy", log_prints=True)
def deploy(model: str | None = None, alias: str = "champion", target: str = "mlflow", params: str = "params.yaml",
           front_port: int = 5001, vllm_url: str = "http://127.0.0.1:8000", lora_dir: str | None = None,
           max_lora_rank: int = 16, smoke_rows: int = 5, tolerance: float = 0.02, missing_ok: bool = False) -> dict:
    cfg = load_config(params)
    name = model or cfg.register.model_name
    where = deploying.Target(target, front_port, vllm_url, lora_dir, max_lora_rank)
    try:
        result = deploy_task(cfg, name, alias, where, smoke_rows, tolerance)
    except deploying.NoAlias as err:
        if not missing_ok:
            raise
        get_run_logger().info("nothing to deploy: %s", err)
        return {"model": name, "alias": alias, "target": target, "status": "no-alias", "version": None}
    except PeftflowError as err:
        _artifact(name, alias, target, f"**failed** — {err}")
        raise
    if result.status == "deployed":
        smoke = result.smoke or {}
        _artifact(name, alias, target,
                  f"**v{result.version}** deployed (was v{result.previous or 'none'}) at {result.endpoint} in "
                  f"{result.seconds:.1f} s\n\nsmoke check: {smoke.get('metric')} {smoke.get('reproduced')} on rows "
                  f"{smoke.get('rows')} (registered {smoke.get('recorded')})")
    return asdict(result)


@cli.main_guard
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="registered model (default: register.model_name from params)")
    parser.add_argument("--alias", default="champion", help="alias to deploy (default: champion)")
    parser.add_argument("--target", default="mlflow", choices=deploying.TARGETS)
    parser.add_argument("--params", default="params.yaml", help="params file (tracking store, project)")
    parser.add_argument("--port", type=int, default=5001, help="the mlflow target's stable endpoint port")
    parser.add_argument("--vllm-url", default="http://127.0.0.1:8000", help="running vLLM server (vllm target)")
    parser.add_argument("--lora-dir", help="vLLM's VLLM_LORA_RESOLVER_CACHE_DIR (default: <serving>/lora)")
    parser.add_argument("--max-lora-rank", type=int, default=16, help="the vLLM server's --max-lora-rank")
    parser.add_argument("--status", action="store_true", help="print the deployment log and exit")
    args = parser.parse_args(argv)
    if args.status:
        lines = deploying.status_lines(serving_target.serving_dir(load_params(args.params)))
        print("\n".join(lines) if lines else "no deployments yet")
        return 0
    result = runtime.run_flow(deploy, {"model": args.model, "alias": args.alias, "target": args.target,
                                       "params": args.params, "front_port": args.port, "vllm_url": args.vllm_url,
                                       "lora_dir": args.lora_dir, "max_lora_rank": args.max_lora_rank})
    print(f"{result['model']}@{result['alias']} v{result['version']} → {result['target']}: {result['status']} "
          f"({result['endpoint']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
