"""MLflow run logging: one run per pipeline run, filled from the files the stages wrote.

Contract:
- `tracking_uri(params)`: `MLFLOW_TRACKING_URI` if set, else `sqlite:///<root>/mlflow.db`
  (artifacts of experiments created here go to `<root>/mlartifacts`).
- `check_reachable(params)`: returns the URI or raises TrackingError within ~20 s when the
  tracking store cannot be reached. Call it before training so nothing is trained for nothing.
- `start_run(params, run_name, tags) -> run_id`: marks runs of this host whose process is gone
  KILLED, then creates a RUNNING run tagged with this process (pid, host, start time).
- `find_run(params, tag, value) -> run_id | None`, `finish_run(params, run_id, status)`.
- `log_pipeline(run_id, params, flow_run_id=None) -> dict`: logs params, the per-step training
  curve (reports/train_log.csv, with its step numbers), evaluation metrics (`base_`, `adapter_`,
  `lift_` prefixed), training summary metrics, lineage tags, the data set input (digest = DVC
  md5) and artifacts (reports/, params.yaml, dvc.yaml, dvc.lock). Idempotent: replaying it on the
  same run adds no duplicate metric point. Missing stage files are skipped, not errors.
- `system_metrics(run_id, params)`: context manager sampling CPU/GPU/memory into the run.

Runs are always addressed by id through an `MlflowClient`: MLflow's "active run" is thread-local
and a Prefect task runs in another thread than the flow that created the run.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tasks import layout, lineage
from tasks.config import Params
from tasks.params_doc import flatten
from tasks.errors import PeftflowError

ENV_RUN_ID = "PEFTFLOW_MLFLOW_RUN_ID"  # set by the flow so stages log into its run
ENV_FLOW_RUN_ID = "PREFECT__FLOW_RUN_ID"  # set by Prefect for flow runs in subprocesses
TAG_PID, TAG_HOST, TAG_PID_START = "peftflow.pid", "peftflow.host", "peftflow.pid_start"
# MLflow batch limits (per request): 1000 metrics, 100 params, 100 tags.
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100


class TrackingError(PeftflowError):
    """The MLflow tracking store cannot be reached or refused a request."""


def now_ms() -> int:
    return int(time.time() * 1000)


def tracking_uri(params: Params) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(params.root).resolve() / 'mlflow.db'}"


def client(params: Params):
    """An MlflowClient for the tracking store and model registry of this project."""
    from mlflow import MlflowClient

    uri = tracking_uri(params)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_reachable(params: Params, timeout_s: float = 20.0) -> str:
    """Return the tracking URI if its store answers; raise TrackingError (within ~timeout_s) if not.

    HTTP servers are probed on /health directly: the MLflow client itself retries for minutes.
    """
    uri = tracking_uri(params)
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        import requests

        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                r = requests.get(uri.rstrip("/") + "/health", timeout=min(5.0, max(0.5, deadline - time.monotonic())))
                if r.ok:
                    return uri
                last = f"HTTP {r.status_code}"
            except requests.RequestException as err:
                last = type(err).__name__
            time.sleep(1.0)
        raise TrackingError(
            f"MLflow tracking server {uri} is not reachable ({last}, waited {timeout_s:.0f} s); start it "
            f"(e.g. `mlflow server --host 127.0.0.1 --port 5000`) or unset MLFLOW_TRACKING_URI to use the "
            f"project's local sqlite store"
        )
    try:
        with _schema_lock(uri):
            client(params).search_experiments(max_results=1)  # creates/migrates the schema once
    except Exception as err:  # any store failure is a setup problem the user must fix
        raise TrackingError(f"MLflow tracking store {uri} cannot be opened: {type(err).__name__}: {err}") from None
    return uri


@contextlib.contextmanager
def _schema_lock(uri: str) -> Iterator[None]:
    """Serialise first use of a sqlite store across processes: two processes creating the schema
    of a fresh database at once make one of them fail mid-migration."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def experiment_id(params: Params, mlflow_client=None) -> str:
    """Id of `register.experiment`, created if missing (local stores put artifacts in <root>/mlartifacts)."""
    from mlflow.exceptions import MlflowException

    c = mlflow_client or client(params)
    name = params.register.experiment
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment '{name}' is deleted; restore it in the UI or set register.experiment")
        return exp.experiment_id
    local = not urlparse(tracking_uri(params)).scheme.startswith("http")
    location = (Path(params.root).resolve() / "mlartifacts").as_uri() if local else None
    try:
        return c.create_experiment(name, artifact_location=location)
    except MlflowException:
        # Another process created it between our lookup and create.
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def process_tags() -> dict[str, str]:
    import psutil

    pid = os.getpid()
    return {TAG_PID: str(pid), TAG_HOST: socket.gethostname(), TAG_PID_START: repr(psutil.Process(pid).create_time())}


