"""Stage `evaluate`: score the base model and base + adapter on the test split, the same way.

Reads: `data/processed/` (split `test`), `reports/preprocess.json` (`label_names`), `models/adapter/`,
the base model (`model:`), and `evaluate:` params.
Writes (atomically): `reports/evaluate.json`, `reports/predictions.csv`, `reports/confusion_matrix.png`.
Raises: DataError (processed data or label names missing/bad), ModelError (adapter missing, for a
different base, or unloadable).

One code path scores both models: the base is loaded and scored, then the adapter is loaded on top
of that same model object (`PeftModel.from_pretrained`) and scored again; `lift = adapter - base`.

Metrics per model:
- `loss` / `perplexity`: mean token negative log-likelihood over `labels != -100` of the test rows
  (causal LM), or cross-entropy of the class head (classification);
- `accuracy`, `f1_macro`: causal LM scores every label name as the response by its summed
  log-likelihood given the prompt, tokenised by `tasks.preprocess.encode_pair` exactly as in
  training, and predicts the best; classification takes the argmax of the head;
- `exact_match`: greedy generation on `generation_samples` rows, stripped text == stripped target.
A metric that does not apply (no labels, or no targets to generate) is null.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks import atomic, layout, metrics, models
from tasks.adapters import attach_adapter, check_adapter
from tasks.config import Params
from tasks.errors import DataError

METRICS = ("accuracy", "f1_macro", "loss", "perplexity", "exact_match")


@dataclass(frozen=True)
class EvaluateResult:
    base: dict
    adapter: dict
    lift: dict
    n_samples: int
    label_names: tuple[str, ...]
    report: str


# ---------------------------------------------------------------- inputs


def read_label_names(params: Params) -> list[str]:
    """`label_names` from reports/preprocess.json ([] when the data has no class labels)."""
    path = params.root / layout.report("preprocess")
    try:
        names = json.loads(path.read_text()).get("label_names") or []
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is missing or unreadable ({err}); run `python -m tasks preprocess` first") from None
    if not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: label_names must be a list of strings, got {names!r}")
    return list(names)


def load_test_split(params: Params):
    """The `test` split of data/processed/ as a datasets.Dataset."""
    from datasets import load_from_disk

    path = params.root / layout.PROCESSED
    try:
        data = load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path} ({err}); run `python -m tasks preprocess` first") from None
    if "test" not in data:
        raise DataError(f"{path} has no 'test' split (has {list(data)}); re-run `python -m tasks preprocess`")
    test = data["test"]
    if len(test) == 0:
        raise DataError(f"{path}/test is empty; raise preprocess.split.test or use more data")
    return test


def select_rows(n_total: int, k: int | None, seed: int) -> list[int]:
    """A deterministic subset of k row indices (all rows when k is None or >= n_total), in order.

    Drawn at random with a fixed seed rather than taking the first k, because a split can be
    ordered (by group or label) and the first k rows would then be a biased sample.
    """
    if k is None or k >= n_total:
        return list(range(n_total))
    return sorted(np.random.default_rng(seed).choice(n_total, size=k, replace=False).tolist())


def device_and_dtype():
    """CUDA in bf16 when present, else CPU in fp32."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


# ---------------------------------------------------------------- batched scoring


