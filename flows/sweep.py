"""The `sweep` flow: an Optuna hyperparameter search, each trial a Prefect task, resumable.

`python -m flows.sweep [--params PATH] [--promote-best]`, or the deployment `sweep/sweep` of prefect.yaml
(`prefect deployment run sweep/sweep -p params=... [-p promote_best=true]`; docs/operations.md).

Contract of `sweep(params="params.yaml", promote_best=False) -> dict` (tasks/sweep.py holds the logic):
- the params file and the whole search space are checked first (`tasks.sweep.check_space`): an
  invalid space fails naming the key, before any data is read or any trial runs;
- ingest and preprocess run as in the finetune flow (skipped when dvc.lock matches); nothing
  else of the main project is written: trials train and evaluate on the validation split in
  `sweeps/<study>/trial-<n>/`;
- the study lives in `sweep.storage` (default `sweeps/optuna.db`); trials run `sweep.concurrency`
  at a time until `sweep.n_trials` are COMPLETE or PRUNED. Rerunning the same command after a
  kill resumes: finished trials are kept, the killed ones are marked FAIL and asked again;
- MLflow: one parent run per study, a nested run per trial, the study summary and plots as
  artifacts of the parent; `sweeps/<study>/best-params.yaml` is the best trial's params file;
- `--promote-best`: the best values are written into the project's params.yaml (comments kept)
  and the finetune flow runs on it (test split, registry, gate) as usual.
Returns the study summary (`tasks.sweep_tracking.summary`). A failing trial fails the flow after
the trials running beside it finish (a user error repeats; rerun after fixing it: finished
trials are kept).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from tasks import cli

cli.apply_env_defaults()  # before prefect/transformers read the environment

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.futures import as_completed  # noqa: E402
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner  # noqa: E402

from flows import runtime, stages  # noqa: E402
from tasks import sweep as sweeps  # noqa: E402
from tasks import runstate, sweep_tracking  # noqa: E402
from tasks.config import Params, load_params  # noqa: E402


@task(name="trial", task_run_name="trial {number}", cache_policy=NO_CACHE, retries=0)
def trial(params: Params, parent: str, number: int, trial_id: int) -> dict:
    """Train + evaluate one trial on the validation split in its own folder; its nested MLflow run,
    tagged with the project's state (code, params.yaml, dvc.lock) recorded as a git ref. Takes the
    trial's storage id, not the Trial object, so it runs in a worker process as well as in a thread."""
    optuna_trial = sweeps.reopen_trial(params, trial_id)
    values = dict(optuna_trial.params)
    state = runstate.record(params.root, f"{sweeps.study_name(params)}-trial-{number}")
    run_id = sweep_tracking.start_trial(params, parent, number, values, state)
    try:
        result = sweeps.run_trial(params, optuna_trial)
    except BaseException:
        sweep_tracking.end_trial(params, run_id, "FAIL", "FAILED")
        raise
    sweep_tracking.log_trial(params, run_id, result)
    shown = "pruned" if result.value is None else f"{result.value:.4f}"
    get_run_logger().info("trial %d: %s = %s (%s) in %.1f s", number, params.sweep.objective.metric, shown, values,
                          result.seconds["total"])
    return asdict(result)


def _runner(cfg: Params):
    """One trial at a time runs in this process; several run in worker processes: model loading
    and seeding in transformers are process-global, so trials in threads would collide. Chosen
    here, not by the caller, so a deployment run and `python -m flows.sweep` behave alike."""
    n = cfg.sweep.concurrency
    return ThreadPoolTaskRunner(max_workers=1) if n == 1 else ProcessPoolTaskRunner(max_workers=n)


def _drive(cfg: Params, study, parent: str, runner) -> None:
    """Keep up to `concurrency` trials running until `n_trials` have finished; tell each result."""
    from optuna.trial import TrialState

    logger = get_run_logger()
    running: dict = {}  # future -> optuna trial
    failure: BaseException | None = None
    while True:
        while failure is None and len(running) < cfg.sweep.concurrency and \
                sweeps.finished(study) + len(running) < cfg.sweep.n_trials:
            t = sweeps.ask(study, cfg)
            running[runner.submit(trial, {"params": cfg, "parent": parent, "number": t.number,
                                          "trial_id": t._trial_id})] = t  # the storage's id of the trial
        if not running:
            break
        future = next(as_completed(list(running)))
        t = running.pop(future)
        try:
            result = future.result()
        except BaseException as err:  # noqa: BLE001  (told FAIL, then re-raised below)
            study.tell(t, state=TrialState.FAIL)
            logger.error("trial %d failed: %s", t.number, err)
            failure = failure or err
            continue
        if result["state"] == "PRUNED":
            study.tell(t, state=TrialState.PRUNED)  # its value: the last reported validation loss
        else:
            study.tell(t, result["value"])
    if failure is not None:
        raise failure


@flow(name="sweep", flow_run_name="sweep · {params}", log_prints=False)
def sweep(params: str = "params.yaml", promote_best: bool = False) -> dict:
    cfg = stages.load_config(params)
    sweeps.check_space(cfg)  # before any data is read or any trial runs
    study = sweeps.open_study(cfg)
    lost = sweeps.recover(study)
    parent = sweep_tracking.parent_run(cfg, study)
    if lost:
        get_run_logger().warning("trials %s were interrupted (their process is gone): marked FAIL, asked again", lost)
        sweep_tracking.mark_interrupted(cfg, parent, lost)
    try:
        stages.ingest(cfg)
        stages.DVC_TASKS["preprocess"](cfg)
        with _runner(cfg) as runner:
            _drive(cfg, study, parent, runner)
        info = sweep_tracking.log_study(cfg, parent, study)
        best = sweeps.write_best(cfg, study)
    except BaseException:
        sweep_tracking.log_study(cfg, parent, study)
        stages.finish_tracking(cfg, parent, "FAILED")
        raise
    stages.finish_tracking(cfg, parent, "FINISHED")
    info["best_params_file"] = str(best)
    create_markdown_artifact(key="sweep-summary", markdown=_markdown(info), description=f"sweep {study.study_name}")
    if promote_best:
        from flows.finetune import finetune

        sweeps.apply_best(cfg, sweeps.best_values(study))
        info["promoted"] = finetune(params=params)
    return info


def _markdown(info: dict) -> str:
    lines = [f"# Sweep `{info['study']}`", "", f"{info['direction']} `{info['metric']}` on the validation split", "",
             f"trials: {info['states']}"]
    if "best_value" in info:
        lines += ["", f"best trial {info['best_trial']}: {info['best_value']:.4f} with `{info['best_params']}`"]
    if "default_value" in info:
        lines += [f"default params (trial {info['default_trial']}): {info['default_value']:.4f}"]
    return "\n".join(lines)


@cli.main_guard
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.sweep", description=(
        "Hyperparameter search (params `sweep:`): an Optuna study, each trial trains and evaluates on the "
        "validation split in sweeps/<study>/trial-<n>/. Rerun the same command to resume a killed sweep."))
    parser.add_argument("--params", default="params.yaml", help="params file; its folder is the project root")
    parser.add_argument("--promote-best", action="store_true",
                        help="write the best values into params.yaml and run the finetune flow with them")
    args = parser.parse_args(argv)
    cfg = load_params(args.params)
    sweeps.check_space(cfg)  # a bad space fails here, before a Prefect server starts
    info = runtime.run_flow(sweep, {"params": args.params, "promote_best": args.promote_best})
    print(json.dumps({k: v for k, v in info.items() if k != "promoted"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
