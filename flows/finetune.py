"""The `finetune` flow: ingest -> preprocess -> train -> evaluate -> merge -> register (+ gate).

`python -m flows.finetune [--params PATH]` runs it in this process and ends with a summary table.

Contract of `finetune(params="params.yaml") -> dict` (the flow; a deployment calls the same):
- the first task loads and validates the params file; a broken file fails the flow there with
  the config error and nothing else runs;
- each DVC stage is skipped when dvc.lock already matches it, else run and recorded in dvc.lock
  (flows/stages.py), so afterwards `dvc status` is clean and `dvc repro` redoes nothing;
- the flow's MLflow run is created right after (so an unreachable tracking store fails before
  any training) and closed FINISHED or FAILED at the end;
- register logs into that MLflow run, registers the adapter (no new version when it is already
  registered) and runs the gate;
- publishes the Prefect artifacts `finetune-summary` (markdown) and `sample-predictions` (table);
- returns the `RunSummary` as a dict (JSON-able, so a deployment's result is readable).
Raises the first failing task's error (PeftflowError subclasses for user errors).

Server: PREFECT_API_URL if set; else a local `prefect server start` on 127.0.0.1:4200 if one
answers (so concurrent runs share it and show in its UI); else Prefect's temporary local server.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from tasks import cli

cli.apply_env_defaults()  # before prefect/transformers read the environment

from prefect import flow  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402

from flows import runtime, stages, summary  # noqa: E402
from tasks import sharing, tracking  # noqa: E402
from tasks.config import Params  # noqa: E402


def build_summary(params: Params, data, outcomes: dict[str, stages.StageOutcome], reg) -> summary.RunSummary:
    evaluation = outcomes["evaluate"].report
    hours = outcomes["train"].report.get("device_hours")
    return summary.RunSummary(
        project=str(params.root),
        data_md5=data.md5,
        data_rows=data.rows,
        stages={k: "skipped (up to date)" if o.skipped else f"ran {o.seconds:.1f} s" for k, o in outcomes.items()},
        base_metrics=dict(evaluation.get("base") or {}),
        adapter_metrics=dict(evaluation.get("adapter") or {}),
        intervals=dict(evaluation.get("intervals") or {}),
        n_rows=int(evaluation.get("n_samples") or 0),
        device_hours=hours,
        cost=params.register.cost(hours),
        **stages.registration_fields(params, reg),
        warnings=sharing.warnings(tracking.client(params).get_model_version(reg.model_name, reg.version).tags),
    )


def publish(params: Params, s: summary.RunSummary) -> None:
    """The run's Prefect artifacts: the summary and a sample of predictions."""
    create_markdown_artifact(key="finetune-summary", markdown=summary.markdown(s),
                             description=f"{s.model_name} v{s.version}: metrics, lift, alias, MLflow link")
    rows = summary.predictions_table(params.root, limit=params.evaluate.sample_predictions)
    if rows:
        create_table_artifact(key="sample-predictions", table=rows,
                              description="Sample test predictions of base and adapter (reports/predictions.csv)")


# log_prints off, also when retrain calls this as a subflow: Prefect's print-to-log hook bypasses
# libraries that capture stdout by swapping sys.stdout (dill, under datasets' fingerprinting,
# reads bytecode that way) and floods the log with disassembly. Stage code logs; it never prints.
@flow(name="finetune", flow_run_name="finetune · {params}", log_prints=False)
def finetune(params: str = "params.yaml") -> dict:
    cfg = stages.load_config(params)
    run_id = stages.start_tracking(cfg)  # fails fast, before training, when MLflow is down
    try:
        data = stages.ingest(cfg)
        outcomes = {name: stages.DVC_TASKS[name](cfg) for name in stages.DVC_STAGES}
        reg = stages.register(cfg, run_id)
    except BaseException:
        stages.finish_tracking(cfg, run_id, "FAILED")
        raise
    stages.finish_tracking(cfg, run_id, "FINISHED")
    result = build_summary(cfg, data, outcomes, reg)
    publish(cfg, result)
    return asdict(result)


@cli.main_guard
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.finetune",
        description="Run the whole pipeline as a Prefect flow: ingest, preprocess, train, evaluate, merge, "
                    "register + gate. Stages already up to date in dvc.lock are skipped.",
    )
    parser.add_argument("--params", default="params.yaml", help="params file; its folder is the project root")
    runtime.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    summary.print_table(summary.RunSummary(**runtime.run_flow(finetune, {"params": args.params}, args.verbose)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
