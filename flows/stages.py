"""Prefect tasks around the stage modules: the same `tasks.<stage>.run(params)` that DVC runs.

Contract:
- `load_config(path) -> Params`: the first task of every flow. Raises ConfigError for a broken
  params file, and for a project the DVC stages cannot work in (not named params.yaml, no
  dvc.yaml, a dvc.yaml whose stages or code deps are not this process's: `tasks.project.check`),
  before anything else runs.
- `ingest(params) -> IngestResult`: fetch, `dvc add`, push. Retried with backoff (I/O).
- `dvc_stage(stage, params) -> StageOutcome` for preprocess, train, evaluate, merge: skipped when
  `dvc status <stage>` is clean (content hashes of deps, params and outs in dvc.lock, so changed
  data under the same path reruns); else run in-process, then recorded in dvc.lock with
  `dvc commit`, so after a flow `dvc status` is clean and `dvc repro` redoes nothing.
- `start_tracking(params) -> run_id`: checks the MLflow store answers (before any training) and
  creates the flow's MLflow run (tagged with the Prefect flow run id). Runs of killed processes
  are marked KILLED in MLflow and their Prefect flow runs CRASHED. Retried (I/O).
- `register(params, run_id) -> RegisterResult`: logs the pipeline into that run, registers the
  adapter (no new version when this params + data + adapter is already registered), gate.
  Retried (I/O); `finish_tracking(params, run_id, status)` closes the run.
- `champion(params) -> Champion | None`, `record_skip(params, data_md5, reason) -> run_id`: for
  retrain (the champion's `data.md5` tag; an MLflow run tagged `peftflow.skipped=true`).

Every task that touches the project holds `runtime.project_lock(root)`, so two flows on one
checkout take turns per stage. User errors (PeftflowError) are never retried: the same input
fails the same way. One exception, by design (`RETRIED_USER_ERRORS`): TrackingError, an MLflow
store that cannot be reached or refused a request, is often transient (a server restarting, a lost
connection), so the tasks that talk to MLflow retry it with backoff before reporting it. A retried
`train` resumes from its newest verified checkpoint (tasks/train.py).
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows import runtime
from tasks import layout, model_checks, project, promote, tracking, versioning
from tasks.config import Params, load_params
from tasks.errors import ConfigError, PeftflowError

DVC_STAGES = ("preprocess", "train", "evaluate", "merge")
HOUR = 3600


@dataclass(frozen=True)
class StageOutcome:
    """What one DVC stage did in this flow run, and its reports/<stage>.json."""

    stage: str
    skipped: bool  # True: dvc.lock already matched its deps, params and outs
    seconds: float
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Champion:
    version: str
    data_md5: str | None  # the `data.md5` tag register put on the version


# User errors that are retried all the same: the store may answer again (see the module docstring).
RETRIED_USER_ERRORS: tuple[type[PeftflowError], ...] = (tracking.TrackingError,)


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry crashes, I/O errors and RETRIED_USER_ERRORS; any other PeftflowError (bad input)
    would fail again the same way."""
    try:
        state.result()
    except PeftflowError as err:
        return isinstance(err, RETRIED_USER_ERRORS)
    except Exception:  # noqa: BLE001 - any other failure is worth another attempt
        return True
    return True


def read_report(root: Path, stage: str) -> dict[str, Any]:
    path = Path(root) / layout.report(stage)
    return json.loads(path.read_text()) if path.is_file() else {}


@task(name="load-config", task_run_name="load-config · {path}", cache_policy=NO_CACHE)
def load_config(path: str) -> Params:
    params = load_params(path)
    if Path(path).name != "params.yaml":
        raise ConfigError(f"{path}: the params file must be named params.yaml (dvc.yaml's params refer to "
                          f"<project>/params.yaml); rename it, or start a project from it with "
                          f"`python -m tasks.project new <folder> --from {path}`")
    # The DVC stages must run this process's code, the one the project's dvc.yaml names (tasks/project.py).
    project.check(params.root)
    model_checks.check(params)  # settings that do not fit the base model fail before ingest, with the value to set
    get_run_logger().info("params %s (sha256 %s…), base model %s", path, params.sha256[:12], params.model.base)
    return params


@task(name="ingest", task_run_name="ingest · {params.ingest.source}", cache_policy=NO_CACHE,
      retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_jitter_factor=0.5,
      retry_condition_fn=_retry_unless_user_error, timeout_seconds=2 * HOUR)
def ingest(params: Params):
    from tasks import ingest as stage

    with runtime.project_lock(params.root):
        result = stage.run(params)
    get_run_logger().info("ingest: %d rows, md5 %s (%s)", result.rows, result.md5,
                          "new data" if result.changed else "unchanged")
    return result


def _run_dvc_stage(stage: str, params: Params) -> StageOutcome:
    logger = get_run_logger()
    root = params.root
    with runtime.project_lock(root):
        if versioning.stage_is_current(root, stage):
            logger.info("%s: up to date (dvc.lock matches its deps, params and outs): skipped", stage)
            return StageOutcome(stage, True, 0.0, read_report(root, stage))
        start = time.monotonic()
        result = importlib.import_module(f"tasks.{stage}").run(params)
        versioning.commit(root, [stage])
    seconds = time.monotonic() - start
    logger.info("%s: done in %.1f s: %s", stage, seconds, result)
    return StageOutcome(stage, False, seconds, read_report(root, stage))


