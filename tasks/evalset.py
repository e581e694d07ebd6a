"""What evaluation scores, and one model's per-row scores on it.

Contract:
- `build(params, tokenizer, split="test") -> EvalSet`: the selected rows of `data/processed/<split>` (a seeded
  subset of `evaluate.max_samples`), tokenised once, the same way for every model scored on
  them: base, candidate adapter and (at the gate) the champion. Label names are scored with
  `encoding.encode_pair` exactly as training tokenised them.
- `load_scoring_model(params, base, label_names, device, dtype)`: how every model is scored; where
  (`device`, `dtype`) comes from `devices.torch_placement(params.train)`, as training ran.
- `measure(model, es, params, tokenizer, device, which) -> Measured`: the per-row table of one
  model (columns described in tasks/metrics.py) and its generated text per row. One code path
  for every model, so their figures are comparable row by row.
- `fingerprint(es, params, base_weights_sha256) -> str`: what makes two per-row tables comparable.
Raises DataError (via tasks/processed.py) when the processed data or label names are missing or bad.

Label scoring (instruction format with label names as responses, and classification heads)
gives three predictions per row: `pred` (summed log-likelihood of the label name: what training
optimises), `pred_norm` (mean per token: no bias towards short names) and `pred_cal` (contextual
calibration, Zhao et al. 2021: label probabilities divided by those of content-free prompts,
which removes the model's prior over labels). `majority` is the train split's most frequent
label. The gate compares the adapter with the strongest of these on the same rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from tasks import encoding, models, processed, scoring
from tasks.config import Params
from tasks.errors import DataError

CONTENT_FREE = ("N/A", "")  # content-free inputs for calibration (Zhao et al. use "N/A", "", "[MASK]")


@dataclass
class EvalSet:
    """The selected test rows, pre-tokenised once for every model scored on them."""

    rows: list[int]  # indices into the test split
    prompts: list[str]
    targets: list[str]
    labels: np.ndarray  # class id per row, -1 if none
    label_names: list[str]
    majority: int  # most frequent train label (-1 without labels)
    sequences: list[tuple[list[int], list[int]]]  # (input_ids, labels) per row as preprocessed
    generative: bool  # references are free text: generate on every row, score with tasks/textmetrics.py
    gen_rows: list[int] = field(default_factory=list)  # positions (into rows) that are generated
    gen_prompts: list[list[int]] = field(default_factory=list)
    label_pairs: list[list[tuple[list[int], list[int]]]] = field(default_factory=list)  # [row][label]
    content_free: list[list[tuple[list[int], list[int]]]] = field(default_factory=list)  # [prompt][label]
    class_inputs: list[list[int]] = field(default_factory=list)  # content-free inputs of a class head
    pairs: list = field(default_factory=list)  # preference: (chosen, rejected) sequences (tasks/preference_eval.py)


def first_rows(es: EvalSet, k: int) -> EvalSet:
    """The first k rows of `es`, every per-row field cut alike (a new field per row must be cut here too)."""
    keep = [j for j, pos in enumerate(es.gen_rows) if pos < k]
    return dataclasses.replace(
        es, rows=es.rows[:k], prompts=es.prompts[:k], targets=es.targets[:k], labels=es.labels[:k],
        sequences=es.sequences[:k], label_pairs=es.label_pairs[:k], pairs=es.pairs[:k],
        gen_rows=[es.gen_rows[j] for j in keep], gen_prompts=[es.gen_prompts[j] for j in keep])


@dataclass(frozen=True)
class Measured:
    cols: dict[str, np.ndarray]  # per-row table (tasks/metrics.py)
    outputs: list[str]  # generated text per row ("" where not generated)


def select_rows(n_total: int, k: int | None, seed: int) -> list[int]:
    """A deterministic subset of k row indices (all rows when k is None or >= n_total), in order.

    Drawn at random with a fixed seed rather than taking the first k, because a split can be
    ordered (by group or label) and the first k rows would then be a biased sample.
    """
    if k is None or k >= n_total:
        return list(range(n_total))
    return sorted(np.random.default_rng(seed).choice(n_total, size=k, replace=False).tolist())


def fingerprint(es: EvalSet, params: Params, base_weights_sha256: str) -> str:
    """sha256 of what decides a per-row table: the scored rows (tokens, labels, references), the
    label names, the base weights and the scoring settings. Two evaluations with the same
    fingerprint scored the same rows the same way, so their per-row tables compare row by row."""
    import hashlib
    import json

    cfg = params.evaluate
    h = hashlib.sha256(json.dumps({
        "base": base_weights_sha256, "format": params.preprocess.format, "label_names": es.label_names,
        "rows": es.rows, "max_new_tokens": cfg.max_new_tokens, "generation_samples": cfg.generation_samples,
        "device": params.train.device, "precision": params.train.precision,
    }, sort_keys=True).encode())
    for (ids, labels), prompt, target in zip(es.sequences, es.prompts, es.targets):
        h.update(json.dumps([ids, labels, prompt, target]).encode())
    if es.pairs:  # the rejected side, beta and the objective's implied reward decide the preference columns too
        from tasks import preference_eval

        rule = preference_eval.reward_rule(params.train.objective)
        h.update(json.dumps([es.pairs, params.train.beta, rule]).encode())
    h.update(es.labels.tobytes())
    return h.hexdigest()


def is_generative(params: Params) -> bool:
    """Free-text references: chat, and instruction with a response column."""
    fmt = params.preprocess.format
    return fmt == "chat" or (fmt == "instruction" and bool(params.preprocess.response_field))


def _majority(root, label_names: list[str]) -> int:
    counts = (processed.preprocess_report(root).get("rows_per_label") or {}).get("train") or {}
    counts = {name: n for name, n in counts.items() if name in label_names}
    return label_names.index(max(counts, key=lambda k: (counts[k], -label_names.index(k)))) if counts else -1


def build(params: Params, tokenizer, split: str = "test") -> EvalSet:
    cfg, pre = params.evaluate, params.preprocess
    causal = pre.format != "classification"
    names = processed.label_names(params.root)
    test = processed.read_split(params.root, split, {"input_ids", "prompt", "target", "label"}
                                | ({"labels"} if causal else set()))
    rows = select_rows(len(test), cfg.max_samples, pre.split.seed)
    sub = test.select(rows)
    labels = np.array([int(x) for x in sub["label"]], dtype=np.int64)
    bad = sorted({int(x) for x in labels if not -1 <= x < len(names)})
    if bad:
        raise DataError(f"data/processed/{split} has label ids {bad} outside label_names {names}; re-run preprocess")
    input_ids = [list(x) for x in sub["input_ids"]]
    seq_labels = [list(x) for x in sub["labels"]] if causal else [[] for _ in input_ids]
    if causal and any(len(i) != len(lab) for i, lab in zip(input_ids, seq_labels)):
        raise DataError(f"data/processed/{split} has rows whose input_ids and labels differ in length; re-run preprocess")
    es = EvalSet(rows=rows, prompts=list(sub["prompt"]), targets=list(sub["target"]), labels=labels,
                 label_names=names, majority=_majority(params.root, names) if names else -1,
                 sequences=list(zip(input_ids, seq_labels)), generative=is_generative(params))
    if causal:
        _add_generation(es, params, tokenizer)
    if pre.format == "preference" and pre.preference.rows == "pairs":  # unpaired (KTO) rows: no pair to rank
        from tasks import preference_eval

        pair_split = processed.read_split(params.root, split, set(preference_eval.COLUMNS))
        es.pairs = preference_eval.pairs(pair_split.select(rows))
    if names and pre.format == "instruction":  # label names are the responses only there
        _add_label_pairs(es, params, tokenizer)
    elif names:
        es.class_inputs = [_class_input(tokenizer, params, text) for text in CONTENT_FREE]
    return es


def _add_generation(es: EvalSet, params: Params, tokenizer) -> None:
    n = len(es.rows) if es.generative else min(len(es.rows), params.evaluate.generation_samples)
    es.gen_rows = [k for k in range(n) if es.targets[k].strip()]
    es.gen_prompts = [_prompt_ids(es, k, params, tokenizer) for k in es.gen_rows]


def _prompt_ids(es: EvalSet, k: int, params: Params, tokenizer) -> list[int]:
    """The tokens generation starts from: what the row's training sequence has before the reply."""
    if params.preprocess.format == "chat":  # several supervised turns: the rendered prompt is the context
        return encoding.token_ids(tokenizer, es.prompts[k])[-params.preprocess.max_length:]
    ids, labels = es.sequences[k]
    n = next((j for j, lab in enumerate(labels) if lab != encoding.IGNORE), len(ids))
    return list(ids[:n]) or encoding.token_ids(tokenizer, es.prompts[k])[-params.preprocess.max_length:] or ids[:1]


