"""Evaluation on held-out preference pairs: one model's per-row preference columns.

Contract:
- `pairs(split) -> [(chosen, rejected)]`: each row's two scored sequences, (input_ids, labels)
  with labels -100 on the shared prompt, from the processed columns tasks/preference.py wrote:
  exactly the tokens DPO trained on.
- `measure(model, pairs, beta, common, which, objective) -> {column: array}`: the per-row columns
  below, for the base model or a PeftModel (whose reference pass runs with its adapter off: the base).

Per-row columns (log-probabilities summed over the response tokens, end-of-turn included):
- `chosen_logp`, `rejected_logp`: the model's own log p(response | prompt);
- `reward_margin`: the objective's implied reward of chosen minus that of rejected.
  `dpo`, `kto` (and `sft`): against the base, beta * ((chosen_logp - base chosen_logp) -
  (rejected_logp - base rejected_logp)), TRL's DPO and KTO `rewards/*`; 0 on every row for the
  base itself (it is its own reference). `orpo` (reference-free): TRL's ORPO reward, beta times
  the per-token mean log-probability of the response, so the margin is beta * (mean chosen logp
  - mean rejected logp), defined for the base too (the same rule for both models);
- `pref_margin`: the score the model ranks the pair by: `reward_margin`, except for the base
  under a reference-based objective (whose implied reward is 0 everywhere, so it cannot rank by
  it): its log-probability margin `chosen_logp - rejected_logp`.
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


def reward_rule(objective: str) -> str:
    """How the implied reward is computed for `objective`: "policy" (ORPO, reference-free) or
    "reference" (against the base); the columns of one model depend on it, not on the objective."""
    return "policy" if objective == "orpo" else "reference"


def _logps(model, pairs_, common: dict, desc: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(chosen logp, rejected logp, chosen tokens, rejected tokens) per pair."""
    seqs = [s for pair in pairs_ for s in pair]
    nll = scoring.sequence_nll(model, seqs, desc=desc, **common)
    logp = -np.array([total for total, _, _ in nll], dtype=np.float64)
    count = np.array([n for _, n, _ in nll], dtype=np.float64)
    return logp[0::2], logp[1::2], count[0::2], count[1::2]


def measure(model, pairs_, beta: float, common: dict, which: str, objective: str = "dpo") -> dict[str, np.ndarray]:
    chosen, rejected, n_chosen, n_rejected = _logps(model, pairs_, common, f"{which}: preference log-probs")
    if reward_rule(objective) == "policy":  # ORPO, reference-free: the same rule for the base and the adapter
        margin = beta * (chosen / n_chosen - rejected / n_rejected)
        ranked_by = margin
    elif hasattr(model, "disable_adapter"):  # a PeftModel: the reference is the base, adapter off
        with model.disable_adapter():
            ref_chosen, ref_rejected, _, _ = _logps(model, pairs_, common, f"{which}: reference log-probs")
        margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        ranked_by = margin
    else:
        margin = np.zeros_like(chosen)
        ranked_by = chosen - rejected
    return {"chosen_logp": chosen, "rejected_logp": rejected, "reward_margin": margin, "pref_margin": ranked_by}
