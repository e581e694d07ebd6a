"""`preprocess.format: preference`: prompt + chosen / rejected pairs (DPO, ORPO, KTO), or KTO's
unpaired prompt + completion + label rows (`preference.rows: unpaired`), tokenised like `chat`.

Contract:
- `read_row(rec, number, cfg, dropped) -> (row, duplicate key) | None`: one raw record ->
  a prepared row with a `pair` (`Pair`, or `Unpaired` for unpaired rows: one response in
  `completion_field`, its `label_field` a boolean, 0/1 or the text true/false, else `bad_label`). `prompt` is text or a list of messages (read as
  `preprocess.chat` reads them: role/content keys and `roles`; JSON text accepted); `chosen` /
  `rejected` are text, or a list holding one assistant message (TRL's conversational form).
  A bad row (reasons in `BAD_ROW_REASONS`) raises DataError naming the row number (from 0) with
  `preference.bad_rows: error`, or is counted in `dropped[reason]` and gives None with `drop`.
- `encode_rows(tokenizer, cfg, rows, dropped) -> rows kept`: adds `prompt_ids`, `chosen_ids`,
  `rejected_ids` (one prompt shared by both responses), `input_ids` / `labels` (prompt + chosen,
  loss on chosen: what `objective: sft` trains on), `prompt`, `target` (chosen text), `rejected`.
  Unpaired rows get `completion_ids` and `kto_label` instead of the chosen/rejected columns (the
  completion encoded exactly as a chosen response would be).
- `columns(rows, cfg)`, `features(cfg)`: the processed columns of one split.

Rendering: with a chat template (and `preprocess.chat_template` true), the prompt messages (a
text prompt becomes one user message, after `system_prompt`) plus each response as an assistant
turn are rendered and tokenised by `chat.encode_conversation` (`train_on: last`), so the response
tokens are exactly an assistant turn through its end-of-turn token, as `format: chat` trains them.
Without one, the prompt is `text + "\\n"` and each response its tokens + eos (`encoding.join_pair`).

Truncation never cuts a response. Chat: whole earliest exchanges of the prompt are dropped until
the prompt fits beside the longer response (`chat._fit`), the same prompt for both. Text: the
prompt loses its middle to fit beside the longer response (`join_pair` with that reserve). A row
whose response alone leaves no room is dropped as `too_long` and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks import chat, encoding
from tasks.config import PreprocessConfig
from tasks.errors import DataError

BAD_ROW_REASONS = ("malformed", "unknown_role", "empty_content", "same_response", "bad_label")
FEATURE_LISTS = ("input_ids", "labels", "prompt_ids", "chosen_ids", "rejected_ids")
FEATURE_TEXTS = ("prompt", "target", "rejected")
UNPAIRED_LISTS = ("input_ids", "labels", "prompt_ids", "completion_ids")  # plus the boolean `kto_label`


@dataclass(frozen=True)
class Pair:
    """A checked pair: prompt messages ({role, content}) or None for a text prompt, and responses."""

    prompt_text: str  # the text prompt ("" when the prompt is messages)
    messages: list[dict] | None
    chosen: str
    rejected: str

    @property
    def key(self) -> str:
        return json.dumps([self.prompt_text.strip(), self.messages, self.chosen.strip(), self.rejected.strip()],
                          sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class Unpaired:
    """A checked unpaired row (KTO): prompt as in Pair, one completion, and whether it is desirable."""

    prompt_text: str
    messages: list[dict] | None
    completion: str
    desirable: bool

    @property
    def chosen(self) -> str:  # the reference text of the row (`target`)
        return self.completion

    @property
    def key(self) -> str:
        return json.dumps([self.prompt_text.strip(), self.messages, self.completion.strip(), self.desirable],
                          sort_keys=True, ensure_ascii=False)


def _response(value: Any, column: str, cfg: PreprocessConfig) -> str:
    """A response as text: a string, or a list of exactly one assistant message (or its JSON)."""
    if isinstance(value, str) and not value.lstrip().startswith(("[", "{")):
        text = value
    else:
        msgs = chat._plain(value) if value is not None else None
        msgs = [msgs] if isinstance(msgs, dict) else msgs
        if not isinstance(msgs, list) or len(msgs) != 1:
            raise chat.BadRow("malformed", f"column '{column}' is neither text nor a list of one assistant message")
        msg = chat._message(msgs[0], 0, cfg)
        if msg["role"] != "assistant":
            raise chat.BadRow("malformed", f"column '{column}' holds a {msg['role']} message, not an assistant one")
        text = msg["content"]
    if not text.strip():
        raise chat.BadRow("empty_content", f"column '{column}' is empty")
    return text


def _prompt(rec: dict, cfg: PreprocessConfig) -> tuple[str, list[dict] | None]:
    """(text prompt or "", prompt messages or None) of a record, or chat.BadRow."""
    pc = cfg.preference
    raw = rec.get(pc.prompt_field)
    if chat._missing(raw):
        raise chat.BadRow("empty_content", f"column '{pc.prompt_field}' is empty")
    if isinstance(raw, str) and not raw.lstrip().startswith("["):
        if not raw.strip():
            raise chat.BadRow("empty_content", f"column '{pc.prompt_field}' is empty")
        return raw, None
    plain = chat._plain(raw)
    if not isinstance(plain, list) or not plain:
        raise chat.BadRow("malformed", f"column '{pc.prompt_field}' is not text or a non-empty list of messages")
    messages = [chat._message(m, i, cfg) for i, m in enumerate(plain)]
    if messages[-1]["role"] != "user":
        raise chat.BadRow("malformed", f"column '{pc.prompt_field}' ends with a {messages[-1]['role']} message; "
                          "a prompt ends with the user turn the responses answer")
    return "", messages


def check(rec: dict, cfg: PreprocessConfig) -> Pair:
    """The record's Pair, or chat.BadRow(reason, detail)."""
    pc = cfg.preference
    text, messages = _prompt(rec, cfg)
    chosen = _response(rec.get(pc.chosen_field), pc.chosen_field, cfg)
    rejected = _response(rec.get(pc.rejected_field), pc.rejected_field, cfg)
    if chosen.strip() == rejected.strip():
        raise chat.BadRow("same_response", "chosen and rejected are the same text (nothing to prefer)")
    return Pair(text, messages, chosen, rejected)