def process_alive(pid: int, started: str | None) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        # A recycled pid belongs to a process that started at another time.
        return started is None or repr(proc.create_time()) == started
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def mark_stale_runs(params: Params, mlflow_client=None) -> list[str]:
    """Mark RUNNING runs started on this host by a process that no longer exists as KILLED."""
    c = mlflow_client or client(params)
    exp = experiment_id(params, c)
    host = socket.gethostname().replace("'", "")
    stale = []
    for run in c.search_runs([exp], filter_string=f"attributes.status = 'RUNNING' and tags.`{TAG_HOST}` = '{host}'"):
        pid = run.data.tags.get(TAG_PID)
        if pid and pid.isdigit() and not process_alive(int(pid), run.data.tags.get(TAG_PID_START)):
            c.set_tag(run.info.run_id, "peftflow.killed_reason", f"process {pid} on {host} was gone at a later start")
            c.set_terminated(run.info.run_id, status="KILLED")
            stale.append(run.info.run_id)
    return stale


def start_run(params: Params, run_name: str | None = None, tags: dict[str, str] | None = None) -> str:
    """Create the pipeline's MLflow run (after cleaning up killed ones) and return its id."""
    c = client(params)
    mark_stale_runs(params, c)
    run = c.create_run(experiment_id(params, c), run_name=run_name, tags={**process_tags(), **(tags or {})})
    return run.info.run_id