def _right_pad(seqs: list[list[int]], pad_id: int, device):
    """Right padding: real tokens keep positions 0..n-1, so no position ids are needed."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _batches(order: list[int], size: int):
    for start in range(0, len(order), size):
        yield order[start : start + size]


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", leave=False)


def sequence_nll(model, seqs: list[tuple[list[int], list[int]]], *, batch_size: int, pad_id: int, device,
                 desc: str) -> list[tuple[float, int, float]]:
    """(sum of token NLL over labels != -100, number of such tokens, NLL of the last such token)
    per (input_ids, labels) pair.

    Identical pairs are scored once. Logits are sliced to the last L positions because prompt
    learning methods prepend virtual tokens to the output.
    """
    import torch

    unique = list(dict.fromkeys((tuple(i), tuple(lab)) for i, lab in seqs))
    order = sorted(range(len(unique)), key=lambda j: len(unique[j][0]))  # similar lengths share a batch
    scores: dict[int, tuple[float, int, float]] = {}
    with torch.no_grad(), _progress(len(unique), desc) as bar:
        for batch in _batches(order, batch_size):
            ids, mask = _right_pad([list(unique[j][0]) for j in batch], pad_id, device)
            labels = torch.full_like(ids, -100)
            for row, j in enumerate(batch):
                labels[row, : len(unique[j][1])] = torch.tensor(unique[j][1], dtype=torch.long)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:, :]
            target = labels[:, 1:]
            keep = target != -100
            picked = logits[:, :-1, :][keep].float()  # only scored positions go through log_softmax
            nll = -torch.log_softmax(picked, dim=-1).gather(1, target[keep].unsqueeze(1)).squeeze(1)
            per_row = torch.zeros(len(batch), dtype=torch.float64, device=nll.device)
            per_row.index_add_(0, keep.nonzero()[:, 0], nll.double())
            counts = keep.sum(dim=1)
            last = torch.zeros(len(batch), dtype=torch.float64, device=nll.device)
            last[keep.nonzero()[:, 0]] = nll.double()  # row-major order: the last write is the last token
            for row, j in enumerate(batch):
                scores[j] = (float(per_row[row]), int(counts[row]), float(last[row]))
            bar.update(len(batch))
    index = {key: j for j, key in enumerate(unique)}
    return [scores[index[(tuple(i), tuple(lab))]] for i, lab in seqs]


def _key(pair: tuple[list[int], list[int]]) -> tuple:
    return tuple(pair[0]), tuple(pair[1])


def shares_prompt_cache(model) -> bool:
    """Whether responses can reuse a prompt's key/value cache (prompt learning re-prepends its
    virtual tokens on every call, so it cannot)."""
    config = getattr(model, "active_peft_config", None)
    return not (config is not None and config.is_prompt_learning)


def _prompt_and_responses(pairs) -> tuple[list[int], list[list[int]]] | None:
    """(shared prompt ids, response ids per pair) when every pair is that prompt followed by a
    wholly supervised, non-empty response; None otherwise (e.g. truncation cut prompts apart)."""
    starts = [next((k for k, lab in enumerate(labels) if lab != -100), len(ids)) for ids, labels in pairs]
    prompt = list(pairs[0][0][: starts[0]])
    if not prompt:
        return None
    responses = []
    for (ids, labels), s in zip(pairs, starts):
        if s == len(ids) or list(ids[:s]) != prompt or list(labels[s:]) != list(ids[s:]):
            return None
        responses.append(list(ids[s:]))
    return prompt, responses


def label_nll(model, groups: list[list[tuple[list[int], list[int]]]], *, batch_size: int, pad_id: int, device,
              desc: str) -> list[list[tuple[float, int, float]]]:
    """`sequence_nll` of every pair of each group, where a group holds one prompt with each label
    name as the response (all groups have the same number of pairs).

    A batch of prompts (left-padded, explicit position ids) runs once; all responses of each
    prompt then go through its key/value cache in one batched call. That scores a row's labels
    for about the price of one sequence, batched (one row at a time measured ~20x slower on a
    2-core CPU). Groups that do not split into prompt + responses, and models that cannot reuse
    a cache, take `sequence_nll`. Equal to `sequence_nll` within float rounding (tested).
    """
    import torch

    results: list = [None] * len(groups)
    splits = {r: _prompt_and_responses(pairs) for r, pairs in enumerate(groups)} if shares_prompt_cache(model) else {}
    cached = sorted((r for r, sp in splits.items() if sp is not None), key=lambda r: len(splits[r][0]))
    full = [r for r in range(len(groups)) if splits.get(r) is None]
    with torch.no_grad(), _progress(len(cached), desc) as bar:
        for batch in _batches(cached, batch_size):
            prompts = [splits[r][0] for r in batch]
            conts = [splits[r][1] for r in batch]
            n = len(conts[0])
            width = max(map(len, prompts))
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, p in enumerate(prompts):
                ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[i, width - len(p):] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                        use_cache=True)
            first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
            sums = [[-float(first[i, c[0]]) for c in row] for i, row in enumerate(conts)]
            lasts = [list(row) for row in sums]  # NLL of each response's last token
            tail = max(len(c) for row in conts for c in row) - 1
            if tail > 0:  # feed each response but its last token, after the cached prompt
                cache = out.past_key_values
                cache.batch_repeat_interleave(n)
                cids = torch.full((len(batch) * n, tail), pad_id, dtype=torch.long)
                cmask = torch.zeros((len(batch) * n, width + tail), dtype=torch.long)
                cmask[:, :width] = mask.repeat_interleave(n, dim=0)
                for i, row in enumerate(conts):
                    for j, c in enumerate(row):
                        cids[i * n + j, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
                        cmask[i * n + j, width : width + len(c) - 1] = 1
                cpos = pos[:, -1:].repeat_interleave(n, dim=0) + 1 + torch.arange(tail)
                logits = model(input_ids=cids.to(device), attention_mask=cmask.to(device),
                               position_ids=cpos.to(device), past_key_values=cache).logits
                logp = torch.log_softmax(logits.float(), dim=-1)
                for i, row in enumerate(conts):
                    for j, c in enumerate(row):
                        steps = torch.arange(len(c) - 1, device=logp.device)
                        token_nll = -logp[i * n + j, steps, torch.tensor(c[1:], device=logp.device)]
                        sums[i][j] += float(token_nll.sum())
                        if len(c) > 1:
                            lasts[i][j] = float(token_nll[-1])
            for i, r in enumerate(batch):
                results[r] = [(s, len(c), last) for s, c, last in zip(sums[i], conts[i], lasts[i])]
            bar.update(len(batch))
    if full:
        flat = sequence_nll(model, [pair for r in full for pair in groups[r]], batch_size=batch_size, pad_id=pad_id,
                            device=device, desc=f"{desc} (full sequences)")
        n = len(groups[full[0]])
        for k, r in enumerate(full):
            results[r] = flat[k * n : (k + 1) * n]
    return results


def class_logits(model, seqs: list[list[int]], *, batch_size: int, pad_id: int, device, desc: str) -> np.ndarray:
    """[n, n_classes] float64 logits of a sequence-classification model."""
    import torch

    order = sorted(range(len(seqs)), key=lambda j: len(seqs[j]))
    rows: dict[int, np.ndarray] = {}
    with torch.no_grad(), _progress(len(seqs), desc) as bar:
        for batch in _batches(order, batch_size):
            ids, mask = _right_pad([seqs[j] for j in batch], pad_id, device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float().cpu().numpy().astype(np.float64)
            for row, j in enumerate(batch):
                rows[j] = logits[row]
            bar.update(len(batch))
    return np.stack([rows[j] for j in range(len(seqs))])


def generate(model, prompts: list[list[int]], *, batch_size: int, max_new_tokens: int, tokenizer, device,
             desc: str) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped, stripped) of each prompt.

    Left padding so every row's next token comes right after its prompt; `generate` derives the
    position ids from the attention mask.
    """
    import torch

    texts: list[str] = [""] * len(prompts)
    pad_id = tokenizer.pad_token_id
    with torch.no_grad(), _progress(len(prompts), desc) as bar:
        for batch in _batches(list(range(len(prompts))), batch_size):
            width = max(len(prompts[j]) for j in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, j in enumerate(batch):
                n = len(prompts[j])
                ids[row, width - n :] = torch.tensor(prompts[j], dtype=torch.long)
                mask[row, width - n :] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                 eos_token_id=tokenizer.eos_token_id)
            for row, j in enumerate(batch):
                texts[j] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
            bar.update(len(batch))
    return texts


