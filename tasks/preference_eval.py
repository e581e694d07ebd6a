"""Evaluation on held-out preference pairs: one model's per-row preference columns.

Contract:
- `pairs(split) -> [(chosen, rejected)]`: each row's two scored sequences, (input_ids, labels)
  with labels -100 on the shared prompt, from the processed columns tasks/preference.py wrote:
  exactly the tokens DPO trained on.
- `measure(model, pairs, beta, common, which) -> {column: array}`: the per-row columns below, for
  the base model or a PeftModel (whose reference pass runs with its adapter off: the base).

Per-row columns (log-probabilities summed over the response tokens, end-of-turn included):
- `chosen_logp`, `rejected_logp`: the model's own log p(response | prompt);
- `reward_margin`: DPO's implied reward margin against the base,
  beta * ((chosen_logp - base chosen_logp) - (rejected_logp - base rejected_logp));
  0 on every row for the base itself (it is its own reference);
- `pref_margin`: the score the model ranks the pair by: `reward_margin` for an adapter, and for
  the base (whose implied reward is 0 everywhere, so it cannot rank by it) its log-probability
  margin `chosen_logp - rejected_logp`.
Metrics of these columns (tasks/metrics.py): `preference_accuracy` = share of rows with
`pref_margin` > 0 (adapter: its implied reward ranks chosen first; base: it finds chosen
likelier), `logp_accuracy` = share with `chosen_logp` > `rejected_logp` (the same rule for every
model), `reward_margin` = mean implied reward margin (0 for the base).
"""

from __future__ import annotations

import numpy as np

from tasks import scoring

IGNORE = -100
COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def pairs(split) -> list[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]]:
    out = []
    for p, c, r in zip(split["prompt_ids"], split["chosen_ids"], split["rejected_ids"]):
        p, c, r = list(p), list(c), list(r)
        masked = [IGNORE] * len(p)
        out.append(((p + c, masked + c), (p + r, masked + r)))
    return out


def _logps(model, pairs_, common: dict, desc: str) -> tuple[np.ndarray, np.ndarray]:
    seqs = [s for pair in pairs_ for s in pair]
    nll = scoring.sequence_nll(model, seqs, desc=desc, **common)
    logp = -np.array([total for total, _, _ in nll], dtype=np.float64)
    return logp[0::2], logp[1::2]


def measure(model, pairs_, beta: float, common: dict, which: str) -> dict[str, np.ndarray]:
    chosen, rejected = _logps(model, pairs_, common, f"{which}: preference log-probs")
    if hasattr(model, "disable_adapter"):  # a PeftModel: the reference is the base, adapter off
        with model.disable_adapter():
            ref_chosen, ref_rejected = _logps(model, pairs_, common, f"{which}: reference log-probs")
        margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        ranked_by = margin
    else:
        margin = np.zeros_like(chosen)
        ranked_by = chosen - rejected
    return {"chosen_logp": chosen, "rejected_logp": rejected, "reward_margin": margin, "pref_margin": ranked_by}
