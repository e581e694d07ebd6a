"""MLflow side of a sweep: one parent run per study, one nested run per trial, the study's summary.

Contract (runs addressed by id through tasks.tracking's client; the project's tracking store):
- `parent_run(params, study) -> run_id`: the sweep's parent run (tag `peftflow.sweep.study`),
  found again when a killed sweep is resumed (this process adopts it) or created.
- `start_trial(params, parent, trial_number, values) -> run_id`: a nested run
  (`mlflow.parentRunId`) with the sampled values as params.
- `log_trial(params, run_id, result)`: the trial's params.yaml, training curve (its
  reports/train_log.csv, with step numbers), validation metrics, objective, timings; the
  validation loss reported during training (`validation.loss_during_training`, per step);
  status FINISHED (state COMPLETE or PRUNED).
- `end_trial(params, run_id, state, status)`: state tag (`COMPLETE`, `FAIL`) and run status.
- `mark_interrupted(params, parent, numbers)`: the nested runs of trials a killed sweep left
  RUNNING: state FAIL, status KILLED.
- `log_study(params, parent, study) -> dict`: the study summary (JSON), every trial (CSV), the
  plots (optimisation history; parameter importances once two trials are complete) as artifacts.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from tasks import layout, tracking
from tasks.config import Params

TAG_STUDY, TAG_TRIAL, TAG_STATE = "peftflow.sweep.study", "peftflow.sweep.trial", "peftflow.sweep.state"
PARENT = "mlflow.parentRunId"


def parent_run(params: Params, study) -> str:
    """See the module docstring."""
    from tasks import sweep

    c = tracking.client(params)
    tracking.mark_stale_runs(params, c)  # the killed sweep's parent and running trials: KILLED
    found = tracking.find_run(params, TAG_STUDY, study.study_name)
    if found:
        tracking.adopt_run(params, found)
        return found
    run_id = tracking.start_run(params, run_name=f"sweep · {study.study_name}",
                                tags={TAG_STUDY: study.study_name, "peftflow.sweep.storage": _safe_url(
                                    sweep.storage_url(params))})
    space = {k: d.model_dump(mode="json", by_alias=True, exclude_none=True) for k, d in params.sweep.space.items()}
    c.log_param(run_id, "sweep.space", json.dumps(space)[:6000])
    for key in ("n_trials", "concurrency"):
        c.log_param(run_id, f"sweep.{key}", getattr(params.sweep, key))
    c.log_param(run_id, "sweep.objective", f"{params.sweep.objective.direction} {params.sweep.objective.metric}")
    c.log_param(run_id, "sweep.sampler.seed", params.sweep.sampler.seed)
    return run_id


def _safe_url(url: str) -> str:
    """The storage URL without a password (a PostgreSQL URL may carry one)."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def start_trial(params: Params, parent: str, number: int, values: dict[str, Any], state=None) -> str:
    """`state`: the tasks.runstate.RunState recorded for the trial (tags `git.state_ref`, `git.state_commit`)."""
    c = tracking.client(params)
    refs = {"git.state_ref": state.ref, "git.state_commit": state.commit} if state is not None else {}
    run = c.create_run(tracking.experiment_id(params, c), run_name=f"trial {number}",
                       tags={**tracking.process_tags(), PARENT: parent, TAG_TRIAL: str(number),
                             TAG_STATE: "RUNNING", **refs})
    for key, value in values.items():
        c.log_param(run.info.run_id, key, value)
    return run.info.run_id


