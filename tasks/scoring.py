"""Forward passes that score one model: sequence loss, label log-likelihood, class logits, generation.

Contract: every function takes a loaded model (eval mode, on `device`), token id lists and a
batch size, runs under `torch.no_grad()`, shows one progress bar, and returns plain Python /
numpy values in the order of its input. No files, no params: `tasks/evalset.py` decides what to
score, `tasks/evaluate.py` and the gate's champion check (`tasks/judge.py`) call it.
"""

from __future__ import annotations

import numpy as np

NLL = tuple[float, int, float]  # (sum of token NLL, number of tokens, NLL of the last token)


def pad(seqs: list[list[int]], pad_id: int, side: str = "right"):
    """(ids, attention mask) long tensors [len(seqs), longest], padded on `side`.

    Right padding keeps real tokens at positions 0..n-1 (no position ids needed); left padding puts
    every row's last real token in the last column (generation, prompt caches).
    """
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def batches(order: list[int], size: int):
    for start in range(0, len(order), size):
        yield order[start : start + size]


def progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", leave=False)


def sequence_nll(model, seqs: list[tuple[list[int], list[int]]], *, batch_size: int, pad_id: int, device,
                 desc: str) -> list[NLL]:
    """(sum of token NLL over labels != -100, number of such tokens, NLL of the last such token)
    per (input_ids, labels) pair.

    Identical pairs are scored once. Logits are sliced to the last L positions because prompt
    learning methods prepend virtual tokens to the output.
    """
    import torch

    unique = list(dict.fromkeys((tuple(i), tuple(lab)) for i, lab in seqs))
    order = sorted(range(len(unique)), key=lambda j: len(unique[j][0]))  # similar lengths share a batch
    scores: dict[int, NLL] = {}
    with torch.no_grad(), progress(len(unique), desc) as bar:
        for batch in batches(order, batch_size):
            ids, mask = pad([list(unique[j][0]) for j in batch], pad_id)
            labels, _ = pad([list(unique[j][1]) for j in batch], -100)
            ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:, :]
            target = labels[:, 1:]
            keep = target != -100
            picked = logits[:, :-1, :][keep].float()  # only scored positions go through log_softmax
            nll = -torch.log_softmax(picked, dim=-1).gather(1, target[keep].unsqueeze(1)).squeeze(1)
            rows = keep.nonzero()[:, 0]
            per_row = torch.zeros(len(batch), dtype=torch.float64, device=nll.device).index_add_(0, rows, nll.double())
            last = torch.zeros(len(batch), dtype=torch.float64, device=nll.device)
            last[rows] = nll.double()  # row-major order: the last write is the last token
            counts = keep.sum(dim=1)
            for row, j in enumerate(batch):
                scores[j] = (float(per_row[row]), int(counts[row]), float(last[row]))
            bar.update(len(batch))
    index = {key: j for j, key in enumerate(unique)}
    return [scores[index[(tuple(i), tuple(lab))]] for i, lab in seqs]


def shares_prompt_cache(model) -> bool:
    """Whether responses can reuse a prompt's key/value cache (prompt learning re-prepends its
    virtual tokens on every call, so it cannot)."""
    config = getattr(model, "active_peft_config", None)
    return not (config is not None and config.is_prompt_learning)


def split_prompt(pairs) -> tuple[list[int], list[list[int]]] | None:
    """(shared prompt ids, response ids per pair) when every pair is that prompt followed by a
    wholly supervised, non-empty response; None otherwise."""
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


