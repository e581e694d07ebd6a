"""Stage `preprocess` (a dvc.yaml stage): raw rows -> formatted, split, tokenised data set.

Reads:  `data/raw/dataset.parquet`; `preprocess:` params; `model:` (for the tokenizer).
Writes: `data/processed/` (`DatasetDict.save_to_disk`, splits train/validation/test, columns as in
        docs/architecture.md "Processed data columns"), atomically; `reports/preprocess.json`.
Raises: DataError for a missing raw file, missing columns (listing those that exist), labels
        outside `preprocess.labels` (with `unknown_labels: error`), an empty data set or one that
        is empty after filtering, or too few rows/groups to split; ConfigError for a
        `prompt_template` naming a field outside `text_fields`.

Rules, in order:
1. Rows whose text fields are all empty/whitespace are dropped (`empty_text`); so are
   `instruction` rows whose `response_field` is empty (`empty_response`).
2. Labels map raw value -> name through `preprocess.labels` (raw values compared as strings);
   class id = index of the name in `label_names` (names in first-seen order of the mapping).
   Unknown labels fail, or are dropped (`unknown_label`) with `unknown_labels: drop`.
3. Rows repeating an earlier row's text fields (compared after stripping) are dropped
   (`duplicate_text`) *before* splitting, so one text never sits in two splits.
4. `max_samples` keeps a seeded random subset of what is left (original order kept).
5. Split by `split.group_by` (missing values: each row its own group): the sorted distinct
   groups are shuffled with `split.seed`, then test, then validation take groups until they hold
   their fraction of rows; the rest is train. Same rows + same seed = same split, whatever the
   row order.
6. Formats: `instruction` renders `prompt_template` (wrapped in the tokenizer's chat template when
   `chat_template` is true and the tokenizer has one) and the response (label name, or
   `response_field`); `encode_pair` tokenises both. `text` trains on the rendered template text
   (+ end-of-sequence). `classification` tokenises the rendered text with the tokenizer's
   special tokens; its `target` is the label name.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks import atomic, layout
from tasks.config import Params, PreprocessConfig
from tasks.errors import ConfigError, DataError

SPLITS = ("train", "validation", "test")
IGNORE = -100  # label value the causal-LM loss skips
# When a prompt is too long, its middle is cut: the first 3/4 of the prompt budget come from its
# start (system message, instruction) and the last 1/4 from its end (question + assistant marker).
_TAIL_FRACTION = 4


@dataclass(frozen=True)
class PreprocessResult:
    path: str  # relative to the project root
    rows: dict[str, int]  # per split
    label_names: tuple[str, ...]
    dropped: dict[str, int]  # reason -> rows
    truncated_fraction: float


def _check_recorded_md5(raw: Path) -> None:
    """Refuse raw data whose bytes differ from the md5 its `.dvc` file records (when there is one):
    a corrupted pull or checkout, or an edit made outside ingest, must not be trained on."""
    import hashlib

    import yaml

    try:
        outs = yaml.safe_load(raw.with_name(raw.name + ".dvc").read_text()).get("outs") or []
    except (OSError, ValueError, AttributeError):
        return
    recorded = outs[0].get("md5") if len(outs) == 1 else None
    if not recorded:
        return
    h = hashlib.md5()
    with open(raw, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != recorded:
        raise DataError(f"{raw} has md5 {h.hexdigest()}, but {raw.name}.dvc records {recorded}: the file was "
                        f"corrupted or changed outside DVC. Restore it (`dvc checkout` / `dvc pull` from a remote "
                        f"with `verify = true`) or re-run the ingest stage.")


def run(params: Params) -> PreprocessResult:
    """Format, split and tokenise the raw data into data/processed/; see the module docstring."""
    import pandas as pd

    from tasks import models

    root = Path(params.root)
    cfg = params.preprocess
    raw = root / layout.RAW_DATA
    if not raw.is_file():
        raise DataError(f"{raw} not found; run the ingest stage first (`python -m tasks ingest`)")
    _check_recorded_md5(raw)
    df = pd.read_parquet(raw)
    if len(df) == 0:
        raise DataError(f"{raw} has no rows; ingest a non-empty data set")

    rows, label_names, dropped = prepare_rows(df, cfg)
    splits = split_rows(rows, cfg)
    tokenizer = models.load_tokenizer(models.resolve(params.model), params.model.trust_remote_code)
    encoded = {name: encode_rows(tokenizer, cfg, part) for name, part in splits.items()}
    report = _report(encoded, label_names, dropped, cfg, params.model.base)

    with atomic.directory(root / layout.PROCESSED) as tmp:
        _dataset_dict(encoded, cfg.format).save_to_disk(str(tmp))
    atomic.write_json(root / layout.report("preprocess"), report)
    return PreprocessResult(str(layout.PROCESSED), report["rows"], tuple(label_names), dropped,
                            report["tokens"]["truncated_fraction"])


# --- rows: columns, labels, filtering -------------------------------------------------------------

def _uses_labels(cfg: PreprocessConfig) -> bool:
    """Labels are read for classification, and for instruction unless a response column is given."""
    return cfg.format == "classification" or (cfg.format == "instruction" and not cfg.response_field)


def _template_fields(cfg: PreprocessConfig) -> list[str]:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(cfg.prompt_template) if f is not None]
    except ValueError as err:
        raise ConfigError(f"preprocess.prompt_template is not a valid format string: {err}") from None
    unknown = sorted({f for f in fields if f not in cfg.text_fields})
    if unknown or "" in fields:
        what = f"field(s) {unknown}" if unknown else "a positional field {}"
        raise ConfigError(
            f"preprocess.prompt_template uses {what}, but only preprocess.text_fields {cfg.text_fields} "
            f"can be named in braces (write {{{{ or }}}} for a literal brace)"
        )
    return fields


def _check_columns(df, cfg: PreprocessConfig) -> None:
    needed = {f"preprocess.text_fields[{i}]": c for i, c in enumerate(cfg.text_fields)}
    if _uses_labels(cfg):
        needed["preprocess.label_field"] = cfg.label_field
    if cfg.format == "instruction" and cfg.response_field:
        needed["preprocess.response_field"] = cfg.response_field
    if cfg.split.group_by:
        needed["preprocess.split.group_by"] = cfg.split.group_by
    missing = [f"{key} = '{col}'" for key, col in needed.items() if col not in df.columns]
    if missing:
        raise DataError(
            f"column(s) not in the raw data: {'; '.join(missing)}. Columns that exist: "
            f"{', '.join(map(str, df.columns))}. Fix these keys in params.yaml "
            f"(preprocess.split.group_by: null splits rows without groups)"
        )


def _as_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None / NaN
        return ""
    return str(value)


def label_names_of(cfg: PreprocessConfig) -> list[str]:
    """Ordered label names (class id = index); empty when the format does not use labels."""
    return list(dict.fromkeys(cfg.labels.values())) if _uses_labels(cfg) else []


def prepare_rows(df, cfg: PreprocessConfig) -> tuple[list[dict], list[str], dict[str, int]]:
    """Check columns, map labels, drop empty/unknown/duplicate rows (rules 1-4).

    Returns (rows, label_names, dropped): each row is {"fields": {text field: value}, "target",
    "label", "group"}; dropped counts rows per reason.
    """
    import numpy as np

    _check_columns(df, cfg)
    _template_fields(cfg)
    names = label_names_of(cfg)
    dropped = {"empty_text": 0, "empty_response": 0, "unknown_label": 0, "duplicate_text": 0}
    unknown: dict[str, list[int]] = {}
    seen: set[tuple[str, ...]] = set()
    rows = []
    records = df.to_dict("records")
    for number, rec in enumerate(records):
        texts = tuple(_as_text(rec[c]) for c in cfg.text_fields)
        if not any(t.strip() for t in texts):
            dropped["empty_text"] += 1
            continue
        label, target = -1, ""
        if names:
            raw_label = _as_text(rec[cfg.label_field])
            if raw_label not in cfg.labels:
                unknown.setdefault(raw_label, []).append(number)
                dropped["unknown_label"] += 1
                continue
            target = cfg.labels[raw_label]
            label = names.index(target)
        elif cfg.format == "instruction":
            target = _as_text(rec[cfg.response_field])
            if not target.strip():  # nothing to learn: the loss would cover only end-of-turn
                dropped["empty_response"] += 1
                continue
        key = tuple(t.strip() for t in texts)
        if key in seen:
            dropped["duplicate_text"] += 1
            continue
        seen.add(key)
        group = _as_text(rec[cfg.split.group_by]) if cfg.split.group_by else ""
        rows.append({"fields": dict(zip(cfg.text_fields, texts)), "target": target, "label": label,
                     "group": group or f"\0row{number}"})  # no group value: the row is its own group
    if unknown and cfg.unknown_labels == "error":
        shown = "; ".join(f"{v!r} ({len(ix)} rows, e.g. row {ix[0]})" for v, ix in list(unknown.items())[:10])
        raise DataError(
            f"column '{cfg.label_field}' has values that are not keys of preprocess.labels "
            f"{sorted(cfg.labels)}: {shown} (rows counted from 0). Add them to preprocess.labels, "
            f"or set preprocess.unknown_labels: drop"
        )
    if not rows:
        raise DataError(f"no rows left after filtering {len(records)} raw rows (dropped: {dropped})")
    if cfg.max_samples is not None and len(rows) > cfg.max_samples:
        keep = np.sort(np.random.default_rng(cfg.split.seed).permutation(len(rows))[: cfg.max_samples])
        rows = [rows[i] for i in keep]
    return rows, names, dropped


# --- split ------------------------------------------------------------------------------------------

def split_rows(rows: list[dict], cfg: PreprocessConfig) -> dict[str, list[dict]]:
    """Deterministic grouped split (rule 5). Raises DataError when a needed split would be empty."""
    import numpy as np

    sizes: dict[str, int] = {}
    for r in rows:
        sizes[r["group"]] = sizes.get(r["group"], 0) + 1
    groups = sorted(sizes)
    order = np.random.default_rng(cfg.split.seed).permutation(len(groups))
    n = len(rows)
    targets = {"test": max(1, round(cfg.split.test * n)),
               "validation": max(1, round(cfg.split.validation * n)) if cfg.split.validation > 0 else 0}
    where: dict[str, str] = {}
    counts = {"test": 0, "validation": 0}
    for i in order:
        g = groups[i]
        name = next((s for s in ("test", "validation") if counts[s] < targets[s]), "train")
        where[g] = name
        if name != "train":
            counts[name] += sizes[g]
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for r in rows:
        out[where[r["group"]]].append(r)
    needed = [s for s in SPLITS if not out[s] and (s != "validation" or targets["validation"])]
    if needed:
        raise DataError(
            f"{n} rows in {len(groups)} group(s) are too few to fill split(s) {', '.join(needed)}; "
            f"use more data (preprocess.max_samples), smaller preprocess.split fractions, or "
            f"preprocess.split.group_by: null"
        )
    return out


# --- formatting and tokenisation --------------------------------------------------------------------

def render_prompt(tokenizer, cfg: PreprocessConfig, row: dict) -> str:
    """The text the model sees before the response: `prompt_template` over `row`'s text fields
    (a mapping with at least `preprocess.text_fields`, e.g. a raw-data row),
    wrapped in the tokenizer's chat template (with `system_prompt`) for `instruction` when enabled.
    """
    text = cfg.prompt_template.format(**{f: _as_text(row.get(f)) for f in cfg.text_fields})
    if cfg.format != "instruction":
        return text
    if cfg.chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + [
            {"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + "\n"


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _batch_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _with_bos(tokenizer, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    return [bos, *ids] if bos is not None and (not ids or ids[0] != bos) else ids


def _end_of_turn(tokenizer) -> list[int]:
    """Token that ends the response: eos (`<|im_end|>` for ChatML models), so the model learns to stop."""
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def encode_pair(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """Tokenise a rendered prompt and its response into (input_ids, labels).

    input_ids = [bos?] + prompt tokens + response tokens + end-of-turn; labels are -100 on the
    prompt and equal to input_ids on the response and end-of-turn, so the loss covers exactly the
    response. Prompt and response are tokenised separately so the boundary never merges.
    Over `max_length`: the response is kept whole (cut only if it alone exceeds half of
    max_length), and the prompt loses its middle (start and end kept). Returns lists of ints.
    """
    ids, labels, _ = _join_pair(tokenizer, _ids(tokenizer, prompt), _ids(tokenizer, response), max_length)
    return ids, labels


def _join_pair(tokenizer, prompt_ids: list[int], response_ids: list[int],
               max_length: int) -> tuple[list[int], list[int], bool]:
    """`encode_pair` from already tokenised parts; also says whether anything was cut."""
    prompt_ids = _with_bos(tokenizer, prompt_ids)
    response_ids = response_ids + _end_of_turn(tokenizer)
    truncated = len(prompt_ids) + len(response_ids) > max_length
    if truncated:
        response_ids = response_ids[: max(max_length - len(prompt_ids), max_length // 2)]
        budget = max_length - len(response_ids)
        if len(prompt_ids) > budget:
            tail = budget // _TAIL_FRACTION
            prompt_ids = prompt_ids[: budget - tail] + (prompt_ids[-tail:] if tail else [])
    return prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids, truncated


def encode_rows(tokenizer, cfg: PreprocessConfig, rows: list[dict]) -> dict[str, list]:
    """Columns for one split: input_ids, labels (causal LM), label, prompt, target, truncated."""
    prompts = [render_prompt(tokenizer, cfg, r["fields"]) for r in rows]
    targets = [r["target"] if cfg.format != "text" else "" for r in rows]
    cols: dict[str, list] = {"input_ids": [], "labels": [], "label": [r["label"] for r in rows],
                             "prompt": prompts, "target": targets, "truncated": []}
    if cfg.format == "instruction":
        # One batched call per side (same ids as encode_pair's per-text calls, much faster).
        for p_ids, t_ids in zip(_batch_ids(tokenizer, prompts), _batch_ids(tokenizer, targets)):
            ids, labels, truncated = _join_pair(tokenizer, p_ids, t_ids, cfg.max_length)
            cols["input_ids"].append(ids)
            cols["labels"].append(labels)
            cols["truncated"].append(truncated)
    elif cfg.format == "text":
        for ids in _batch_ids(tokenizer, prompts):
            ids = _with_bos(tokenizer, ids) + _end_of_turn(tokenizer)
            cols["truncated"].append(len(ids) > cfg.max_length)
            cols["input_ids"].append(ids[: cfg.max_length])
            cols["labels"].append(ids[: cfg.max_length])
    else:
        batch = tokenizer(prompts, add_special_tokens=True)["input_ids"] if prompts else []
        for ids in batch:
            cols["truncated"].append(len(ids) > cfg.max_length)
            # Keep the final special token (e.g. [SEP]) when cutting, as the tokenizer's own truncation does.
            cols["input_ids"].append(ids if len(ids) <= cfg.max_length else ids[: cfg.max_length - 1] + ids[-1:])
        del cols["labels"]
    return cols


def _dataset_dict(encoded: dict[str, dict[str, list]], fmt: str):
    from datasets import Dataset, DatasetDict, Features, List, Value

    features = {"input_ids": List(Value("int32")), "labels": List(Value("int32")), "label": Value("int64"),
                "prompt": Value("string"), "target": Value("string")}
    if fmt == "classification":
        del features["labels"]
    return DatasetDict({
        name: Dataset.from_dict({k: cols[k] for k in features}, features=Features(features))
        for name, cols in encoded.items()
    })


def _report(encoded: dict[str, dict[str, list]], label_names: list[str], dropped: dict[str, int],
            cfg: PreprocessConfig, model_spec: str) -> dict:
    import numpy as np

    lengths = np.array([len(ids) for cols in encoded.values() for ids in cols["input_ids"]])
    truncated = [t for cols in encoded.values() for t in cols["truncated"]]
    per_label = {
        name: {(label_names[i] if i >= 0 else "none"): cols["label"].count(i) for i in sorted(set(cols["label"]))}
        for name, cols in encoded.items()
    }
    return {
        "format": cfg.format,
        "tokenizer": model_spec,
        "max_length": cfg.max_length,
        "label_names": label_names,
        "rows": {name: len(cols["input_ids"]) for name, cols in encoded.items()},
        "rows_per_label": per_label,
        "dropped": dropped,
        "tokens": {
            "mean": round(float(lengths.mean()), 2),
            "p50": float(np.percentile(lengths, 50)),
            "p95": float(np.percentile(lengths, 95)),
            "max": int(lengths.max()),
            "truncated_fraction": round(sum(truncated) / len(truncated), 4),
        },
        "split": {"seed": cfg.split.seed, "group_by": cfg.split.group_by,
                  "validation": cfg.split.validation, "test": cfg.split.test},
    }
