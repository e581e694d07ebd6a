"""Truth table of the promotion gate (tasks/gate.py)."""

import math

import pytest

from tasks.gate import decide

BASE = {"accuracy": 0.50, "f1_macro": 0.40}
CHAMP = {"accuracy": 0.80, "f1_macro": 0.78}
GUARDS = {"f1_macro": 0.02}


@pytest.mark.parametrize(
    "candidate, champion, min_delta, guards, expected, reason_part",
    [
        # no champion: must beat the base model
        ({"accuracy": 0.60, "f1_macro": 0.55}, None, 0.0, GUARDS, True, "beats base"),
        ({"accuracy": 0.50, "f1_macro": 0.55}, None, 0.0, GUARDS, False, "does not beat base"),
        ({"accuracy": 0.40, "f1_macro": 0.55}, None, 0.0, GUARDS, False, "does not beat base"),
        ({"accuracy": 0.52, "f1_macro": 0.55}, None, 0.05, GUARDS, False, "min_delta"),
        ({"accuracy": 0.60, "f1_macro": 0.30}, None, 0.0, GUARDS, False, "guard f1_macro"),
        # with a champion: beat it by >= min_delta, guards within tolerance
        ({"accuracy": 0.85, "f1_macro": 0.80}, CHAMP, 0.0, GUARDS, True, "beats champion"),
        ({"accuracy": 0.85, "f1_macro": 0.80}, CHAMP, 0.05, GUARDS, True, "beats champion"),  # exactly min_delta
        ({"accuracy": 0.84, "f1_macro": 0.80}, CHAMP, 0.05, GUARDS, False, "min_delta"),
        ({"accuracy": 0.80, "f1_macro": 0.90}, CHAMP, 0.0, GUARDS, False, "does not beat champion"),
        ({"accuracy": 0.79, "f1_macro": 0.90}, CHAMP, 0.0, GUARDS, False, "does not beat champion"),
        ({"accuracy": 0.90, "f1_macro": 0.76}, CHAMP, 0.0, GUARDS, True, "guards ok"),  # regression == tolerance
        ({"accuracy": 0.90, "f1_macro": 0.75}, CHAMP, 0.0, GUARDS, False, "guard f1_macro regressed"),
        ({"accuracy": 0.90, "f1_macro": 0.10}, CHAMP, 0.0, {}, True, "beats champion"),  # no guards
        # missing / non-finite values fail closed
        ({"f1_macro": 0.9}, CHAMP, 0.0, GUARDS, False, "candidate has no finite 'accuracy'"),
        ({"accuracy": math.nan, "f1_macro": 0.9}, CHAMP, 0.0, GUARDS, False, "no finite"),
        ({"accuracy": math.inf, "f1_macro": 0.9}, CHAMP, 0.0, GUARDS, False, "no finite"),
        ({"accuracy": 0.9}, CHAMP, 0.0, GUARDS, False, "guard metric 'f1_macro' missing"),
        ({"accuracy": 0.9, "f1_macro": math.nan}, CHAMP, 0.0, GUARDS, False, "guard metric 'f1_macro' missing"),
        ({"accuracy": 0.9, "f1_macro": 0.9}, {"f1_macro": 0.5}, 0.0, GUARDS, False, "champion has no finite"),
        # the reference lacks a guard metric: compared on primary only, and said so
        ({"accuracy": 0.9, "f1_macro": 0.9}, {"accuracy": 0.8}, 0.0, GUARDS, True, "lacks: f1_macro"),
        # booleans and strings are not metrics
        ({"accuracy": True, "f1_macro": 0.9}, CHAMP, 0.0, GUARDS, False, "no finite"),
        ({"accuracy": "0.9", "f1_macro": 0.9}, CHAMP, 0.0, GUARDS, True, "beats champion"),
    ],
)
def test_truth_table(candidate, champion, min_delta, guards, expected, reason_part):
    d = decide(candidate, champion, BASE, "accuracy", min_delta, guards)
    assert d.promote is expected, d.reason
    assert reason_part in d.reason


def test_champion_is_the_reference_not_base():
    # beats base by far but not the champion: the champion decides
    d = decide({"accuracy": 0.7, "f1_macro": 0.7}, CHAMP, BASE, "accuracy", 0.0, {})
    assert not d.promote and "champion" in d.reason


def test_pure_and_deterministic():
    args = ({"accuracy": 0.9, "f1_macro": 0.8}, dict(CHAMP), dict(BASE), "accuracy", 0.01, dict(GUARDS))
    snapshot = [dict(a) if isinstance(a, dict) else a for a in args]
    assert decide(*args) == decide(*args)
    assert list(args) == snapshot  # inputs untouched
