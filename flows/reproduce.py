"""The `reproduce` flow: rebuild a registered version from its recorded state and compare.

`python -m flows.reproduce MODEL VERSION|@ALIAS [--params PATH] [--workdir DIR] [--keep]`
(`make reproduce MODEL=... VERSION=...`). The logic is `tasks.reproduce.run` (no Prefect there).

Contract of `reproduce(model, version, params="params.yaml", workdir=None, keep=False) -> dict`:
- `params` names the project (a clone of the version's git repository) whose MLflow store
  (MLFLOW_TRACKING_URI wins), git remote and DVC remotes are used; nothing else of it is read;
- publishes the Prefect markdown artifact `reproduce-<model>-v<version>`: every check, what
  matched and what did not; the version gets tags `peftflow.reproduced_at` and `peftflow.reproduced`;
- returns the report as a dict. A user error (no recorded state, a remote that lacks the data, a
  failed `dvc repro`) fails the flow with a PeftflowError; the CLI prints it on one line (exit 2).
The CLI exits 0 when the version was reproduced, 1 when it was rebuilt but differs.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import asdict
from pathlib import Path

from tasks import cli

cli.apply_env_defaults()  # before prefect/transformers read the environment

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows import runtime  # noqa: E402
from tasks import reproduce as stage  # noqa: E402
from tasks.config import load_params  # noqa: E402


@task(name="rebuild", task_run_name="rebuild · {model} {version}", cache_policy=NO_CACHE)
def rebuild(params: str, model: str, version: str, workdir: str | None, keep: bool) -> stage.ReproReport:
    cfg = load_params(params)
    return stage.run(cfg, model, version, Path(workdir) if workdir else None, keep=keep)


@flow(name="reproduce", flow_run_name="reproduce · {model} {version}", log_prints=False)
def reproduce(model: str, version: str, params: str = "params.yaml", workdir: str | None = None,
              keep: bool = False) -> dict:
    report = rebuild(params, model, version, workdir, keep)
    key = re.sub(r"[^a-z0-9-]+", "-", f"reproduce-{report.model_name}-v{report.version}".lower())
    create_markdown_artifact(key=key, markdown=stage.markdown(report),
                             description=f"{report.model_name} v{report.version}: "
                                         f"{'reproduced' if report.reproduced else 'NOT reproduced'}")
    get_run_logger().info("%s v%s: %s", report.model_name, report.version,
                          "reproduced" if report.reproduced else "NOT reproduced")
    return asdict(report)


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    verdict = "reproduced" if report["reproduced"] else "NOT reproduced"
    table = Table(title=f"{report['model_name']} v{report['version']}: {verdict} ({report['mode']})",
                  caption=f"state {report['state_ref']} · worktree {report['workdir']}")
    for col in ("check", "expected", "rebuilt", "result"):
        table.add_column(col)
    for c in report["checks"]:
        table.add_row(escape(c["name"]), escape(c["expected"]), escape(c["actual"]),
                      "match" if c["ok"] else "MISMATCH" if c["required"] else "differs (informative)")
    Console().print(table)


@cli.main_guard
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.reproduce",
        description="Rebuild a registered model version in a fresh git worktree of its recorded state "
                    "(dvc pull + dvc repro) and compare it with the registry: adapter bytes on CPU, "
                    "metric intervals on GPU.")
    parser.add_argument("model", help="registered model name (register.model_name)")
    parser.add_argument("version", help="version number, or @alias (e.g. @champion)")
    parser.add_argument("--params", default="params.yaml",
                        help="params file of the project (its MLflow store, git and DVC remotes)")
    parser.add_argument("--workdir", default=None, help="folder for the worktree and logs (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the worktree even when it reproduced")
    args = parser.parse_args(argv)
    report = runtime.run_flow(reproduce, {"model": args.model, "version": args.version, "params": args.params,
                                          "workdir": args.workdir, "keep": args.keep})
    print_report(report)
    return 0 if report["reproduced"] else 1


if __name__ == "__main__":
    sys.exit(main())
