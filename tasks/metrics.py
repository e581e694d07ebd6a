"""Pure classification and language-model metrics (numpy only, no model, no files).

Contract: every function takes plain sequences of ints/floats and returns plain Python numbers
or a numpy array; bad input (length mismatch, class id out of range, empty input) raises
ValueError naming the problem. Class ids are 0..n_classes-1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _check(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} items but y_pred has {p.size}")
    if t.size == 0:
        raise ValueError("no items to score")
    if n_classes is not None:
        for name, a in (("y_true", t), ("y_pred", p)):
            if a.min() < 0 or a.max() >= n_classes:
                raise ValueError(f"{name} has class ids outside 0..{n_classes - 1}: {sorted(set(a.tolist()))}")
    return t, p


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of items whose prediction equals the truth."""
    t, p = _check(y_true, y_pred)
    return float((t == p).mean())


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """Counts [n_classes, n_classes]: row = true class, column = predicted class."""
    t, p = _check(y_true, y_pred, n_classes)
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def f1_per_class(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """F1 of each class; 0.0 where precision + recall is 0 (as sklearn with zero_division=0)."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(axis=0) + cm.sum(axis=1)  # (tp + fp) + (tp + fn)
    return np.divide(2 * tp, denom, out=np.zeros(n_classes), where=denom > 0)


def f1_macro(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> float:
    """Unweighted mean F1 over the classes that occur in y_true or y_pred.

    Classes absent from both are left out (sklearn's default label set), so a test sample that
    happens to lack a class is not penalised with a spurious F1 of 0 for it.
    """
    t, p = _check(y_true, y_pred, n_classes)
    present = np.union1d(t, p)
    return float(f1_per_class(t, p, n_classes)[present].mean())


def perplexity(mean_token_loss: float) -> float:
    """exp(mean token negative log-likelihood); inf when it overflows."""
    if math.isnan(mean_token_loss):
        return math.nan
    try:
        return math.exp(mean_token_loss)
    except OverflowError:
        return math.inf