def _label(value: Any, column: str) -> bool:
    """A desirability label: a boolean, 0/1, or the text true/false (any case); else chat.BadRow."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise chat.BadRow("bad_label", f"column '{column}' holds {value!r}, not a boolean (true/false, 0/1)")


def check_unpaired(rec: dict, cfg: PreprocessConfig) -> Unpaired:
    """The record's Unpaired row (`preference.rows: unpaired`), or chat.BadRow(reason, detail)."""
    pc = cfg.preference
    text, messages = _prompt(rec, cfg)
    completion = _response(rec.get(pc.completion_field), pc.completion_field, cfg)
    return Unpaired(text, messages, completion, _label(rec.get(pc.label_field), pc.label_field))


def read_row(rec: dict, number: int, cfg: PreprocessConfig, dropped: dict[str, int]) -> tuple[dict, str] | None:
    """`check` under `preprocess.preference.bad_rows`: DataError naming row `number`, or count and None."""
    try:
        pair = check_unpaired(rec, cfg) if cfg.preference.rows == "unpaired" else check(rec, cfg)
    except chat.BadRow as bad:
        if cfg.preference.bad_rows == "drop":
            dropped[bad.reason] = dropped.get(bad.reason, 0) + 1
            return None
        raise DataError(f"row {number} (counted from 0): {bad.reason}: {bad}. Fix the data, or set "
                        f"preprocess.preference.bad_rows: drop to skip and count such rows") from None
    return {"fields": {}, "target": pair.chosen, "label": -1, "pair": pair, "number": number}, pair.key


def _as_pair(row: Pair | Unpaired) -> Pair:
    """An unpaired row as a Pair whose two sides are its completion: encoded by the same code."""
    return row if isinstance(row, Pair) else Pair(row.prompt_text, row.messages, row.completion, row.completion)


def needed_columns(cfg: PreprocessConfig) -> dict[str, str]:
    """params key -> the raw column it names, for the columns `preference.rows` reads."""
    keys = ("prompt_field", "completion_field", "label_field") if cfg.preference.rows == "unpaired" else (
        "prompt_field", "chosen_field", "rejected_field")
    return {f"preprocess.preference.{k}": getattr(cfg.preference, k) for k in keys}


def dropped_counts() -> dict[str, int]:
    return {**dict.fromkeys(BAD_ROW_REASONS, 0), "duplicate_text": 0, "too_long": 0}


def _uses_template(tokenizer, cfg: PreprocessConfig) -> bool:
    return bool(cfg.chat_template and getattr(tokenizer, "chat_template", None))


def _prompt_messages(pair: Pair, cfg: PreprocessConfig) -> list[dict]:
    if pair.messages is not None:
        return pair.messages
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return system + [{"role": "user", "content": pair.prompt_text}]