def _cached_batch(model, prompts: list[list[int]], conts: list[list[list[int]]], pad_id: int, device) -> list[list[NLL]]:
    """NLL of every response of each prompt: the prompts run once (left-padded, explicit position
    ids), then all responses go through the prompts' key/value cache in one batched call."""
    import torch

    n = len(conts[0])
    ids, mask = pad(prompts, pad_id, side="left")
    width = ids.shape[1]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    # Only the last prompt position's logits are needed: skip the LM head elsewhere (a 49k-vocab head
    # over every prompt token is ~20% of the pass).
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), use_cache=True,
                logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    sums = [[-float(first[i, c[0]]) for c in row] for i, row in enumerate(conts)]
    lasts = [list(row) for row in sums]  # NLL of each response's last token
    tail = max(len(c) for row in conts for c in row) - 1
    if tail > 0:  # feed each response but its last token, after the cached prompt
        cache = out.cache
        cache.batch_repeat_interleave(n)
        flat = [c[:-1] for row in conts for c in row]
        cids, tail_mask = pad([c or [pad_id] for c in flat], pad_id)  # width = tail
        for k, c in enumerate(flat):
            if not c:  # a one-token response feeds nothing
                tail_mask[k] = 0
        cmask = torch.cat([mask.repeat_interleave(n, dim=0), tail_mask], dim=1)
        cpos = pos[:, -1:].repeat_interleave(n, dim=0) + 1 + torch.arange(tail)
        logits = model(input_ids=cids.to(device), attention_mask=cmask.to(device), position_ids=cpos.to(device),
                       cache=cache).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        for i, row in enumerate(conts):
            for j, c in enumerate(row):
                steps = torch.arange(len(c) - 1, device=logp.device)
                token_nll = -logp[i * n + j, steps, torch.tensor(c[1:], device=logp.device)]
                sums[i][j] += float(token_nll.sum())
                if len(c) > 1:
                    lasts[i][j] = float(token_nll[-1])
    return [[(s, len(c), last) for s, c, last in zip(sums[i], conts[i], lasts[i])] for i in range(len(conts))]


def label_nll(model, groups: list[list[tuple[list[int], list[int]]]], *, batch_size: int, pad_id: int, device,
              desc: str) -> list[list[NLL]]:
    """`sequence_nll` of every pair of each group, where a group holds one prompt with each label
    name as the response (all groups have the same number of pairs).

    Groups share their prompt across labels (`encoding.label_reserve` makes a cut prompt the same
    for every label), so a row's labels cost about one sequence, batched (one row at a time
    measured ~20x slower on a 2-core CPU). Groups that do not split into prompt + responses, and
    models that cannot reuse a cache, take `sequence_nll`. Equal to it within float rounding (tested).
    """
    import torch

    results: list = [None] * len(groups)
    splits = {r: split_prompt(pairs) for r, pairs in enumerate(groups)} if shares_prompt_cache(model) else {}
    cached = sorted((r for r, sp in splits.items() if sp is not None), key=lambda r: len(splits[r][0]))
    full = [r for r in range(len(groups)) if splits.get(r) is None]
    with torch.no_grad(), progress(len(cached), desc) as bar:
        for batch in batches(cached, batch_size):
            scored = _cached_batch(model, [splits[r][0] for r in batch], [splits[r][1] for r in batch], pad_id, device)
            for r, row in zip(batch, scored):
                results[r] = row
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
    with torch.no_grad(), progress(len(seqs), desc) as bar:
        for batch in batches(order, batch_size):
            ids, mask = pad([seqs[j] for j in batch], pad_id)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logits = logits.float().cpu().numpy().astype(np.float64)
            for row, j in enumerate(batch):
                rows[j] = logits[row]
            bar.update(len(batch))
    return np.stack([rows[j] for j in range(len(seqs))])


def generate(model, prompts: list[list[int]], *, batch_size: int, max_new_tokens: int, tokenizer, device,
             stop_ids: list[int], desc: str) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped, stripped) of each prompt, stopping
    at any of `stop_ids` (end of turn) or after `max_new_tokens`.

    Left padding so every row's next token comes right after its prompt; `generate` derives the
    position ids from the attention mask and reuses its key/value cache. Prompts of similar length
    share a batch (less padding).
    """
    import torch

    texts: list[str] = [""] * len(prompts)
    pad_id = tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda j: len(prompts[j]))
    with torch.no_grad(), progress(len(prompts), desc) as bar:
        for batch in batches(order, batch_size):
            ids, mask = pad([prompts[j] for j in batch], pad_id, side="left")
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=stop_ids,
                                 use_cache=True)
            for row, j in enumerate(batch):
                texts[j] = tokenizer.decode(out[row, ids.shape[1]:], skip_special_tokens=True).strip()
            bar.update(len(batch))
    return texts
