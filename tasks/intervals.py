"""Seeded 95% intervals of evaluation metrics by a (paired) bootstrap over test rows.

Contract: `interval(stat, n, cfg) -> (low, high)` resamples row indices 0..n-1 with replacement
`cfg.resamples` times (scipy.stats.bootstrap, percentile method, seeded by `cfg.seed`) and returns
the central `cfg.confidence` interval of `stat(indices)`. A statistic that compares two models
(e.g. adapter minus base) evaluates both on the SAME resampled rows: that is the paired bootstrap,
so row difficulty, shared by both, cancels out. Same inputs and seed, same interval.

Percentile, not BCa: BCa needs a jackknife pass (n more evaluations) and is undefined when every
resample gives the same value (an adapter identical to its base), where percentile rightly gives
[d, d].
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np


def interval(stat: Callable[[np.ndarray], float | None], n: int, *, resamples: int, confidence: float,
             seed: int) -> tuple[float, float] | None:
    """(low, high) of `stat` over bootstrap resamples of the rows; None when it is undefined."""
    from scipy.stats import DegenerateDataWarning, bootstrap

    def statistic(idx: np.ndarray) -> float:
        v = stat(idx.astype(np.int64))
        return math.nan if v is None else float(v)

    if n < 2 or math.isnan(statistic(np.arange(n))):
        return None
    with warnings.catch_warnings():  # a statistic undefined on some resamples gives NaN: handled below
        warnings.simplefilter("ignore", DegenerateDataWarning)
        res = bootstrap((np.arange(n),), statistic, vectorized=False, n_resamples=resamples,
                        confidence_level=confidence, method="percentile", random_state=np.random.default_rng(seed))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return None if math.isnan(low) or math.isnan(high) else (low, high)


def take(cols: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    """The rows `idx` of a per-row table (every column)."""
    return {k: v[idx] for k, v in cols.items()}