# ---------------------------------------------------------------- the evaluation set


@dataclass
class EvalSet:
    """The selected test rows, pre-tokenised once for both models."""

    rows: list[int]
    prompts: list[str]
    targets: list[str]
    labels: list[int]  # class id per row, -1 if none
    sequences: list[tuple[list[int], list[int]]]  # (input_ids, labels) per row as preprocessed
    gen_prompts: list[list[int]]  # prompt token ids for the generated rows
    label_pairs: list[list[tuple[list[int], list[int]]]] = field(default_factory=list)  # [row][label]


def _prompt_ids(encode_pair, tokenizer, prompt: str, target: str, max_length: int) -> list[int]:
    # The prompt part of a training pair: the tokens before the first supervised position.
    ids, labels = encode_pair(tokenizer, prompt, target, max_length)
    n = next((k for k, lab in enumerate(labels) if lab != -100), len(ids))
    if n == 0:  # plain text format supervises every token: generate from the prompt text alone
        return tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_length:] or ids[:1]
    return list(ids[:n])


def build_eval_set(params: Params, tokenizer, label_names: list[str]) -> EvalSet:
    cfg = params.evaluate
    test = load_test_split(params)
    causal = params.preprocess.format != "classification"
    needed = {"input_ids", "prompt", "target", "label"} | ({"labels"} if causal else set())
    missing = needed - set(test.column_names)
    if missing:
        raise DataError(f"data/processed/test lacks column(s) {sorted(missing)}; re-run `python -m tasks preprocess`")
    rows = select_rows(len(test), cfg.max_samples, params.preprocess.split.seed)
    sub = test.select(rows)
    labels = [int(x) for x in sub["label"]]
    bad = sorted({x for x in labels if not -1 <= x < len(label_names)})
    if bad:
        raise DataError(f"data/processed/test has label ids {bad} outside label_names {label_names}; re-run preprocess")
    input_ids = [list(x) for x in sub["input_ids"]]
    seq_labels = [list(x) for x in sub["labels"]] if causal else [[] for _ in input_ids]
    if any(len(i) != len(lab) for i, lab in zip(input_ids, seq_labels) if causal):
        raise DataError("data/processed/test has rows whose input_ids and labels differ in length; re-run preprocess")
    es = EvalSet(rows=rows, prompts=list(sub["prompt"]), targets=list(sub["target"]), labels=labels,
                 sequences=list(zip(input_ids, seq_labels)), gen_prompts=[])
    if causal:
        from tasks.preprocess import encode_pair  # lazily: preprocess pulls in the data stack

        n_gen = min(len(rows), max(cfg.generation_samples, cfg.sample_predictions))
        es.gen_prompts = [_prompt_ids(encode_pair, tokenizer, es.prompts[k], es.targets[k], params.preprocess.max_length)
                          for k in range(n_gen)]
        if label_names and params.preprocess.format == "instruction":  # label names are responses only there
            es.label_pairs = [[tuple(map(list, encode_pair(tokenizer, p, name, params.preprocess.max_length)))
                               for name in label_names] for p in es.prompts]
    return es


