"""`preprocess.format: chat`: multi-turn conversations, loss on assistant turns only.

Contract:
- `normalise(row, number, cfg, dropped) -> Conversation | None` reads one raw row's messages
  (`preprocess.chat.messages_field`: a list of mappings, or its JSON text) and optional tools
  column into a checked `Conversation`. A bad row (reasons in `BAD_ROW_REASONS`) raises DataError
  naming the row number (from 0) with `chat.bad_rows: error`, or is counted in `dropped[reason]`
  and gives None with `bad_rows: drop`.
- `encode_conversation(tokenizer, messages, tools, max_length, train_on) -> (input_ids, labels, info)`
  renders with `tokenizer.apply_chat_template` and supervises assistant turns (`all` or `last`).
  Raises `TooLong` when even the final exchange does not fit, ModelError for a template without
  the prefix property or without an end-of-turn token.
- `stop_token_ids(tokenizer)`: ids generation stops at (eos + the template's end-of-turn token).

Assistant spans come from renders of prefixes, never from string search: with P = render of the
messages before assistant turn k plus the generation prompt, and F = render of messages up to and
including k, the turn's tokens are F[len(P):]. The generation prompt header (`<|im_start|>assistant\n`)
lies in P, so it is not supervised; of F's extra tokens, everything up to and including the last
end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `</s>`) is supervised, and what the template writes
after it (ChatML's "\n") is not: at generation time the model stops at the end-of-turn token and
never produces it. Each P and F is tokenised whole and must be a token prefix of the full render,
which makes `tokenizer(prompt, add_special_tokens=False)` equal the prompt part of input_ids.

Long conversations lose whole exchanges from the start (an exchange = a user message and the
assistant/tool messages answering it; leading system messages always stay), so the kept
conversation starts with a user turn and no assistant turn is ever cut.
Messages after the last assistant turn are removed in `normalise` (nothing there to learn).
No data-stack imports at module level.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tasks.config import PreprocessConfig
from tasks.errors import DataError, ModelError

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")
BAD_ROW_REASONS = ("malformed", "unknown_role", "empty_content", "no_assistant_turn", "bad_tool_call", "bad_tools")


@dataclass(frozen=True)
class Conversation:
    """A checked conversation: messages as chat templates read them ({role, content} plus
    `tool_calls` on assistant turns, `name`/`tool_call_id` where given), and tool schemas or None."""

    messages: list[dict]
    tools: list[dict] | None
    trailing_dropped: int  # messages after the last assistant turn, removed

    @property
    def key(self) -> str:
        """Duplicate key: the messages with contents stripped (tools left out)."""
        return json.dumps([{**m, "content": m["content"].strip()} for m in self.messages], sort_keys=True,
                          ensure_ascii=False)


class BadRow(DataError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class TooLong(DataError):
    """Even the system messages plus the final exchange exceed max_length."""


# --- normalise raw rows ---------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """Python lists/dicts from what parquet gives back (numpy arrays of dicts), or parsed JSON text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as err:
            raise BadRow("malformed", f"is not valid JSON ({err})") from None
    if hasattr(value, "tolist") and not isinstance(value, (int, float)):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain_inner(v) for v in value]
    return value


def _plain_inner(value: Any) -> Any:
    if hasattr(value, "tolist") and not isinstance(value, (int, float, bool)):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain_inner(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_inner(v) for v in value]
    return value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # None / NaN


