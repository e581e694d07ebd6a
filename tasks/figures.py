"""Metrics with their intervals, from per-row tables (tasks/metrics.py, tasks/intervals.py).

Contract:
- `model_figures(cols, n_classes, boot) -> {metric: Figure}`: every metric the table supports,
  each with its bootstrap interval over the rows.
- `difference(a, b, metric, n_classes, boot) -> Figure`: `metric(a) - metric(b)` on the same
  rows with its paired-bootstrap interval (both tables resampled with the same row indices).
- `fair_reference(base, metric, n_classes) -> (table, predictor)`: for a label metric, the base
  table with `pred` replaced by the strongest of the base's predictors on these rows (summed,
  length-normalised or calibrated log-likelihood, or the majority label), so an adapter is never
  credited for beating a handicapped base. Other metrics: the base table itself.
The tables must hold the same rows in the same order (ValueError otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks import intervals, metrics
from tasks.config import BootstrapConfig


@dataclass(frozen=True)
class Figure:
    value: float
    low: float | None  # None when the interval is undefined (e.g. fewer than 2 rows)
    high: float | None


def _n_rows(cols: dict[str, np.ndarray]) -> int:
    return len(next(iter(cols.values())))


def _interval(stat, n: int, boot: BootstrapConfig) -> tuple[float | None, float | None]:
    ci = intervals.interval(stat, n, resamples=boot.resamples, confidence=boot.confidence, seed=boot.seed)
    return ci if ci else (None, None)


def model_figures(cols: dict[str, np.ndarray], n_classes: int, boot: BootstrapConfig) -> dict[str, Figure]:
    out = {}
    for name in metrics.metric_names(cols, n_classes):
        rows = intervals.take(cols, metrics.defined_rows(name, cols))  # resample the rows it is computed on

        def stat(idx, name=name, rows=rows):
            return metrics.table_metric(name, intervals.take(rows, idx), n_classes)

        out[name] = Figure(metrics.table_metric(name, cols, n_classes), *_interval(stat, _n_rows(rows), boot))
    return out


def difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray], metric: str, n_classes: int,
               boot: BootstrapConfig) -> Figure | None:
    """metric(a) - metric(b) on the same rows, paired; None when either lacks the metric."""
    if _n_rows(a) != _n_rows(b) or not np.array_equal(a["label"], b["label"]):
        raise ValueError("the two tables do not hold the same rows")
    va, vb = metrics.table_metric(metric, a, n_classes), metrics.table_metric(metric, b, n_classes)
    if va is None or vb is None:
        return None

    keep = metrics.defined_rows(metric, a) & metrics.defined_rows(metric, b)
    a, b = intervals.take(a, keep), intervals.take(b, keep)

    def stat(idx):
        x = metrics.table_metric(metric, intervals.take(a, idx), n_classes)
        y = metrics.table_metric(metric, intervals.take(b, idx), n_classes)
        return None if x is None or y is None else x - y

    return Figure(va - vb, *_interval(stat, _n_rows(a), boot))


def fair_reference(base: dict[str, np.ndarray], metric: str, n_classes: int) -> tuple[dict[str, np.ndarray], str]:
    """(reference table, name of the base predictor it uses) for comparing an adapter on `metric`."""
    if metric not in ("accuracy", "f1_macro") or "pred" not in base:  # no label predictions (e.g. preference pairs)
        return base, "base"
    best, best_value = "pred", None
    for column in ("pred", "pred_norm", "pred_cal", "majority"):
        if column not in base:
            continue
        value = metrics.table_metric(metric, {**base, "pred": base[column]}, n_classes)
        if value is not None and (best_value is None or value > best_value):
            best, best_value = column, value
    names = {"pred": "base", "pred_norm": "base (length-normalised)", "pred_cal": "base (calibrated)",
             "majority": "majority label"}
    return {**base, "pred": base[best]}, names[best]