def _dvc_task(stage: str, run_name: str, timeout_h: float, retries: int):
    def run_stage(params: Params) -> StageOutcome:
        return _run_dvc_stage(stage, params)

    run_stage.__name__ = run_stage.__qualname__ = stage
    return task(name=stage, task_run_name=run_name, cache_policy=NO_CACHE, tags=["peftflow-dvc"],
                retries=retries, retry_delay_seconds=10, retry_condition_fn=_retry_unless_user_error,
                timeout_seconds=timeout_h * HOUR)(run_stage)


preprocess = _dvc_task("preprocess", "preprocess · {params.preprocess.format}", timeout_h=2, retries=0)
# A retry resumes from the newest verified checkpoint of the same fingerprint.
train = _dvc_task("train", "train · {params.train.peft.method} · {params.train.length}", timeout_h=48,
                  retries=1)
evaluate = _dvc_task("evaluate", "evaluate · {params.model.base}", timeout_h=6, retries=0)
merge = _dvc_task("merge", "merge · dtype {params.merge.dtype}", timeout_h=6, retries=0)
DVC_TASKS = {"preprocess": preprocess, "train": train, "evaluate": evaluate, "merge": merge}


def _flow_run_tags() -> dict[str, str]:
    from prefect.runtime import flow_run

    return {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name),
            "prefect.flow_name": str(flow_run.flow_name)} if flow_run.id else {}


_MLFLOW_IO = dict(cache_policy=NO_CACHE, retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5),
                  retry_jitter_factor=0.5, retry_condition_fn=_retry_unless_user_error, timeout_seconds=HOUR)


def _crash_killed_flow_runs(params: Params, mlflow_run_ids: list[str]) -> None:
    """Prefect leaves the flow run of a killed process RUNNING (nothing beats a heartbeat for it):
    when its MLflow run was just found dead and marked KILLED, mark its Prefect flow run CRASHED."""
    if not mlflow_run_ids:
        return
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    c = tracking.client(params)
    with get_client(sync_client=True) as prefect:
        for run_id in mlflow_run_ids:
            flow_run_id = c.get_run(run_id).data.tags.get("prefect.flow_run_id")
            if not flow_run_id:
                continue
            try:
                state = prefect.read_flow_run(flow_run_id).state
            except Exception:  # noqa: BLE001 - another server's or a deleted run: nothing to mark here
                continue
            if state is not None and not state.is_final():
                prefect.set_flow_run_state(flow_run_id, Crashed(message=f"its process was gone (MLflow run {run_id} "
                                                                        f"marked KILLED) when a later run started"),
                                           force=True)
                get_run_logger().warning("flow run %s was killed earlier: marked CRASHED", flow_run_id)


@task(name="start-tracking", task_run_name="start-tracking · {params.register.experiment}", **_MLFLOW_IO)
def start_tracking(params: Params) -> str:
    uri = tracking.check_reachable(params)
    _crash_killed_flow_runs(params, tracking.mark_stale_runs(params))
    tags = _flow_run_tags()
    run_id = tracking.start_run(params, run_name=tags.get("prefect.flow_run_name"), tags=tags)
    get_run_logger().info("MLflow run %s in %s (experiment %s)", run_id, uri, params.register.experiment)
    return run_id


@task(name="register", task_run_name="register · {params.register.model_name}", **_MLFLOW_IO)
def register(params: Params, run_id: str):
    from tasks import register as stage

    with runtime.project_lock(params.root):
        result = stage.run(params, run_id=run_id)
    get_run_logger().info("register: %s v%s (%s); gate: %s", result.model_name, result.version,
                          "new" if result.created else "already registered", result.reason)
    return result


@task(name="finish-tracking", task_run_name="finish-tracking · {status}", **_MLFLOW_IO)
def finish_tracking(params: Params, run_id: str, status: str = "FINISHED") -> None:
    tracking.finish_run(params, run_id, status)


def run_url(params: Params, run_id: str) -> str:
    """Link to the run in the MLflow UI (`make ui` serves the local store on 127.0.0.1:5000)."""
    uri = tracking.tracking_uri(params)
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{tracking.experiment_id(params)}/runs/{run_id}"


def registration_fields(params: Params, reg) -> dict[str, Any]:
    """RunSummary fields from a RegisterResult: version, the aliases it holds, gate, run link."""
    mv = tracking.client(params).get_model_version(reg.model_name, reg.version)
    aliases = sorted(getattr(mv, "aliases", []) or [])
    return {"model_name": reg.model_name, "version": reg.version, "alias": ", ".join(aliases) or None,
            "gate": reg.reason, "run_url": run_url(params, reg.run_id), "registered_new": reg.created}


@task(name="champion", task_run_name="champion · {params.register.model_name}", **_MLFLOW_IO)
def champion(params: Params) -> Champion | None:
    name = params.register.model_name
    c = tracking.client(params)
    if not c.search_registered_models(filter_string=f"name = '{name}'"):
        return None
    version = promote.alias_version(c, name, promote.CHAMPION)
    if version is None:
        return None
    return Champion(version, c.get_model_version(name, version).tags.get("data.md5"))


@task(name="record-skip", task_run_name="record-skip", **_MLFLOW_IO)
def record_skip(params: Params, data_md5: str, reason: str) -> str:
    """An MLflow run (FINISHED) that says this retrain did not train, and why."""
    run_id = tracking.start_run(params, run_name="retrain-skipped",
                                tags={"peftflow.skipped": "true", "peftflow.skip_reason": reason[:5000],
                                      "data.md5": data_md5, **_flow_run_tags()})
    tracking.finish_run(params, run_id, "FINISHED")
    get_run_logger().info("recorded skipped retrain as MLflow run %s", run_id)
    return run_id
