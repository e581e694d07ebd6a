"""The gate's comparisons: the candidate against the champion (re-scored on this run's test
rows) or, with no champion, against the strongest base reference, with paired intervals.

Contract:
- `champion_rows(params, adapter_dir, rows) -> cols`: the champion adapter (already downloaded and
  hash-checked by tasks/register.py) scored by tasks/evalset.py on THIS run's selected test rows,
  the same code path that scored base and candidate; ModelError if it does not fit this run's
  base model, DataError if the rows differ from those in reports/predictions.csv.
- `comparisons(params, candidate, reference, ref_is_base) -> (primary, guards, ref_name)`: the
  `gate.Comparison`s of `register.primary_metric` and each guard metric.
No MLflow here: register downloads, this module scores and compares.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks import devices, evalset, figures, metrics, models
from tasks.adapters import attach_adapter, check_adapter
from tasks.config import Params
from tasks.errors import DataError, PeftflowError
from tasks.gate import Comparison


def measure_adapter(params: Params, adapter_dir: Path, rows: list[int], which: str, mismatch: PeftflowError,
                    first: int | None = None):
    """(evalset.Measured, EvalSet): base + the adapter in `adapter_dir` scored on this project's
    evaluation rows (only the first `first`, when given). Raises `mismatch` when those rows are not
    `rows`, the rows the adapter's recorded per-row table holds; ModelError for another base."""
    base = models.resolve(params.model)
    check_adapter(adapter_dir, base)  # ModelError when it was trained on another base
    tokenizer = models.load_tokenizer(base, trust_remote_code=params.model.trust_remote_code)
    es = evalset.build(params, tokenizer)
    if es.rows != list(rows):
        raise mismatch
    device, dtype = devices.torch_placement(params.train)
    model = evalset.load_scoring_model(params, base, es.label_names, device, dtype)
    model = attach_adapter(model, adapter_dir, base).to(device)
    scored = es if first is None else evalset.first_rows(es, first)
    return evalset.measure(model, scored, params, tokenizer, device, which), es


def champion_rows(params: Params, adapter_dir: Path, rows: list[int]) -> dict[str, np.ndarray]:
    mismatch = DataError("reports/predictions.csv holds other test rows than data/processed selects now; "
                         "re-run `python -m tasks evaluate`")
    return measure_adapter(params, adapter_dir, rows, "champion", mismatch)[0].cols


def _comparison(params: Params, metric: str, candidate, reference, n_classes: int) -> Comparison | None:
    diff = figures.difference(candidate, reference, metric, n_classes, params.evaluate.bootstrap)
    if diff is None:
        cand = metrics.table_metric(metric, candidate, n_classes)
        return None if cand is None else Comparison(metric, cand, metrics.table_metric(metric, reference, n_classes))
    rows = int((metrics.defined_rows(metric, candidate) & metrics.defined_rows(metric, reference)).sum())
    return Comparison(metric, metrics.table_metric(metric, candidate, n_classes),
                      metrics.table_metric(metric, reference, n_classes), diff.low, diff.high, rows)


def comparisons(params: Params, candidate: dict, reference: dict, ref_name: str | None, n_classes: int):
    """Primary and guard comparisons. `ref_name` None: the reference is the base table, and each
    metric is compared with the base's strongest predictor for it (figures.fair_reference)."""
    cfg = params.register
    out, names = {}, {}
    for metric in dict.fromkeys([cfg.primary_metric, *cfg.guards]):
        ref, name = figures.fair_reference(reference, metric, n_classes) if ref_name is None else (reference, ref_name)
        out[metric], names[metric] = _comparison(params, metric, candidate, ref, n_classes), name
    primary = out[cfg.primary_metric] or Comparison(cfg.primary_metric, None, None)
    return primary, {m: out[m] for m in cfg.guards}, names[cfg.primary_metric]