def _add_label_pairs(es: EvalSet, params: Params, tokenizer) -> None:
    from tasks.preprocess import render_prompt  # lazily: the content-free prompt renders like training's

    pre = params.preprocess
    reserve = encoding.label_reserve(tokenizer, es.label_names)

    def pairs(prompt: str):
        return [tuple(map(list, encoding.encode_pair(tokenizer, prompt, name, pre.max_length, reserve)))
                for name in es.label_names]

    es.label_pairs = [pairs(p) for p in es.prompts]
    es.content_free = [pairs(render_prompt(tokenizer, pre, dict.fromkeys(pre.text_fields, text)))
                       for text in CONTENT_FREE]


def _class_input(tokenizer, params: Params, text: str) -> list[int]:
    from tasks.preprocess import render_prompt

    pre = params.preprocess
    return tokenizer(render_prompt(tokenizer, pre, dict.fromkeys(pre.text_fields, text)),
                     add_special_tokens=True)["input_ids"][: pre.max_length]


# ---------------------------------------------------------------- one model's per-row scores


def load_scoring_model(params: Params, base: models.BaseModel, label_names: list[str], device, dtype):
    """The base model for scoring, in eval mode on `device`; a fresh class head is seeded, so it
    is the same in every run (and for every model scored on the same rows)."""
    import torch

    classification = params.preprocess.format == "classification"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = models.load_model(base, classification_labels=len(label_names) if classification else None,
                                  dtype=dtype, trust_remote_code=params.model.trust_remote_code)
    return model.to(device).eval()




