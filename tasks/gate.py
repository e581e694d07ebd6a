"""The promotion gate: should a candidate model version become `champion`?

A pure function of numbers (no MLflow, no files), so every branch is unit-tested.

Rules (all metrics are "higher is better", e.g. accuracy, f1_macro):
- The reference is the current champion's metrics, or the base model's when there is no champion.
- The candidate must beat the reference on `primary` by more than zero and by at least
  `min_delta`.
- Each guard metric may fall at most `guards[metric]` below the reference.
- A metric the decision needs that the candidate lacks, or a non-finite value, fails closed.
  A guard metric the reference lacks cannot be compared and is skipped (said in the reason).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

# Float slack so that 0.85 - 0.80 counts as a delta of 0.05 (it is 0.04999... in binary).
EPS = 1e-9


@dataclass(frozen=True)
class Decision:
    """`promote` is the verdict; `reason` says why in one line (stored as a version tag)."""

    promote: bool
    reason: str


def _value(metrics: Mapping[str, float], name: str) -> float | None:
    v = metrics.get(name)
    if v is None or isinstance(v, bool):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def decide(
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    base: Mapping[str, float],
    primary: str,
    min_delta: float,
    guards: Mapping[str, float],
) -> Decision:
    """Decide whether `candidate` replaces `champion` (or, with no champion, is good enough vs `base`)."""
    ref_name, ref = ("champion", champion) if champion is not None else ("base", base)
    cand = _value(candidate, primary)
    if cand is None:
        return Decision(False, f"candidate has no finite '{primary}' metric")
    ref_value = _value(ref, primary)
    if ref_value is None:
        return Decision(False, f"{ref_name} has no finite '{primary}' metric to compare with")
    delta = cand - ref_value
    if delta <= EPS:
        return Decision(False, f"{primary} {cand:.6g} does not beat {ref_name} {ref_value:.6g}")
    if delta < min_delta - EPS:
        return Decision(
            False, f"{primary} {cand:.6g} beats {ref_name} {ref_value:.6g} by {delta:.6g} < min_delta {min_delta:g}"
        )
    skipped = []
    for metric, tolerance in sorted(guards.items()):
        c = _value(candidate, metric)
        if c is None:
            return Decision(False, f"guard metric '{metric}' missing or non-finite in candidate")
        r = _value(ref, metric)
        if r is None:
            skipped.append(metric)
            continue
        if r - c > tolerance + EPS:
            return Decision(
                False, f"guard {metric} regressed {r - c:.6g} ({r:.6g} -> {c:.6g}) vs {ref_name}, "
                f"more than the allowed {tolerance:g}"
            )
    reason = f"{primary} {cand:.6g} beats {ref_name} {ref_value:.6g} by {delta:.6g} (min_delta {min_delta:g})"
    if guards:
        reason += "; guards ok"
    if skipped:
        reason += f" (not compared, {ref_name} lacks: {', '.join(skipped)})"
    return Decision(True, reason)