# ---------------------------------------------------------------- scoring one model


@dataclass(frozen=True)
class Scores:
    metrics: dict
    predicted: list[int]  # predicted class id per row ([] without labels)
    outputs: list[str]  # text shown in the predictions table per generated/sampled row


def score(model, es: EvalSet, params: Params, tokenizer, label_names: list[str], device, which: str) -> Scores:
    """All metrics of one model on the evaluation set (the one code path for base and adapter)."""
    cfg = params.evaluate
    pad_id = tokenizer.pad_token_id
    out = dict.fromkeys(METRICS)
    labeled = [k for k, lab in enumerate(es.labels) if lab >= 0]
    predicted: list[int] = []
    outputs: list[str] = []
    if params.preprocess.format == "classification":
        import torch

        logits = class_logits(model, [s[0] for s in es.sequences], batch_size=cfg.batch_size, pad_id=pad_id,
                              device=device, desc=f"{which}: classify")
        predicted = logits.argmax(axis=1).tolist()
        if labeled:
            lp = torch.log_softmax(torch.from_numpy(logits[labeled]), dim=1)
            out["loss"] = float(-lp[torch.arange(len(labeled)), torch.tensor([es.labels[k] for k in labeled])].mean())
        outputs = [label_names[p] for p in predicted[: cfg.sample_predictions]]
    else:
        known: dict[tuple, tuple[float, int, float]] = {}
        if es.label_pairs:
            per_row = label_nll(model, es.label_pairs, batch_size=cfg.batch_size, pad_id=pad_id, device=device,
                                desc=f"{which}: label log-likelihood")
            # The verbalizer is the label name: its tokens, not the end-of-turn token that follows
            # every label alike (which would reward whichever word the base expects to end a turn).
            loglik = -np.array([[total - last if n > 1 else total for total, n, last in row] for row in per_row])
            predicted = loglik.argmax(axis=1).tolist()
            known = {_key(pair): sc for pairs, row in zip(es.label_pairs, per_row) for pair, sc in zip(pairs, row)}
        # A test row is usually its true label's pair, already scored above.
        rest = [seq for seq in es.sequences if _key(seq) not in known]
        if rest:
            known.update(zip(map(_key, rest), sequence_nll(model, rest, batch_size=cfg.batch_size, pad_id=pad_id,
                                                            device=device, desc=f"{which}: loss")))
        nll = [known[_key(seq)] for seq in es.sequences]
        tokens = sum(n for _, n, _ in nll)
        out["loss"] = sum(s for s, _, _ in nll) / tokens if tokens else None
        if es.gen_prompts:
            outputs = generate(model, es.gen_prompts, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                               tokenizer=tokenizer, device=device, desc=f"{which}: generate")
            n_em = min(cfg.generation_samples, len(outputs))
            if n_em and any(t.strip() for t in es.targets[:n_em]):
                out["exact_match"] = sum(outputs[k] == es.targets[k].strip() for k in range(n_em)) / n_em
    if out["loss"] is not None:
        out["perplexity"] = metrics.perplexity(out["loss"])
    if predicted and labeled:
        y_true = [es.labels[k] for k in labeled]
        y_pred = [predicted[k] for k in labeled]
        out["accuracy"] = metrics.accuracy(y_true, y_pred)
        out["f1_macro"] = metrics.f1_macro(y_true, y_pred, len(label_names))
    return Scores(out, predicted, outputs)


