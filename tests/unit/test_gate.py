"""Truth table of the promotion gate (tasks/gate.py): it promotes on the lower bound of the
paired interval of the improvement, on comparisons made on the same rows."""

import math

import numpy as np
import pytest

from tasks import figures
from tasks.config import BootstrapConfig
from tasks.gate import Comparison, decide

GUARDS = {"f1_macro": 0.02}


def C(metric, cand, ref, low=None, high=None, rows=400):
    d = None if cand is None or ref is None or isinstance(cand, str) else cand - ref
    if low is None and d is not None and math.isfinite(d):
        low, high = d - 0.03, d + 0.03  # a +-3 point interval around the delta
    return Comparison(metric, cand, ref, low, high, rows)


def F1(cand, ref):
    return C("f1_macro", cand, ref)


@pytest.mark.parametrize(
    "primary, guards, min_delta, tolerances, expected, reason_part",
    [
        (C("accuracy", 0.60, 0.50), {"f1_macro": F1(0.55, 0.40)}, 0.0, GUARDS, True, "improvement confirmed"),
        # a positive lift within the noise does not promote
        (C("accuracy", 0.52, 0.50), {"f1_macro": F1(0.55, 0.40)}, 0.0, GUARDS, False, "within the noise"),
        (C("accuracy", 0.50, 0.50), {"f1_macro": F1(0.55, 0.40)}, 0.0, GUARDS, False, "within the noise"),
        (C("accuracy", 0.40, 0.50), {"f1_macro": F1(0.55, 0.40)}, 0.0, GUARDS, False, "within the noise"),
        # the lower bound must clear min_delta, not the point estimate
        (C("accuracy", 0.60, 0.50), {"f1_macro": F1(0.55, 0.40)}, 0.06, GUARDS, True, "confirmed"),  # low 0.07 > 0.06
        (C("accuracy", 0.60, 0.50), {"f1_macro": F1(0.55, 0.40)}, 0.07, GUARDS, False, "not above min_delta 0.07"),  # low == min_delta
        (C("accuracy", 0.60, 0.50, low=-0.01, high=0.2), {"f1_macro": F1(0.55, 0.40)}, 0.0, GUARDS, False, "noise"),
        # guards: point regression within tolerance
        (C("accuracy", 0.90, 0.80), {"f1_macro": F1(0.76, 0.78)}, 0.0, GUARDS, True, "guards ok"),
        (C("accuracy", 0.90, 0.80), {"f1_macro": F1(0.75, 0.78)}, 0.0, GUARDS, False, "guard f1_macro regressed"),
        (C("accuracy", 0.90, 0.80), {"f1_macro": F1(0.10, 0.78)}, 0.0, {}, True, "confirmed"),
        # loss improves downwards
        (C("loss", 1.0, 1.5), {}, 0.0, {}, True, "confirmed"),
        (C("loss", 1.5, 1.0), {}, 0.0, {}, False, "noise"),
        # missing / non-finite values fail closed
        (C("accuracy", None, 0.8), {}, 0.0, GUARDS, False, "candidate has no finite 'accuracy'"),
        (C("accuracy", math.nan, 0.8), {}, 0.0, GUARDS, False, "no finite"),
        (C("accuracy", math.inf, 0.8), {}, 0.0, GUARDS, False, "no finite"),
        (C("accuracy", 0.9, None), {}, 0.0, GUARDS, False, "champion v1 has no finite"),
        (C("accuracy", True, 0.8), {}, 0.0, GUARDS, False, "no finite"),
        (C("accuracy", 0.9, 0.8), {}, 0.0, GUARDS, False, "guard metric 'f1_macro' missing"),
        (C("accuracy", 0.9, 0.8), {"f1_macro": F1(math.nan, 0.5)}, 0.0, GUARDS, False, "guard metric 'f1_macro'"),
        (Comparison("accuracy", 0.9, 0.8, None, None, 1), {}, 0.0, {}, False, "no interval"),
        # the reference lacks a guard metric: compared on primary only, and said so
        (C("accuracy", 0.9, 0.8), {"f1_macro": F1(0.9, None)}, 0.0, GUARDS, True, "lacks: f1_macro"),
    ],
)
def test_truth_table(primary, guards, min_delta, tolerances, expected, reason_part):
    d = decide(primary, guards, "champion v1", min_delta, tolerances)
    assert d.promote is expected, d.reason
    assert reason_part in d.reason


def test_reason_states_the_interval_and_rows():
    d = decide(C("accuracy", 0.8, 0.7, 0.05, 0.15, rows=321), {}, "base (calibrated)", 0.0, {})
    assert d.promote and "[95% CI +0.05, +0.15] on 321 rows" in d.reason and "base (calibrated)" in d.reason
    assert d.improvement == pytest.approx((0.1, 0.05, 0.15))


def _table(correct: np.ndarray) -> dict[str, np.ndarray]:
    labels = np.arange(len(correct)) % 2
    return {"label": labels, "pred": np.where(correct, labels, 1 - labels)}


def test_an_adapter_equal_to_its_reference_is_refused():
    """Lift = noise: the same predictions on the same rows give the interval [0, 0]."""
    rows = _table(np.random.default_rng(0).random(400) < 0.7)
    diff = figures.difference(rows, rows, "accuracy", 2, BootstrapConfig())
    assert (diff.value, diff.low, diff.high) == (0.0, 0.0, 0.0)
    d = decide(Comparison("accuracy", 0.7, 0.7, diff.low, diff.high, 400), {}, "base", 0.0, {})
    assert not d.promote and "within the noise" in d.reason


def test_a_small_lift_on_400_rows_is_within_the_noise_a_large_one_is_not():
    rng = np.random.default_rng(1)
    ref = rng.random(400) < 0.70
    small = ref.copy()
    flip = rng.choice(np.flatnonzero(~ref), size=12, replace=False)  # +3 points, paired
    small[flip] = True
    noisy = small ^ (rng.random(400) < 0.15)  # the same +3 points on average, with row-level noise
    for cand, promotes in ((noisy, False), (ref | (rng.random(400) < 0.5), True)):
        diff = figures.difference(_table(cand), _table(ref), "accuracy", 2, BootstrapConfig())
        d = decide(Comparison("accuracy", cand.mean(), ref.mean(), diff.low, diff.high, 400), {}, "base", 0.0, {})
        assert d.promote is promotes, d.reason


def test_pure_and_deterministic():
    args = (C("accuracy", 0.9, 0.8), {"f1_macro": F1(0.8, 0.78)}, "champion v3", 0.01, dict(GUARDS))
    assert decide(*args) == decide(*args)