def _split_turn(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids through its end-of-turn token) of a `train_on: last` encoding."""
    supervised = [i for i, lab in enumerate(labels) if lab != encoding.IGNORE]
    return ids[: supervised[0]], ids[supervised[0]: supervised[-1] + 1]


def encode_chat(tokenizer, pair: Pair, cfg: PreprocessConfig, stops: list[int]) -> dict:
    """Prompt/chosen/rejected ids through the chat template; raises chat.TooLong when even the last
    user turn beside the longer response exceeds max_length."""
    prompt = _prompt_messages(pair, cfg)
    longer = max((pair.chosen, pair.rejected), key=lambda t: len(encoding.token_ids(tokenizer, t)))
    kept, turns_dropped = chat._fit(tokenizer, prompt + [{"role": "assistant", "content": longer}], None,
                                    cfg.max_length)
    prompt = kept[:-1]
    sides = []
    for text in (pair.chosen, pair.rejected):
        ids, labels, info = chat.encode_conversation(tokenizer, prompt + [{"role": "assistant", "content": text}],
                                                     None, cfg.max_length, "last", stops)
        sides.append((*_split_turn(ids, labels), info["prompt"]))
    (p_ids, c_ids, prompt_text), (p2_ids, r_ids, _) = sides
    if p_ids != p2_ids:  # the template renders the prompt the same whatever answers it (chat checks prefixes)
        raise DataError("the chat template renders the prompt differently before chosen and rejected")
    return {"prompt_ids": p_ids, "chosen_ids": c_ids, "rejected_ids": r_ids, "prompt": prompt_text,
            "truncated": turns_dropped > 0}


def encode_text(tokenizer, pair: Pair, cfg: PreprocessConfig) -> dict:
    """Prompt/chosen/rejected ids without a template; raises chat.TooLong when a response alone
    leaves no room for the prompt (it would be cut)."""
    prompt = pair.prompt_text + "\n"
    p_ids, c_ids, r_ids = encoding.batch_token_ids(tokenizer, [prompt, pair.chosen, pair.rejected])
    eot = encoding.end_of_turn(tokenizer)
    reserve = max(len(c_ids), len(r_ids)) + len(eot)
    if reserve > cfg.max_length // 2:  # join_pair would cut the response: drop the row instead
        raise chat.TooLong(f"a response of {reserve} tokens leaves too little of max_length {cfg.max_length}")
    ids, labels, truncated = encoding.join_pair(tokenizer, p_ids, c_ids, cfg.max_length, reserve)
    n_prompt = len(ids) - len(c_ids) - len(eot)  # the response is kept whole (reserve <= max_length // 2)
    return {"prompt_ids": ids[:n_prompt], "chosen_ids": c_ids + eot, "rejected_ids": r_ids + eot, "prompt": prompt,
            "truncated": truncated}


def encode_rows(tokenizer, cfg: PreprocessConfig, rows: list[dict], dropped: dict[str, int]) -> list[dict]:
    """Tokenise every prepared row (module docstring); rows that cannot fit are counted as too_long."""
    from jinja2.exceptions import TemplateError

    templated = _uses_template(tokenizer, cfg)
    stops = chat.stop_token_ids(tokenizer) if templated else []
    kept = []
    for r in rows:
        pair = _as_pair(r["pair"])
        if pair.messages is not None and not templated:
            raise DataError(f"row {r['number']} (counted from 0): a prompt of messages needs a tokenizer with a chat "
                            "template and preprocess.chat_template: true")
        try:
            enc = encode_chat(tokenizer, pair, cfg, stops) if templated else encode_text(tokenizer, pair, cfg)
        except chat.TooLong:
            dropped["too_long"] = dropped.get("too_long", 0) + 1
            continue
        except TemplateError as err:
            raise DataError(f"row {r['number']} (counted from 0): the chat template refused the prompt: "
                            f"{err}") from None
        n = len(enc["prompt_ids"])
        row = {**r, **enc, "input_ids": enc["prompt_ids"] + enc["chosen_ids"],
               "labels": [encoding.IGNORE] * n + enc["chosen_ids"], "target": pair.chosen, "rejected": pair.rejected}
        if isinstance(r["pair"], Unpaired):  # one response: the completion, with its label
            row.update(completion_ids=row.pop("chosen_ids"), kto_label=r["pair"].desirable)
            del row["rejected_ids"], row["rejected"]
        kept.append(row)
    return kept


def _names(cfg: PreprocessConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(list columns, text columns) of a processed split for `preference.rows`."""
    if cfg.preference.rows == "unpaired":
        return UNPAIRED_LISTS, ("prompt", "target")
    return FEATURE_LISTS, FEATURE_TEXTS


def columns(rows: list[dict], cfg: PreprocessConfig) -> dict[str, list]:
    """One split's columns (`features(cfg)`, and truncated) from encoded rows."""
    lists, texts = _names(cfg)
    extra = ("kto_label",) if cfg.preference.rows == "unpaired" else ()
    return {k: [r[k] for r in rows] for k in (*lists, *texts, *extra, "label", "truncated")}


def features(cfg: PreprocessConfig) -> dict:
    """The datasets features of a processed preference split."""
    from datasets import List, Value

    lists, texts = _names(cfg)
    unpaired = {"kto_label": Value("bool")} if cfg.preference.rows == "unpaired" else {}
    return {**{k: List(Value("int32")) for k in lists}, "label": Value("int64"), **unpaired,
            **{k: Value("string") for k in texts}}