def measure(model, es: EvalSet, params: Params, tokenizer, device, which: str) -> Measured:
    """Per-row table of one model on the evaluation set (the one code path for every model)."""
    cfg = params.evaluate
    n = len(es.rows)
    cols: dict[str, np.ndarray] = {"label": es.labels}
    if es.label_names:
        cols["majority"] = np.full(n, es.majority, dtype=np.int64)
    common = dict(batch_size=cfg.batch_size, pad_id=tokenizer.pad_token_id, device=device)
    if params.preprocess.format == "classification":
        cols.update(_class_head(model, es, common, which))
    else:
        known = {}
        if es.label_pairs:
            label_cols, known = _label_likelihood(model, es, common, which)
            cols.update(label_cols)
        rest = [seq for seq in es.sequences if _key(seq) not in known]  # a test row is usually a label pair
        if rest:
            known.update(zip(map(_key, rest), scoring.sequence_nll(model, rest, desc=f"{which}: loss", **common)))
        nll = [known[_key(seq)] for seq in es.sequences]
        cols["nll_sum"] = np.array([s for s, _, _ in nll], dtype=np.float64)
        cols["n_tokens"] = np.array([c for _, c, _ in nll], dtype=np.int64)
        if es.pairs:
            from tasks import preference_eval

            cols.update(preference_eval.measure(model, es.pairs, params.train.beta, common, which,
                                                params.train.objective))
    outputs = [""] * n
    if es.gen_rows:
        texts = scoring.generate(model, es.gen_prompts, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                                 tokenizer=tokenizer, device=device, stop_ids=stop_ids(tokenizer),
                                 desc=f"{which}: generate")
        for k, text in zip(es.gen_rows, texts):
            outputs[k] = text
        cols.update(_text_scores(es, texts))
    return Measured(cols, outputs)


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end a reply: eos, plus the chat template's end-of-turn token when it has one."""
    from tasks.chat import stop_token_ids

    return stop_token_ids(tokenizer)


def _key(pair) -> tuple:
    return tuple(pair[0]), tuple(pair[1])


def _text_scores(es: EvalSet, texts: list[str]) -> dict[str, np.ndarray]:
    from tasks import textmetrics

    refs = [es.targets[k] for k in es.gen_rows]
    per_row = (textmetrics.row_scores(texts, refs) if es.generative
               else {"exact_match": [textmetrics.exact_match(t, r) for t, r in zip(texts, refs)]})
    out = {}
    for name, values in per_row.items():
        col = np.full(len(es.rows), np.nan)
        col[es.gen_rows] = values
        out[name] = col
    return out


def _calibrated(scores: np.ndarray, content_free: np.ndarray) -> np.ndarray:
    """Argmax of log p(label | row) - log p(label | content-free), p normalised over the labels."""
    from scipy.special import log_softmax, logsumexp

    prior = logsumexp(log_softmax(content_free, axis=1), axis=0) - np.log(len(content_free))
    return (log_softmax(scores, axis=1) - prior).argmax(axis=1)


def _label_likelihood(model, es: EvalSet, common: dict, which: str):
    """pred / pred_norm / pred_cal columns of label-name scoring, and every scored pair's NLL."""
    groups = es.label_pairs + es.content_free
    per_row = scoring.label_nll(model, groups, desc=f"{which}: label log-likelihood", **common)
    # The verbalizer is the label name: its tokens, not the end-of-turn token that follows every
    # label alike (which would reward whichever word the model expects to end a turn).
    loglik = -np.array([[total - last if n > 1 else total for total, n, last in row] for row in per_row])
    n_tokens = np.array([[max(n - 1, 1) for _, n, _ in row] for row in per_row])
    rows, cf = slice(0, len(es.label_pairs)), slice(len(es.label_pairs), None)
    cols = {"pred": loglik[rows].argmax(axis=1), "pred_norm": (loglik[rows] / n_tokens[rows]).argmax(axis=1),
            "pred_cal": _calibrated(loglik[rows], loglik[cf])}
    known = {_key(pair): sc for pairs, row in zip(es.label_pairs, per_row) for pair, sc in zip(pairs, row)}
    return cols, known


def _class_head(model, es: EvalSet, common: dict, which: str) -> dict[str, np.ndarray]:
    from scipy.special import log_softmax

    inputs = [s[0] for s in es.sequences] + es.class_inputs
    logits = scoring.class_logits(model, inputs, desc=f"{which}: classify", **common)
    rows, cf = logits[: len(es.sequences)], logits[len(es.sequences):]
    logp = log_softmax(rows, axis=1)
    labeled = es.labels >= 0
    nll = np.where(labeled, -logp[np.arange(len(rows)), np.where(labeled, es.labels, 0)], 0.0)
    return {"pred": rows.argmax(axis=1), "pred_cal": _calibrated(rows, cf), "nll_sum": nll,
            "n_tokens": labeled.astype(np.int64)}