def log_trial(params: Params, run_id: str, result) -> None:
    from mlflow.entities import Metric

    c = tracking.client(params)
    now = tracking.now_ms()
    folder = Path(result.folder)
    c.log_artifact(run_id, str(folder / "params.yaml"))  # the trial's full params, a valid params file
    curve = [Metric("validation.loss_during_training", v, now, int(step)) for step, v in result.curve.items()]
    if curve:
        c.log_batch(run_id, metrics=curve)
    if result.state == "PRUNED":
        end_trial(params, run_id, "PRUNED", "FINISHED")
        return
    metrics = [Metric(f"train.{col}", v, now, step) for col, points in
               tracking.read_train_log(folder / layout.TRAIN_LOG).items() for step, v in points]
    flat = {"objective": result.value, **{f"validation.{k}": v for k, v in result.metrics.items()},
            **{f"validation.base.{k}": v for k, v in result.base_metrics.items()},
            **{f"seconds.{k}": v for k, v in result.seconds.items()}}
    metrics += [Metric(k, float(v), now, 0) for k, v in flat.items() if isinstance(v, (int, float))]
    for i in range(0, len(metrics), 1000):  # MLflow's batch limit
        c.log_batch(run_id, metrics=metrics[i:i + 1000])
    c.set_tag(run_id, "peftflow.trial_folder", result.folder)
    end_trial(params, run_id, "COMPLETE", "FINISHED")


def end_trial(params: Params, run_id: str, state: str, status: str) -> None:
    c = tracking.client(params)
    c.set_tag(run_id, TAG_STATE, state)
    c.set_terminated(run_id, status=status)


def mark_interrupted(params: Params, parent: str, numbers: list[int]) -> None:
    c = tracking.client(params)
    for number in numbers:
        runs = c.search_runs([tracking.experiment_id(params, c)],
                             filter_string=f"tags.`{PARENT}` = '{parent}' and tags.`{TAG_TRIAL}` = '{number}'")
        for run in runs:
            c.set_tag(run.info.run_id, TAG_STATE, "FAIL")
            c.set_tag(run.info.run_id, "peftflow.killed_reason", "the sweep process was killed during this trial")
            if run.info.status == "RUNNING":
                c.set_terminated(run.info.run_id, status="KILLED")


def summary(params: Params, study) -> dict:
    from collections import Counter

    counts = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    out: dict[str, Any] = {"study": study.study_name, "direction": params.sweep.objective.direction,
                           "metric": params.sweep.objective.metric, "split": "validation", "states": dict(counts)}
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if complete:
        best = study.best_trial
        out.update(best_trial=best.number, best_value=best.value, best_params=best.params)
        default = [t for t in complete if t.user_attrs.get("peftflow.default")]
        if default:
            out.update(default_trial=default[0].number, default_value=default[0].value)
    return out


def log_study(params: Params, parent: str, study) -> dict:
    """See the module docstring."""
    c = tracking.client(params)
    info = summary(params, study)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sweep"
        folder.mkdir()
        (folder / "study.json").write_text(json.dumps(info, indent=2, default=str))
        study.trials_dataframe().to_csv(folder / "trials.csv", index=False)
        skipped = _plots(study, folder)
        if skipped:
            info["plots_skipped"] = skipped
            (folder / "study.json").write_text(json.dumps(info, indent=2, default=str))
        c.log_artifacts(parent, str(folder), artifact_path="sweep")
    if "best_value" in info:
        c.log_metric(parent, "best_objective", float(info["best_value"]))
        c.set_tag(parent, "peftflow.sweep.best_trial", str(info["best_trial"]))
    return info


def _plots(study, folder: Path) -> dict[str, str]:
    """PNG plots; returns {plot: why it was not drawn} for those Optuna cannot draw yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    skipped = {}
    complete = sum(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False))
    plots = {"optimization_history": ovm.plot_optimization_history, "param_importances": ovm.plot_param_importances}
    for name, plot in plots.items():
        if name == "param_importances" and complete < 2:
            skipped[name] = f"needs two complete trials (has {complete})"
            continue
        try:
            ax = plot(study)
        except (ValueError, RuntimeError) as err:  # e.g. importances of a space with one value seen
            skipped[name] = str(err)
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.savefig(folder / f"{name}.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
    return skipped