def _tool_call(call: Any, i: int) -> dict:
    """One tool call as templates read it: {type: function, function: {name, arguments: mapping}}."""
    fn = call.get("function") if isinstance(call, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name.strip():
        raise BadRow("bad_tool_call", f"tool call {i} is not a mapping with function.name")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise BadRow("bad_tool_call", f"tool call {i} ({name}) has arguments that are not valid JSON") from None
    if not isinstance(args, dict):
        raise BadRow("bad_tool_call", f"tool call {i} ({name}) has arguments that are not a mapping")
    out = {"type": "function", "function": {"name": name, "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _message(raw: Any, i: int, cfg: PreprocessConfig) -> dict:
    c = cfg.chat
    if not isinstance(raw, dict):
        raise BadRow("malformed", f"message {i} is not a mapping")
    speaker = raw.get(c.role_field)
    if not isinstance(speaker, str) or speaker not in c.roles:
        raise BadRow("unknown_role", f"message {i} has {c.role_field}={speaker!r}, not one of "
                     f"preprocess.chat.roles {sorted(c.roles)}")
    role = c.roles[speaker]
    content = raw.get(c.content_field)
    content = "" if _missing(content) else content
    if not isinstance(content, str):
        raise BadRow("malformed", f"message {i} ({role}) has {c.content_field} of type {type(content).__name__}, "
                     f"not text")
    msg: dict = {"role": role, "content": content}
    calls = raw.get("tool_calls")
    if not _missing(calls) and calls != []:
        if role != "assistant" or not isinstance(calls, list):
            raise BadRow("bad_tool_call", f"message {i} ({role}) has tool_calls that are not a list on an "
                         f"assistant message")
        msg["tool_calls"] = [_tool_call(call, j) for j, call in enumerate(calls)]
    if not content.strip() and "tool_calls" not in msg:
        raise BadRow("empty_content", f"message {i} ({role}) has empty {c.content_field}")
    for key in ("name", "tool_call_id"):
        if isinstance(raw.get(key), str):
            msg[key] = raw[key]
    return msg


def _tools(row: dict, cfg: PreprocessConfig) -> list[dict] | None:
    field = cfg.chat.tools_field
    value = row.get(field) if field else None
    if _missing(value) or (isinstance(value, str) and not value.strip()):
        return None
    try:
        tools = _plain(value)
    except BadRow:
        raise BadRow("bad_tools", f"column '{field}' is not valid JSON") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRow("bad_tools", f"column '{field}' is not a list of tool schemas (mappings)")
    return tools or None


def check(row: dict, cfg: PreprocessConfig) -> Conversation:
    """The row's Conversation, or BadRow(reason, detail)."""
    field = cfg.chat.messages_field
    raw = row.get(field)
    if _missing(raw):
        raise BadRow("malformed", f"column '{field}' is empty")
    messages = _plain(raw)
    if not isinstance(messages, list) or not messages:
        raise BadRow("malformed", f"column '{field}' is not a non-empty list of messages")
    messages = [_message(m, i, cfg) for i, m in enumerate(messages)]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise BadRow("no_assistant_turn", "the conversation has no assistant message (nothing to train on)")
    return Conversation(messages[: last + 1], _tools(row, cfg), len(messages) - last - 1)


def normalise(row: dict, number: int, cfg: PreprocessConfig, dropped: dict[str, int]) -> Conversation | None:
    """`check` under the `preprocess.chat.bad_rows` policy: DataError naming row `number`, or count and None."""
    try:
        return check(row, cfg)
    except BadRow as bad:
        if cfg.chat.bad_rows == "drop":
            dropped[bad.reason] = dropped.get(bad.reason, 0) + 1
            return None
        raise DataError(f"row {number} (counted from 0): {bad.reason}: {bad}. Fix the data, or set "
                        f"preprocess.chat.bad_rows: drop to skip and count such rows") from None


# --- encode -----------------------------------------------------------------------------------------

def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special)
    return ids


def _render(tokenizer, messages: list[dict], tools, generation_prompt: bool) -> str:
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)


def stop_token_ids(tokenizer) -> list[int]:
    """End-of-turn ids generation must stop at: eos, plus the last special token the chat template
    writes after an assistant message (e.g. `<|im_end|>`, `<|eot_id|>`), found by rendering a probe
    conversation. Just eos for a tokenizer without a chat template."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not getattr(tokenizer, "chat_template", None):
        return ids
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    before = _token_ids(tokenizer, _render(tokenizer, probe[:1], None, True))
    full = _token_ids(tokenizer, _render(tokenizer, probe, None, False))
    special = _special_ids(tokenizer)
    added = full[len(before):] if full[: len(before)] == before else []
    ends = [t for t in added if t in special]
    return ids + [ends[-1]] if ends and ends[-1] not in ids else ids


def _token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _exchanges(messages: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """(leading system messages, exchanges): each exchange starts at a user message (the first may
    start with whatever precedes the first user message)."""
    head = 0
    while head < len(messages) and messages[head]["role"] == "system":
        head += 1
    groups: list[list[dict]] = []
    for m in messages[head:]:
        if m["role"] == "user" or not groups:
            groups.append([])
        groups[-1].append(m)
    return messages[:head], groups


def _fit(tokenizer, messages: list[dict], tools, max_length: int) -> tuple[list[dict], int]:
    """The longest suffix of whole exchanges (after the system messages) whose render fits; raises
    TooLong when the final exchange alone does not. Returns (messages kept, messages dropped)."""
    system, groups = _exchanges(messages)
    for start in range(len(groups)):
        kept = system + [m for g in groups[start:] for m in g]
        if len(_token_ids(tokenizer, _render(tokenizer, kept, tools, False))) <= max_length:
            return kept, len(messages) - len(kept)
    raise TooLong(f"the system messages and the last exchange alone exceed max_length {max_length} tokens")


def _is_prefix(prefix: list[int], ids: list[int]) -> bool:
    return ids[: len(prefix)] == prefix


def encode_conversation(tokenizer, messages: list[dict], tools: list[dict] | None, max_length: int,
                        train_on: str, stops: list[int] | None = None) -> tuple[list[int], list[int], dict]:
    """Tokenise one conversation into (input_ids, labels, info); see the module docstring.

    labels equal input_ids on each supervised assistant turn (its content, tool calls and
    end-of-turn token) and are -100 elsewhere. info: `turns_dropped` (messages removed to fit),
    `prompt` (render before the last assistant turn, with the generation prompt), `target` (the
    last assistant turn's content). `stops`: `stop_token_ids(tokenizer)` when already known.
    Raises TooLong, ModelError (no chat template; the template breaks the prefix property or ends
    assistant turns without a stop token)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("preprocess.format: chat needs a tokenizer with a chat template; this model has none "
                         "(use format: instruction, or a chat/instruct model)")
    messages, turns_dropped = _fit(tokenizer, messages, tools, max_length)
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    turns = turns if train_on == "all" else turns[-1:]
    texts = [_render(tokenizer, messages, tools, False)]
    for k in turns:
        texts += [_render(tokenizer, messages[:k], tools, True), _render(tokenizer, messages[: k + 1], tools, False)]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids, stops = encoded[0], set(stop_token_ids(tokenizer) if stops is None else stops)
    labels = [IGNORE] * len(ids)
    for j, k in enumerate(turns):
        before, through = encoded[1 + 2 * j], encoded[2 + 2 * j]
        if not (_is_prefix(before, through) and _is_prefix(through, ids)):
            raise ModelError(
                f"the chat template does not render prefixes of a conversation as token prefixes of the "
                f"whole (at message {k}, the assistant turn): assistant tokens cannot be located. Use a "
                f"template whose earlier turns render the same whatever follows them")
        ends = [i for i in range(len(before), len(through)) if through[i] in stops]
        if not ends:
            raise ModelError(f"the chat template ends an assistant turn without any stop token "
                             f"{sorted(stops)}: a model trained on it would never stop; fix the template or eos")
        labels[len(before): ends[-1] + 1] = ids[len(before): ends[-1] + 1]
    prompt = texts[-2]
    return ids, labels, {"turns_dropped": turns_dropped, "prompt": prompt, "target": messages[turns[-1]]["content"]}


def encode_rows(tokenizer, cfg: PreprocessConfig, rows: list[dict], dropped: dict[str, int]) -> tuple[list[dict], dict]:
    """Encode each prepared row's `conversation` (from `normalise`) in place: adds input_ids,
    labels, prompt, target, truncated. Rows that cannot fit are removed and counted as
    `dropped["too_long"]`. Returns (rows kept, {turns_dropped, rows_shortened, trailing_dropped}).
    A template error names the row number."""
    from jinja2.exceptions import TemplateError

    kept, stats = [], {"turns_dropped": 0, "rows_shortened": 0, "trailing_dropped": 0}
    stops = stop_token_ids(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    for r in rows:
        conv = r["conversation"]
        try:
            ids, labels, info = encode_conversation(tokenizer, conv.messages, conv.tools, cfg.max_length,
                                                    cfg.chat.train_on, stops)
        except TooLong:
            dropped["too_long"] = dropped.get("too_long", 0) + 1
            continue
        except TemplateError as err:
            raise DataError(f"row {r['number']} (counted from 0): the chat template refused the conversation: "
                            f"{err}") from None
        stats["turns_dropped"] += info["turns_dropped"]
        stats["rows_shortened"] += info["turns_dropped"] > 0
        stats["trailing_dropped"] += conv.trailing_dropped
        kept.append({**r, "input_ids": ids, "labels": labels, "prompt": info["prompt"], "target": info["target"],
                     "truncated": info["turns_dropped"] > 0})
    return kept, stats
