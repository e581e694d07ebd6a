"""The promotion gate: should a candidate model version become `champion`?

A pure function of comparisons (no MLflow, no files, no models), so every branch is unit-tested.
The caller (tasks/register.py) builds each `Comparison` on ONE set of rows: this run's test split,
with the candidate, and the reference scored on the same rows (tasks/figures.py): the current
champion re-scored there, or, with no champion, the strongest base reference.

Rules:
- The candidate must improve on the reference in `primary` with the LOWER bound of the paired
  bootstrap interval of the improvement above `min_delta` (min_delta 0: above zero). A lift
  within the noise of the test rows does not promote. Loss-type metrics improve downwards.
- Each guard metric may regress at most `guards[metric]` (point estimate) below the reference.
- A metric the decision needs that the candidate lacks, a non-finite value, or a missing interval
  fails closed. A guard metric the reference lacks cannot be compared and is skipped (said so).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from tasks.metrics import LOWER_IS_BETTER

# Float slack so that 0.85 - 0.80 counts as a delta of 0.05 (it is 0.04999... in binary).
EPS = 1e-9


@dataclass(frozen=True)
class Comparison:
    """candidate - reference on one metric, on the same rows, with the paired 95% interval."""

    metric: str
    candidate: float | None
    reference: float | None
    low: float | None = None
    high: float | None = None
    rows: int = 0

    @property
    def delta(self) -> float | None:
        ok = _finite(self.candidate) and _finite(self.reference)
        return self.candidate - self.reference if ok else None

    def improvement(self) -> tuple[float, float | None, float | None] | None:
        """(improvement, its low, its high): the delta signed so that higher is better."""
        d = self.delta
        if d is None:
            return None
        if self.metric in LOWER_IS_BETTER:
            return -d, (-self.high if _finite(self.high) else None), (-self.low if _finite(self.low) else None)
        return d, (self.low if _finite(self.low) else None), (self.high if _finite(self.high) else None)


@dataclass(frozen=True)
class Decision:
    """`promote` is the verdict; `reason` says why in one line (stored as a version tag)."""

    promote: bool
    reason: str
    improvement: tuple[float, float | None, float | None] | None = None  # of the primary metric


def _finite(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def describe(c: Comparison, ref_name: str) -> str:
    """'accuracy 0.8 vs champion v2 0.75: +0.05 [95% CI +0.01, +0.09] on 400 rows'."""
    ci = f" [95% CI {c.low:+.4g}, {c.high:+.4g}]" if _finite(c.low) and _finite(c.high) else " [no interval]"
    return f"{c.metric} {c.candidate:.4g} vs {ref_name} {c.reference:.4g}: {c.delta:+.4g}{ci} on {c.rows} rows"


def decide(primary: Comparison, guards: Mapping[str, Comparison | None], ref_name: str, min_delta: float,
           tolerances: Mapping[str, float]) -> Decision:
    """Decide whether the candidate replaces the reference named `ref_name` (see the module rules)."""
    if not _finite(primary.candidate):
        return Decision(False, f"candidate has no finite '{primary.metric}' metric")
    if not _finite(primary.reference):
        return Decision(False, f"{ref_name} has no finite '{primary.metric}' metric to compare with")
    imp = primary.improvement()
    said = describe(primary, ref_name)
    if imp[1] is None:
        return Decision(False, f"{said}: no interval (too few test rows) to tell a lift from noise", imp)
    if imp[1] <= min_delta + EPS:
        what = "within the noise" if imp[1] <= EPS else f"not above min_delta {min_delta:g}"
        return Decision(False, f"{said}: the lower bound of the improvement is {what}", imp)
    skipped = []
    for metric, tolerance in sorted(tolerances.items()):
        c = guards.get(metric)
        if c is None or not _finite(c.candidate):
            return Decision(False, f"guard metric '{metric}' missing or non-finite in candidate", imp)
        if not _finite(c.reference):
            skipped.append(metric)
            continue
        regression = -c.improvement()[0]
        if regression > tolerance + EPS:
            return Decision(False, f"guard {metric} regressed {regression:.4g} ({c.reference:.4g} -> "
                                   f"{c.candidate:.4g}) vs {ref_name}, more than the allowed {tolerance:g}", imp)
    reason = f"{said}: improvement confirmed (min_delta {min_delta:g})"
    if tolerances:
        reason += "; guards ok"
    if skipped:
        reason += f" (not compared, {ref_name} lacks: {', '.join(skipped)})"
    return Decision(True, reason, imp)
