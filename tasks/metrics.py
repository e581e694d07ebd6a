"""Pure classification and language-model metrics (numpy only, no model, no files).

Contract: every function takes plain sequences of ints/floats and returns plain Python numbers
or a numpy array; bad input (length mismatch, class id out of range, empty input) raises
ValueError naming the problem. Class ids are 0..n_classes-1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tasks.config import METRIC_NAMES


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


# --- metrics over per-row tables --------------------------------------------------------------------
# One model's evaluation is a table of per-row columns (numpy arrays of one length): `label` (true
# class id, -1 none), `pred` / `pred_norm` / `pred_cal` (predicted class id by summed, length-normalised
# and content-free-calibrated label log-likelihood), `majority` (the train split's most frequent
# label), `nll_sum` + `n_tokens` (loss), and the generative per-row scores of tasks/textmetrics.py
# (NaN on rows not generated). A metric is a statistic of such a table, so the bootstrap
# (tasks/intervals.py) recomputes it on resampled rows exactly as it is computed on all rows.

GENERATIVE = ("exact_match", "token_f1", "rouge_l", "chrf", "embedding_similarity", "length")
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})
PREFERENCE = ("preference_accuracy", "logp_accuracy", "reward_margin")  # preference pairs (tasks/preference_eval.py)
PREDICTORS = {"accuracy": "pred", "accuracy_norm": "pred_norm", "accuracy_calibrated": "pred_cal",
              "majority_rate": "majority"}  # accuracy of each predictor column


def _labeled(cols, pred: str):
    if pred not in cols or "label" not in cols:
        return None
    keep = (cols["label"] >= 0) & (cols[pred] >= 0)
    return (cols["label"][keep], cols[pred][keep]) if keep.any() else None


def table_metric(name: str, cols, n_classes: int) -> float | None:
    """Metric `name` of a per-row table (see above); None when the table lacks what it needs."""
    if name in PREDICTORS or name == "f1_macro":
        pair = _labeled(cols, PREDICTORS.get(name, "pred"))
        if pair is None:
            return None
        return f1_macro(*pair, n_classes) if name == "f1_macro" else accuracy(*pair)
    if name in ("loss", "perplexity"):
        if "n_tokens" not in cols or cols["n_tokens"].sum() == 0:
            return None
        loss = float(cols["nll_sum"].sum() / cols["n_tokens"].sum())
        return perplexity(loss) if name == "perplexity" else loss
    if name == "length_ratio":
        if "length" not in cols or not np.isfinite(cols["length"]).any():
            return None
        ref = np.nansum(cols["reference_length"])
        return float(np.nansum(cols["length"]) / ref) if ref else None
    if name in PREFERENCE:
        return preference_metric(name, cols)
    if name in GENERATIVE:
        if name not in cols or not np.isfinite(cols[name]).any():
            return None
        return float(np.nanmean(cols[name]))
    raise ValueError(f"unknown metric '{name}'")


def preference_accuracy(margins: Sequence[float]) -> float:
    """Share of pairs whose margin (score of chosen minus score of rejected) is > 0; a tie is not a win."""
    m = np.asarray(margins, dtype=np.float64).reshape(-1)
    if m.size == 0:
        raise ValueError("no pairs to score")
    return float((m > 0).mean())


def preference_metric(name: str, cols) -> float | None:
    """`preference_accuracy` (of `pref_margin`), `logp_accuracy` (chosen_logp > rejected_logp) or
    `reward_margin` (mean implied reward margin) of a per-row table; None without pair columns."""
    needs = {"preference_accuracy": "pref_margin", "logp_accuracy": "chosen_logp", "reward_margin": "reward_margin"}
    if needs[name] not in cols or len(cols[needs[name]]) == 0:
        return None
    if name == "preference_accuracy":
        return preference_accuracy(cols["pref_margin"])
    if name == "logp_accuracy":
        return preference_accuracy(cols["chosen_logp"] - cols["rejected_logp"])
    return float(np.mean(cols["reward_margin"]))


def defined_rows(name: str, cols) -> np.ndarray:
    """Mask of the rows metric `name` is computed on (generated rows for generative metrics,
    labelled rows for label metrics, every row otherwise): the rows a bootstrap resamples."""
    n = len(cols["label"])
    if name in GENERATIVE or name == "length_ratio":
        column = "length" if name == "length_ratio" else name
        return np.isfinite(cols[column]) if column in cols else np.zeros(n, dtype=bool)
    if name in PREDICTORS or name == "f1_macro":
        return cols["label"] >= 0
    return np.ones(n, dtype=bool)


def metric_names(cols, n_classes: int) -> list[str]:
    """The metrics a table supports, in report order."""
    return [m for m in METRIC_NAMES if table_metric(m, cols, n_classes) is not None]
