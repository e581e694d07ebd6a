"""The `retrain` flow: retrain only when the data source changed since the champion was trained.

`python -m flows.retrain [--params PATH]`            run once now
`python -m flows.retrain --serve [--cron EXPR]`      serve it (cron + data-change trigger), one process
`python -m flows.retrain --emit-event [--params P]`  tell Prefect new data landed (starts retrain
                                                     through the deployment's event trigger)

Contract of `retrain(params="params.yaml") -> dict`:
- loads the params (first task), fetches the source with `ingest` (DVC md5 of the raw data);
- when that md5 equals the `data.md5` tag of the version holding the `champion` alias, records a
  skipped run with the reason (an MLflow run tagged `peftflow.skipped=true` and the Prefect
  markdown artifact `retrain-decision`) and returns {"retrained": False, "reason": ...};
- otherwise runs the `finetune` flow as a subflow (which registers and gates) and returns
  {"retrained": True, "reason": ..., **finetune summary}.
Needs a real Prefect server for schedules and triggers (`prefect server start`; see
docs/operations.md "Scheduling"); Prefect's temporary local server runs neither.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasks import cli

cli.apply_env_defaults()  # before prefect/transformers read the environment

from prefect import flow  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from flows import runtime, stages, summary  # noqa: E402
from flows.finetune import finetune  # noqa: E402
from tasks.errors import ConfigError  # noqa: E402

DATA_CHANGED = "peftflow.data.changed"
DEFAULT_CRON = "0 3 * * *"


@flow(name="retrain", flow_run_name="retrain · {params}", log_prints=True)
def retrain(params: str = "params.yaml") -> dict:
    cfg = stages.load_config(params)
    data = stages.ingest(cfg)
    champion = stages.champion(cfg)
    if champion is not None and champion.data_md5 == data.md5:
        reason = (f"data md5 {data.md5} equals the data.md5 tag of champion "
                  f"{cfg.register.model_name} v{champion.version}: nothing new to learn")
        stages.record_skip(cfg, data.md5, reason)
        create_markdown_artifact(key="retrain-decision", markdown=f"# retrain skipped\n\n{reason}\n",
                                 description="Why this scheduled retrain did not train")
        print(f"retrain skipped: {reason}")
        return {"retrained": False, "reason": reason}
    reason = ("no champion yet" if champion is None else
              f"data md5 {data.md5} differs from champion v{champion.version}'s {champion.data_md5}")
    create_markdown_artifact(key="retrain-decision", markdown=f"# retrain: training\n\n{reason}\n",
                             description="Why this retrain trains")
    print(f"retraining: {reason}")
    return {"retrained": True, "reason": reason, **finetune(params=params)}


def data_changed_event(params_path: str) -> dict:
    """The event the `retrain` deployment's trigger waits for (resource names the project)."""
    path = Path(params_path).resolve()
    return {"event": DATA_CHANGED,
            "resource": {"prefect.resource.id": f"peftflow.project.{path.parent.name}",
                         "prefect.resource.name": str(path.parent)},
            "payload": {"params": str(path)}}


def emit_data_changed(params_path: str) -> None:
    """Send `peftflow.data.changed` to the Prefect API and wait until it is delivered."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    if emit_event(**data_changed_event(params_path)) is None:
        raise RuntimeError("Prefect did not accept the event (no API); set PREFECT_API_URL to a `prefect server`")
    EventsWorker.drain_all()


def serve(params_path: str, cron: str) -> None:
    """One process that schedules and runs retrain (no work pool, no worker needed)."""
    from prefect.events import DeploymentEventTrigger

    retrain.serve(
        name="retrain-served",
        cron=cron,
        parameters={"params": params_path},
        triggers=[DeploymentEventTrigger(expect={DATA_CHANGED}, match={"prefect.resource.id": "peftflow.project.*"},
                                         parameters={"params": "{{ event.payload.params }}"})],
    )


@cli.main_guard
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.retrain",
        description="Retrain when the data source changed since the champion model was trained.",
    )
    parser.add_argument("--params", default="params.yaml", help="params file; its folder is the project root")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--serve", action="store_true", help="serve the flow with a cron schedule and the "
                      f"'{DATA_CHANGED}' trigger (needs PREFECT_API_URL of a `prefect server start`)")
    mode.add_argument("--emit-event", action="store_true", help=f"emit '{DATA_CHANGED}' for this project and exit")
    parser.add_argument("--cron", default=DEFAULT_CRON, help=f"schedule for --serve (default '{DEFAULT_CRON}', UTC)")
    runtime.add_verbose_flag(parser)
    args = parser.parse_args(argv)

    if args.serve or args.emit_event:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        url = runtime.shared_api_url()
        if not url:
            raise ConfigError("no Prefect server: start one (`prefect server start`) and set "
                              "PREFECT_API_URL=http://127.0.0.1:4200/api")
        with temporary_settings({PREFECT_API_URL: url}):
            if args.emit_event:
                emit_data_changed(args.params)
                print(f"emitted {DATA_CHANGED} for {Path(args.params).resolve()}")
            else:
                serve(str(Path(args.params).resolve()), args.cron)
        return 0
    print_result(runtime.run_flow(retrain, {"params": args.params}, args.verbose))
    return 0


def print_result(result: dict) -> None:
    if result["retrained"]:
        summary.print_table(summary.RunSummary(**{k: v for k, v in result.items() if k not in ("retrained", "reason")}))
    print(("retrained: " if result["retrained"] else "skipped: ") + result["reason"])


if __name__ == "__main__":
    sys.exit(main())
