"""The deploy smoke check: a version must reproduce, on a few of its own test rows, the primary
metric it was registered with, and its registered model must generate an answer.

Contract:
- `recorded_table(params, mv, dst) -> (rows, adapter_cols)`: the per-row table the version was
  registered with (reports/predictions.csv of its MLflow run), after checking that its primary
  metric over all rows is the version's `metric.adapter.<primary>` tag.
- `check(params, mv, adapter_dir, model_dir, dst, rows, tolerance) -> SmokeResult`: scores the
  downloaded (hash-checked) adapter on the first `rows` recorded test rows through the same code
  path evaluation used (tasks/evalset.py) and compares the primary metric on those rows with the
  recorded one; then (`generate`) asks the registered pyfunc (the folder that will be served) for
  one reply. The mlflow target passes generate=False: its new server must answer a smoke request
  before it is switched to, which is the same check on the served process itself.
Raises DeployError (a PeftflowError: the deploy fails with this reason and rolls back) when the
version's data (`data.md5` tag) is not this project's data, the recorded table is missing or does
not match its tag, the metric is off by more than `tolerance`, or generation does not answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks import judge, layout, metrics, predictions, processed, tracking
from tasks.config import Params
from tasks.errors import PeftflowError


class DeployError(PeftflowError):
    """A version cannot be deployed (does not fit the target, fails its smoke check, ...)."""


@dataclass(frozen=True)
class SmokeResult:
    metric: str
    rows: list[int]
    recorded: float
    reproduced: float
    reply: str


def _data_md5(params: Params) -> str | None:
    return (tracking.read_report(params, "ingest") or {}).get("md5")


def recorded_table(params: Params, mv, dst: Path):
    """See the module docstring."""
    import mlflow

    metric = params.register.primary_metric
    if not mv.run_id:
        raise DeployError(f"version {mv.version} has no MLflow run, so no recorded test rows to check it on")
    try:
        local = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=str(layout.PREDICTIONS),
                                                    dst_path=str(dst), tracking_uri=tracking.tracking_uri(params))
    except Exception as err:  # noqa: BLE001 - any store error means: nothing to check against
        raise DeployError(f"version {mv.version}: its run {mv.run_id} has no {layout.PREDICTIONS} ({err})") from None
    rows, _, adapter = predictions.read(Path(local))
    n_classes = max(len(processed.label_names(params.root)), 1)
    full = metrics.table_metric(metric, adapter, n_classes)
    tag = mv.tags.get(f"metric.adapter.{metric}")
    if full is None or tag is None or abs(full - float(tag)) > 1e-9:
        raise DeployError(f"version {mv.version}: its recorded test table gives {metric} {full}, but the version "
                          f"was registered with {tag}; its records are inconsistent")
    return rows, adapter


def _reproduce(params: Params, adapter_dir: Path, recorded_rows: list[int], k: int):
    mismatch = DeployError("this project's data/processed selects other test rows than the version was evaluated "
                           "on; run `dvc checkout` / `dvc repro preprocess` for the version's data first")
    measured, es = judge.measure_adapter(params, adapter_dir, recorded_rows, "smoke", mismatch, first=k)
    return measured, es.prompts[0]


def generate_reply(model_dir: Path, prompt: str) -> str:
    """One reply of the registered pyfunc folder (what `mlflow models serve` will load)."""
    import mlflow

    try:
        out = mlflow.pyfunc.load_model(str(model_dir)).predict([prompt], params={"max_new_tokens": 4})
    except Exception as err:  # noqa: BLE001 - the served model must answer; any failure is the reason
        raise DeployError(f"the registered model does not generate: {type(err).__name__}: {err}") from None
    out = list(out)
    if len(out) != 1 or not isinstance(out[0], str):
        raise DeployError(f"the registered model answered {out!r} to one prompt; expected one string")
    return out[0]


def check(params: Params, mv, adapter_dir: Path, model_dir: Path, dst: Path, rows: int = 5,
          tolerance: float = 0.02, generate: bool = True) -> SmokeResult:
    """See the module docstring."""
    want, have = mv.tags.get("data.md5"), _data_md5(params)
    if not want or want != have:
        raise DeployError(f"version {mv.version} was evaluated on data md5 {want}, this project's data is {have}; "
                          f"check out the version's data (git + `dvc checkout`) to deploy it from here")
    metric = params.register.primary_metric
    recorded_rows, recorded = recorded_table(params, mv, dst)
    k = min(rows, len(recorded_rows))
    measured, prompt = _reproduce(params, adapter_dir, recorded_rows, k)
    n_classes = max(len(processed.label_names(params.root)), 1)
    was = metrics.table_metric(metric, {c: v[:k] for c, v in recorded.items()}, n_classes)
    now = metrics.table_metric(metric, measured.cols, n_classes)
    if was is None or now is None or abs(now - was) > tolerance:
        raise DeployError(f"smoke check failed: on its first {k} recorded test rows version {mv.version} scores "
                          f"{metric} {now}, it was registered with {was} there (tolerance {tolerance})")
    reply = generate_reply(model_dir, prompt) if generate else ""
    return SmokeResult(metric, list(recorded_rows[:k]), float(was), float(now), reply)