def lift(base: dict, adapter: dict) -> dict:
    """adapter - base for every metric both have (null otherwise)."""
    return {k: (adapter[k] - base[k] if adapter.get(k) is not None and base.get(k) is not None else None)
            for k in METRICS}


# ---------------------------------------------------------------- outputs


def _predictions_csv(es: EvalSet, base: Scores, adapter: Scores, label_names: list[str], n: int) -> str:
    has_labels = bool(label_names) and bool(base.predicted)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["input", "expected", "base_output", "adapter_output"]
    if has_labels:
        header += ["base_label", "adapter_label"]
    writer.writerow(header)
    for k in range(min(n, len(es.rows), len(base.outputs))):
        row = [es.prompts[k], es.targets[k], base.outputs[k], adapter.outputs[k]]
        if has_labels:
            row += [label_names[base.predicted[k]], label_names[adapter.predicted[k]]]
        writer.writerow(row)
    return buf.getvalue()


def _confusion_png(path: Path, es: EvalSet, predicted: list[int], label_names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labeled = [k for k, lab in enumerate(es.labels) if lab >= 0]
    size = max(3.0, 0.6 * len(label_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    if predicted and labeled:
        cm = metrics.confusion_matrix([es.labels[k] for k in labeled], [predicted[k] for k in labeled],
                                      len(label_names))
        ax.imshow(cm, cmap="Blues")
        ticks = range(len(label_names))
        ax.set_xticks(ticks, label_names, rotation=45, ha="right")
        ax.set_yticks(ticks, label_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        ax.set_title(f"adapter, {len(labeled)} test rows")
    else:
        # dvc.yaml names this file as an output, so it exists even when it cannot say anything.
        ax.axis("off")
        ax.text(0.5, 0.5, "no class labels:\nno confusion matrix", ha="center", va="center")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: stable bytes
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())


def _json_number(v):
    # JSON has no NaN/inf; record them as strings so the report stays valid JSON.
    return v if v is None or math.isfinite(v) else str(v)


# ---------------------------------------------------------------- stage entry point


def run(params: Params) -> EvaluateResult:
    """Evaluate base and base + adapter on the test split; write the report, table and plot."""
    import torch

    root = params.root
    adapter_dir = root / layout.ADAPTER
    base = models.resolve(params.model)
    peft_config = check_adapter(adapter_dir, base)  # fail before any scoring
    label_names = read_label_names(params)
    classification = params.preprocess.format == "classification"
    if classification and len(label_names) < 2:
        raise DataError(f"{root / layout.report('preprocess')} lists {len(label_names)} label names; "
                        "classification needs at least two; re-run preprocess")
    tokenizer = models.load_tokenizer(base, trust_remote_code=params.model.trust_remote_code)
    es = build_eval_set(params, tokenizer, label_names)
    device, dtype = device_and_dtype()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a freshly initialised class head is the same in every run
        model = models.load_model(base, classification_labels=len(label_names) if classification else None,
                                  dtype=dtype, trust_remote_code=params.model.trust_remote_code)
    model.to(device).eval()
    base_scores = score(model, es, params, tokenizer, label_names, device, "base")
    model = attach_adapter(model, adapter_dir, base).to(device)
    adapter_scores = score(model, es, params, tokenizer, label_names, device, "adapter")

    report = {
        "format": params.preprocess.format,
        "adapter_method": str(getattr(peft_config.peft_type, "value", peft_config.peft_type)),
        "base_model": base.spec,
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "n_samples": len(es.rows),
        "n_labeled": sum(lab >= 0 for lab in es.labels),
        "n_generated": min(params.evaluate.generation_samples, len(es.gen_prompts)),
        "label_names": label_names,
        "base": {k: _json_number(v) for k, v in base_scores.metrics.items()},
        "adapter": {k: _json_number(v) for k, v in adapter_scores.metrics.items()},
        "lift": {k: _json_number(v) for k, v in lift(base_scores.metrics, adapter_scores.metrics).items()},
    }
    atomic.write_text(root / layout.PREDICTIONS,
                      _predictions_csv(es, base_scores, adapter_scores, label_names, params.evaluate.sample_predictions))
    _confusion_png(root / layout.CONFUSION_MATRIX, es, adapter_scores.predicted, label_names)
    report_path = root / layout.report("evaluate")
    atomic.write_json(report_path, report)
    return EvaluateResult(base=report["base"], adapter=report["adapter"], lift=report["lift"],
                          n_samples=len(es.rows), label_names=tuple(label_names), report=str(report_path))