def find_run(params: Params, tag: str, value: str) -> str | None:
    """Id of the newest run of the experiment with tags[tag] == value (deleted runs excluded)."""
    c = client(params)
    runs = c.search_runs([experiment_id(params, c)], filter_string=f"tags.`{tag}` = '{value}'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def adopt_run(params: Params, run_id: str) -> None:
    """Make this process the owner of an existing run (a re-run resuming it): RUNNING, our pid tags."""
    c = client(params)
    c.update_run(run_id, status="RUNNING")
    for k, v in process_tags().items():
        c.set_tag(run_id, k, v)


def finish_run(params: Params, run_id: str, status: str = "FINISHED") -> None:
    client(params).set_terminated(run_id, status=status)


@contextlib.contextmanager
def system_metrics(run_id: str, params: Params, interval_s: float = 10.0) -> Iterator[None]:
    """Sample system metrics (CPU, memory, GPU when present) into `run_id` while the block runs."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=tracking_uri(params))
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


# ---------------------------------------------------------------- reading the stages' files


def read_report(params: Params, stage: str) -> dict[str, Any] | None:
    """reports/<stage>.json as a dict, or None when the stage has not run."""
    path = Path(params.root) / layout.report(stage)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise PeftflowError(f"{path} is not valid JSON ({err}); re-run that stage") from None


def numeric_leaves(d: dict[str, Any], prefix: str) -> dict[str, float]:
    """Finite numeric leaves of a nested dict as {prefix + 'a_b': value} (bools and lists skipped)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(numeric_leaves(v, f"{prefix}{k}_"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
    return out


def evaluation_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """{"base": {...}, "adapter": {...}, "lift": {...}, "intervals": {section: {m: [low, high]}}} ->
    base_*/adapter_*/lift_* metrics, and `<section>_<metric>_low` / `_high` for the intervals."""
    out: dict[str, float] = {}
    intervals = evaluation.get("intervals") or {}
    for section in ("base", "adapter", "lift"):
        if isinstance(evaluation.get(section), dict):
            out.update(numeric_leaves(evaluation[section], f"{section}_"))
        for metric, bounds in (intervals.get(section) or {}).items():
            out.update(numeric_leaves(dict(zip(("low", "high"), bounds)), f"{section}_{metric}_"))
    return out


def read_train_log(path: Path) -> dict[str, list[tuple[int, float]]]:
    """reports/train_log.csv -> {column: [(step, value), ...]} (empty or non-finite cells skipped)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "step" not in reader.fieldnames:
            raise PeftflowError(f"{path} has no 'step' column; re-run the train stage")
        for row in reader:
            step = int(float(row["step"]))
            for col, cell in row.items():
                if col == "step" or cell in (None, ""):
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    continue
                if math.isfinite(value):
                    series.setdefault(col, []).append((step, value))
    return series


# ---------------------------------------------------------------- logging


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def log_pipeline(run_id: str, params: Params, flow_run_id: str | None = None) -> dict[str, int]:
    """Log everything the stages wrote into run `run_id`; safe to call again (no duplicate points).

    Returns counts of what was newly logged: {"params", "metric_points", "tags", "artifacts"}.
    """
    from mlflow.entities import Metric, Param, RunTag

    c = client(params)
    root = Path(params.root)
    run = c.get_run(run_id)
    now = now_ms()

    # Params: log only keys not logged yet (MLflow refuses to change a logged param).
    new_params = [Param(k, v if isinstance(v, str) else json.dumps(v))
                  for k, v in flatten(params).items() if k not in run.data.params]
    for chunk in _chunks(new_params, _MAX_PARAMS):
        c.log_batch(run_id, params=chunk)

    # Per-step curve: skip steps this run already holds, so a replay adds nothing.
    points: list[Metric] = []
    if (root / layout.TRAIN_LOG).is_file():
        for col, series in read_train_log(root / layout.TRAIN_LOG).items():
            key = f"train/{col}"
            done = {m.step for m in c.get_metric_history(run_id, key)} if key in run.data.metrics else set()
            points += [Metric(key, value, now, step) for step, value in series if step not in done]
    # Single-value metrics: evaluation (base/adapter/lift) and the training summary.
    scalars = evaluation_metrics(read_report(params, "evaluate") or {})
    scalars.update(numeric_leaves(read_report(params, "train") or {}, "train_"))
    points += [Metric(k, v, now, 0) for k, v in scalars.items() if k not in run.data.metrics]
    for chunk in _chunks(points, _MAX_METRICS):
        c.log_batch(run_id, metrics=chunk)

    tags = [RunTag(k, v) for k, v in lineage.tags(params, read_report(params, "ingest") or {},
                                                  read_report(params, "train") or {},
                                                  flow_run_id or os.environ.get(ENV_FLOW_RUN_ID)).items()
            if run.data.tags.get(k) != v]
    for chunk in _chunks(tags, _MAX_TAGS):
        c.log_batch(run_id, tags=chunk)

    _log_dataset(c, run_id, params, run)

    artifacts = 0
    if (root / layout.REPORTS).is_dir():
        c.log_artifacts(run_id, str(root / layout.REPORTS), "reports")
        artifacts += sum(1 for p in (root / layout.REPORTS).iterdir() if p.is_file() and not p.name.startswith("."))
    for name in ("params.yaml", "dvc.yaml", "dvc.lock"):
        if (root / name).is_file():
            c.log_artifact(run_id, str(root / name))
            artifacts += 1
    artifacts += _log_predictions_table(c, run_id, root)
    return {"params": len(new_params), "metric_points": len(points), "tags": len(tags), "artifacts": artifacts}


PREDICTIONS_TABLE = "eval/predictions.json"


def _log_predictions_table(c, run_id: str, root: Path) -> int:
    """reports/predictions.csv as an MLflow table (`log_table`): the run's UI lists it as a table
    artifact and the experiment's artifact view compares it across runs. (MLflow's GenAI
    evaluation records are traces, which would file a fine-tuning run under GenAI evaluations.)
    log_table appends to an existing table, so a replay logs nothing."""
    import pandas as pd

    path = root / layout.PREDICTIONS
    if not path.is_file() or PREDICTIONS_TABLE in {f.path for f in c.list_artifacts(run_id, "eval")}:
        return 0
    c.log_table(run_id, data=pd.read_csv(path, keep_default_na=False), artifact_file=PREDICTIONS_TABLE)
    return 1


def _log_dataset(c, run_id: str, params: Params, run) -> None:
    """Dataset lineage: the raw data file as a run input whose digest is its DVC md5."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    ingest = read_report(params, "ingest") or {}
    md5 = ingest.get("md5")
    if not md5:
        return
    if any(d.dataset.digest == md5 for d in (run.inputs.dataset_inputs if run.inputs else [])):
        return
    source = resolve_dataset_source(str(Path(params.root).resolve() / layout.RAW_DATA))
    dataset = MetaDataset(source=source, name=str(ingest.get("source") or layout.RAW_DATA.name), digest=md5)
    inputs = [DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "train")])]
    for attempt in range(3):
        try:
            c.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as err:
            # Two runs logging the same new data set at once race in the server's get-or-create of
            # the dataset row (a unique-key violation); the retry finds the row the other one made.
            if attempt == 2 or "unique" not in str(err).lower():
                raise
            time.sleep(0.5)
