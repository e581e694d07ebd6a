"""Stage `preprocess` (a dvc.yaml stage): raw rows -> formatted, split, tokenised data set.

Reads:  `data/raw/dataset.parquet`; `preprocess:` params; `model:` (for the tokenizer).
Writes: `data/processed/` (`DatasetDict.save_to_disk`, splits train/validation/test, columns as in
        docs/architecture.md "Processed data columns"), atomically; `reports/preprocess.json`.
Raises: DataError for a missing raw file, missing columns (listing those that exist), labels
        outside `preprocess.labels` (with `unknown_labels: error`), a bad conversation (with
        `chat.bad_rows: error`, naming the row), an empty data set or one that is empty after
        filtering, or too few rows/groups to split; ConfigError for a `prompt_template` naming a
        field outside `text_fields`; ModelError for `chat` with a tokenizer whose chat template is
        missing or cannot be masked (tasks/chat.py).

Rules, in order:
1. Rows whose text fields are all empty/whitespace are dropped (`empty_text`); so are
   `instruction` rows whose `response_field` is empty (`empty_response`).
2. Labels map raw value -> name through `preprocess.labels` (raw values compared as strings);
   class id = index of the name in `label_names` (names in first-seen order of the mapping).
   Unknown labels fail, or are dropped (`unknown_label`) with `unknown_labels: drop`.
   `chat` rows are checked by `chat.normalise` instead (bad rows fail or are dropped per reason).
3. Rows repeating an earlier row's text fields (compared after stripping; for `chat`, the
   normalised messages) are dropped (`duplicate_text`) *before* splitting, so one text (one
   conversation) never sits in two splits.
4. `max_samples` keeps a seeded random subset of what is left (original order kept). `chat` rows
   are then tokenised; a row whose final exchange cannot fit in `max_length` is dropped (`too_long`),
   so split fractions count the rows actually written.
5. Split (tasks/splits.py) by `split.group_by` (missing values: each row its own group; a group
   never straddles splits), with each label's share of rows balanced across splits when
   `split.stratify` is on and the rows carry labels (scikit-learn; seeded). Same rows + same seed
   = same split; with groups, whatever the row order.
6. Formats: `instruction` renders `prompt_template` (wrapped in the tokenizer's chat template when
   `chat_template` is true and the tokenizer has one) and the response (label name, or
   `response_field`); `encode_pair` tokenises both. `text` trains on the rendered template text
   (+ end-of-sequence). `classification` tokenises the rendered text with the tokenizer's
   special tokens; its `target` is the label name. `chat` renders each conversation with the
   tokenizer's chat template and trains on assistant turns only (`chat.train_on`), dropping whole
   earliest exchanges when too long; `prompt` is the render before the last assistant turn (with
   the generation prompt) and `target` that turn's content (tasks/chat.py).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks import atomic, chat, layout, preference, splits
from tasks.config import Params, PreprocessConfig
from tasks.encoding import batch_token_ids, end_of_turn, join_pair, label_reserve, with_bos
from tasks.errors import ConfigError, DataError

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
    tokenizer = models.load_tokenizer(models.resolve(params.model), params.model.trust_remote_code)
    chat_stats = None
    if cfg.format == "chat":  # tokenised before the split, so rows dropped as too long leave no split short
        rows, chat_stats = chat.encode_rows(tokenizer, cfg, rows, dropped)
    elif cfg.format == "preference":  # likewise (tasks/preference.py)
        rows = preference.encode_rows(tokenizer, cfg, rows, dropped)
    if cfg.format in ("chat", "preference"):
        if not rows:
            raise DataError(f"no conversation fits in preprocess.max_length {cfg.max_length} tokens "
                            f"(dropped: {dropped}); raise max_length")
    parts, stratified = splits.split_rows(rows, cfg.split, labelled=_uses_labels(cfg))
    encoded = {name: encode_rows(tokenizer, cfg, part) for name, part in parts.items()}
    report = _report(encoded, label_names, dropped, cfg, params.model.base, chat_stats)
    report["split"]["stratified"] = stratified

    with atomic.directory(root / layout.PROCESSED) as tmp:
        _dataset_dict(encoded, cfg).save_to_disk(str(tmp))
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
    if cfg.format == "chat":  # the tools column is optional
        needed = {"preprocess.chat.messages_field": cfg.chat.messages_field}
    elif cfg.format == "preference":
        needed = preference.needed_columns(cfg)
    else:
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


def _dropped_counts(cfg: PreprocessConfig) -> dict[str, int]:
    if cfg.format == "chat":
        return {**dict.fromkeys(chat.BAD_ROW_REASONS, 0), "duplicate_text": 0, "too_long": 0}
    if cfg.format == "preference":
        return preference.dropped_counts()
    return {"empty_text": 0, "empty_response": 0, "unknown_label": 0, "duplicate_text": 0}


def _read_row(rec: dict, number: int, cfg: PreprocessConfig, names: list[str], dropped: dict[str, int],
              unknown: dict[str, list[int]]) -> tuple[dict, Any] | None:
    """One raw record -> (row, duplicate key), or None when it is dropped (rules 1-2)."""
    if cfg.format == "chat":
        conv = chat.normalise(rec, number, cfg, dropped)
        if conv is None:
            return None
        return {"fields": {}, "target": "", "label": -1, "conversation": conv, "number": number}, conv.key
    if cfg.format == "preference":
        return preference.read_row(rec, number, cfg, dropped)
    texts = tuple(_as_text(rec[c]) for c in cfg.text_fields)
    if not any(t.strip() for t in texts):
        dropped["empty_text"] += 1
        return None
    label, target = -1, ""
    if names:
        raw_label = _as_text(rec[cfg.label_field])
        if raw_label not in cfg.labels:
            unknown.setdefault(raw_label, []).append(number)
            dropped["unknown_label"] += 1
            return None
        target = cfg.labels[raw_label]
        label = names.index(target)
    elif cfg.format == "instruction":
        target = _as_text(rec[cfg.response_field])
        if not target.strip():  # nothing to learn: the loss would cover only end-of-turn
            dropped["empty_response"] += 1
            return None
    row = {"fields": dict(zip(cfg.text_fields, texts)), "target": target, "label": label, "number": number}
    return row, tuple(t.strip() for t in texts)


def prepare_rows(df, cfg: PreprocessConfig) -> tuple[list[dict], list[str], dict[str, int]]:
    """Check columns, map labels, drop empty/unknown/duplicate rows (rules 1-4).

    Returns (rows, label_names, dropped): each row is {"fields": {text field: value}, "target",
    "label", "group", "number" (raw row, from 0)}, plus "conversation" (chat.Conversation) for
    `chat`; dropped counts rows per reason.
    """
    import numpy as np

    _check_columns(df, cfg)
    if cfg.format not in ("chat", "preference"):
        _template_fields(cfg)
    names = label_names_of(cfg)
    dropped = _dropped_counts(cfg)
    unknown: dict[str, list[int]] = {}
    seen: set = set()
    rows = []
    records = df.to_dict("records")
    for number, rec in enumerate(records):
        got = _read_row(rec, number, cfg, names, dropped, unknown)
        if got is None:
            continue
        row, key = got
        if key in seen:
            dropped["duplicate_text"] += 1
            continue
        seen.add(key)
        group = _as_text(rec[cfg.split.group_by]) if cfg.split.group_by else ""
        row["group"] = group or f"\0row{number}"  # no group value: the row is its own group
        rows.append(row)
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


def encode_rows(tokenizer, cfg: PreprocessConfig, rows: list[dict]) -> dict[str, list]:
    """Columns for one split: input_ids, labels (causal LM), label, prompt, target, truncated.

    Label-name responses reserve the longest name's budget (`encoding.label_reserve`), so a cut
    prompt is cut the same for every label, as evaluate scores it. `chat` rows come already
    tokenised by `chat.encode_rows`.
    """
    if cfg.format == "chat":
        return {k: [r[k] for r in rows] for k in ("input_ids", "labels", "label", "prompt", "target", "truncated")}
    if cfg.format == "preference":
        return preference.columns(rows, cfg)
    prompts = [render_prompt(tokenizer, cfg, r["fields"]) for r in rows]
    targets = [r["target"] if cfg.format != "text" else "" for r in rows]
    cols: dict[str, list] = {"input_ids": [], "labels": [], "label": [r["label"] for r in rows],
                             "prompt": prompts, "target": targets, "truncated": []}
    if cfg.format == "instruction":
        # One batched call per side (same ids as encode_pair's per-text calls, much faster).
        reserve = label_reserve(tokenizer, label_names_of(cfg))
        for p_ids, t_ids in zip(batch_token_ids(tokenizer, prompts), batch_token_ids(tokenizer, targets)):
            ids, labels, truncated = join_pair(tokenizer, p_ids, t_ids, cfg.max_length, reserve)
            cols["input_ids"].append(ids)
            cols["labels"].append(labels)
            cols["truncated"].append(truncated)
    elif cfg.format == "text":
        for ids in batch_token_ids(tokenizer, prompts):
            ids = with_bos(tokenizer, ids) + end_of_turn(tokenizer)
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


def _dataset_dict(encoded: dict[str, dict[str, list]], cfg: PreprocessConfig):
    from datasets import Dataset, DatasetDict, Features, List, Value

    features = {"input_ids": List(Value("int32")), "labels": List(Value("int32")), "label": Value("int64"),
                "prompt": Value("string"), "target": Value("string")}
    if cfg.format == "classification":
        del features["labels"]
    if cfg.format == "preference":
        features = preference.features(cfg)
    return DatasetDict({
        name: Dataset.from_dict({k: cols[k] for k in features}, features=Features(features))
        for name, cols in encoded.items()
    })


def _report(encoded: dict[str, dict[str, list]], label_names: list[str], dropped: dict[str, int],
            cfg: PreprocessConfig, model_spec: str, chat_stats: dict | None = None) -> dict:
    import numpy as np

    lengths = np.array([len(ids) for cols in encoded.values() for ids in cols["input_ids"]])
    truncated = [t for cols in encoded.values() for t in cols["truncated"]]
    per_label = {
        name: {(label_names[i] if i >= 0 else "none"): cols["label"].count(i) for i in sorted(set(cols["label"]))}
        for name, cols in encoded.items()
    }
    report = {
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
    if chat_stats is not None:  # messages removed: whole earliest exchanges (to fit), and after the last answer
        report["chat"] = {**chat_stats, "train_on": cfg.chat.train_on}
    return report
