"""`preprocess.format: chat`: the loss covers exactly the assistant turns, for every template style.

Real tokenizers (SmolLM2's, the byte-level one of `random:` models with Llama-3, Zephyr, Mistral
[INST] and a tool-calling ChatML template written here); conversations as lists, JSON text and
after a parquet round trip; truncation by whole exchanges; bad rows; the stage end to end.
"""

from __future__ import annotations

import itertools
import json

import pandas as pd
import pytest
from conftest import make_project
from datasets import load_from_disk

from tasks import chat, ingest, layout, models, preprocess
from tasks.config import ModelConfig, load_params, parse_params
from tasks.errors import DataError, ModelError

IGNORE = chat.IGNORE

LLAMA3 = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# HuggingFaceH4/zephyr-7b-beta's template as published (newlines after `}}` are kept by Jinja).
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
# Mistral-7B-Instruct-v0.1 style: no system role, strict alternation, turns end with </s>.
MISTRAL = (
    "{{ '<s>' }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + '</s>' }}{% endif %}{% endfor %}"
)
# ChatML with tools, Qwen2.5 style: schemas in the system turn, calls as <tool_call> JSON,
# consecutive tool results grouped into one user turn.
CHATML_TOOLS = (
    "{% if tools %}{{ '<|im_start|>system\n' }}{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\n\n' }}{% endif %}{{ '# Tools\n<tools>' }}{% for tool in tools %}"
    "{{ '\n' + (tool | tojson) }}{% endfor %}{{ '\n</tools><|im_end|>\n' }}"
    "{% elif messages[0]['role'] == 'system' %}{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% for message in messages %}{% if message['role'] == 'system' and loop.first %}"
    "{% elif message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' + message['content'] }}"
    "{% for call in message.tool_calls or [] %}{{ '<tool_call>\n{\"name\": \"' + call.function.name + "
    "'\", \"arguments\": ' + (call.function.arguments | tojson) + '}\n</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tok(template: str | None = None, specials=(), **named):
    tok = models.byte_tokenizer()
    if specials:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *specials]})
    if named:
        tok.add_special_tokens(named)
    if template is not None:
        tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def smollm2():
    return models.load_tokenizer(models.resolve(ModelConfig(base="embedded:smollm2-135m-instruct")))


# (tokenizer factory, end-of-turn text, supports a system role)
STYLES = {
    "random-tiny-chatml": (lambda: byte_tok(models.CHATML_TEMPLATE), "<|im_end|>", True),
    "llama3": (lambda: byte_tok(LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                                bos_token="<|begin_of_text|>"), "<|eot_id|>", True),
    "zephyr": (lambda: byte_tok(ZEPHYR, ["<|user|>", "<|assistant|>", "<|system|>"], eos_token="</s>"), "</s>", True),
    "mistral-inst": (lambda: byte_tok(MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"]), "</s>", False),
    "chatml-tools": (lambda: byte_tok(CHATML_TOOLS, ["<tool_call>", "</tool_call>"]), "<|im_end|>", True),
}


def conversation(system=True, exchanges=3):
    msgs = [{"role": "system", "content": "You answer briefly."}] if system else []
    for i in range(exchanges):
        msgs += [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                 {"role": "assistant", "content": f"It is {2 * i}, answer {i}."}]
    return msgs


def supervised_spans(tok, ids, labels) -> list[str]:
    """Decoded runs of supervised tokens (where labels must equal input_ids)."""
    assert len(ids) == len(labels) and all(lab in (IGNORE, t) for t, lab in zip(ids, labels))
    runs = itertools.groupby(zip(ids, labels), key=lambda pair: pair[1] != IGNORE)
    return [tok.decode([t for t, _ in run]) for supervised, run in runs if supervised]


def check_prompt_matches(tok, ids, labels, info):
    """Evaluate tokenises `prompt` alone: that must be exactly the tokens before the last turn."""
    prompt_ids = tok(info["prompt"], add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    assert labels[len(prompt_ids)] != IGNORE and labels[len(prompt_ids) - 1] == IGNORE
    assert tok.decode(ids[len(prompt_ids):]).startswith(info["target"])


# --- masks: every template style -------------------------------------------------------------------------

@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("train_on", ["all", "last"])
def test_loss_covers_exactly_assistant_contents_and_end_of_turn(style, train_on):
    factory, eot, has_system = STYLES[style]
    tok = factory()
    msgs = conversation(system=has_system)
    ids, labels, info = chat.encode_conversation(tok, msgs, None, 4096, train_on)
    answers = [m["content"] + eot for m in msgs if m["role"] == "assistant"]
    assert supervised_spans(tok, ids, labels) == (answers if train_on == "all" else answers[-1:])
    assert info == {"turns_dropped": 0, "prompt": info["prompt"], "target": msgs[-1]["content"]}
    assert info["prompt"] == tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    check_prompt_matches(tok, ids, labels, info)
    assert tok.convert_tokens_to_ids(eot) in chat.stop_token_ids(tok)


@pytest.mark.parametrize("system", [True, False])
def test_smollm2_chatml_masks_assistant_turns_only(smollm2, system):
    msgs = conversation(system=system)
    ids, labels, info = chat.encode_conversation(smollm2, msgs, None, 4096, "all")
    assert supervised_spans(smollm2, ids, labels) == [m["content"] + "<|im_end|>" for m in msgs
                                                      if m["role"] == "assistant"]
    check_prompt_matches(smollm2, ids, labels, info)
    assert ("You are a helpful AI assistant named SmolLM" in info["prompt"]) != system  # its default system turn
    assert chat.stop_token_ids(smollm2) == [smollm2.convert_tokens_to_ids("<|im_end|>")]


def test_template_breaking_the_prefix_property_is_a_model_error():
    tok = byte_tok("{{ messages | length }}" + models.CHATML_TEMPLATE)  # earlier renders differ from the whole
    with pytest.raises(ModelError, match="prefix"):
        chat.encode_conversation(tok, conversation(), None, 4096, "all")


def test_template_without_stop_token_is_a_model_error():
    tok = byte_tok("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with pytest.raises(ModelError, match="never stop"):
        chat.encode_conversation(tok, conversation(), None, 4096, "all")


def test_a_conversation_the_template_refuses_names_the_row():
    rows, _, dropped = preprocess.prepare_rows(pd.DataFrame({"messages": [json.dumps(conversation())]}), chat_cfg())
    with pytest.raises(DataError, match="row 0 .*refused.*must alternate"):  # Mistral's template has no system role
        chat.encode_rows(STYLES["mistral-inst"][0](), chat_cfg(), rows, dropped)


def test_tokenizer_without_chat_template_is_a_model_error():
    tok = byte_tok()
    tok.chat_template = None
    with pytest.raises(ModelError, match="chat template"):
        chat.encode_conversation(tok, conversation(), None, 4096, "all")


# --- tools ---------------------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def tool_conversation(arguments):
    return [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "id": "c1", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "content": "{\"temp\": 21}", "tool_call_id": "c1"},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ]


@pytest.mark.parametrize("arguments", [{"city": "Paris"}, "{\"city\": \"Paris\"}"])
def test_tool_calls_are_supervised_tool_results_and_schemas_are_not(arguments):
    tok = STYLES["chatml-tools"][0]()
    row = {"messages": json.dumps(tool_conversation(arguments)), "tools": json.dumps(TOOLS)}
    conv = chat.check(row, parse_params({"preprocess": {"format": "chat"}}).preprocess)
    assert conv.messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}  # JSON text parsed
    ids, labels, info = chat.encode_conversation(tok, conv.messages, conv.tools, 4096, "all")
    assert supervised_spans(tok, ids, labels) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 21 degrees in Paris.<|im_end|>"]
    assert '"get_weather"' in info["prompt"] and "Weather of a city" in info["prompt"]  # tools= reached the template
    assert "<tool_response>\n{\"temp\": 21}\n</tool_response>" in info["prompt"]
    check_prompt_matches(tok, ids, labels, info)


def test_templates_ignoring_tool_calls_still_supervise_the_end_of_turn(smollm2):
    msgs = tool_conversation({"city": "Paris"})
    ids, labels, _ = chat.encode_conversation(smollm2, msgs, TOOLS, 4096, "all")
    assert supervised_spans(smollm2, ids, labels) == ["<|im_end|>", "It is 21 degrees in Paris.<|im_end|>"]


# --- raw rows: JSON text, parquet round trip, ShareGPT -------------------------------------------------------

def chat_cfg(**chat_keys):
    return parse_params({"model": {"base": "random:tiny"},
                         "preprocess": {"format": "chat", "max_length": 4096, "split": {"group_by": None},
                                        "chat": chat_keys}}).preprocess


def test_lists_json_text_and_parquet_round_trip_give_the_same_conversation(tmp_path):
    cfg = chat_cfg()
    msgs = tool_conversation({"city": "Paris"})
    pd.DataFrame({"messages": [msgs], "tools": [TOOLS]}).to_parquet(tmp_path / "d.parquet")
    back = pd.read_parquet(tmp_path / "d.parquet").to_dict("records")[0]  # numpy arrays, None-filled structs
    as_list = chat.check({"messages": msgs, "tools": TOOLS}, cfg)
    as_json = chat.check({"messages": json.dumps(msgs), "tools": json.dumps(TOOLS)}, cfg)
    assert as_list.messages == as_json.messages == chat.check(back, cfg).messages
    assert as_list.tools == as_json.tools == TOOLS


def test_sharegpt_rows_through_the_role_mapping():
    cfg = chat_cfg(messages_field="conversations", role_field="from", content_field="value")
    row = {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello!"}]}
    conv = chat.check(row, cfg)
    assert conv.messages == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello!"}]
    custom = chat_cfg(messages_field="conversations", role_field="from", content_field="value",
                      roles={"human": "user", "bot": "assistant"})
    with pytest.raises(chat.BadRow, match="from='gpt'"):
        chat.check(row | {"conversations": row["conversations"][1:]}, custom)
    assert chat.check({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]},
                      custom).messages[1] == {"role": "assistant", "content": "Yo"}


def test_messages_after_the_last_assistant_turn_are_removed():
    conv = chat.check({"messages": conversation(exchanges=1) + [{"role": "user", "content": "Thanks"}]}, chat_cfg())
    assert conv.messages[-1]["role"] == "assistant" and conv.trailing_dropped == 1


# --- long conversations ----------------------------------------------------------------------------------

def test_long_conversations_drop_whole_earliest_exchanges_and_keep_the_system():
    tok = byte_tok()
    msgs = conversation(exchanges=4)
    full = len(chat.encode_conversation(tok, msgs, None, 4096, "all")[0])
    last_two = len(chat.encode_conversation(tok, msgs[:1] + msgs[5:], None, 4096, "all")[0])
    assert last_two < full
    ids, labels, info = chat.encode_conversation(tok, msgs, None, last_two, "all")
    assert info["turns_dropped"] == 4 and len(ids) == last_two
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou answer briefly.<|im_end|>\n<|im_start|>user\nQuestion 2")
    assert supervised_spans(tok, ids, labels) == ["It is 4, answer 2.<|im_end|>", "It is 6, answer 3.<|im_end|>"]
    # one token less: only the last exchange (plus system) fits
    _, _, info = chat.encode_conversation(tok, msgs, None, last_two - 1, "last")
    assert info["turns_dropped"] == 6
    with pytest.raises(chat.TooLong):
        chat.encode_conversation(tok, msgs, None, 20, "all")


def test_an_exchange_with_tool_turns_is_dropped_whole():
    tok = STYLES["chatml-tools"][0]()
    msgs = tool_conversation({"city": "Paris"}) + [{"role": "user", "content": "And Rome?"},
                                                   {"role": "assistant", "content": "Also sunny."}]
    n = len(chat.encode_conversation(tok, msgs[:1] + msgs[5:], None, 4096, "all")[0])
    ids, labels, info = chat.encode_conversation(tok, msgs, None, n, "all")
    assert info["turns_dropped"] == 4  # user, assistant call, tool result, assistant answer
    assert supervised_spans(tok, ids, labels) == ["Also sunny.<|im_end|>"]


def test_rows_whose_last_exchange_cannot_fit_are_dropped_and_counted():
    cfg = parse_params({"preprocess": {"format": "chat", "max_length": 120, "split": {"group_by": None}}}).preprocess
    long_answer = [{"role": "user", "content": "Tell me"}, {"role": "assistant", "content": "x" * 200}]
    df = pd.DataFrame({"messages": [json.dumps(conversation(exchanges=3)), json.dumps(long_answer)]})
    rows, _, dropped = preprocess.prepare_rows(df, cfg)
    kept, stats = chat.encode_rows(byte_tok(), cfg, rows, dropped)
    assert len(kept) == 1 and dropped["too_long"] == 1
    assert stats["rows_shortened"] == 1 and stats["turns_dropped"] > 0 and kept[0]["truncated"]
    assert len(kept[0]["input_ids"]) <= 120 and supervised_spans(byte_tok(), kept[0]["input_ids"], kept[0]["labels"])


# --- bad rows ----------------------------------------------------------------------------------------------

BAD = {
    "unknown_role": [{"role": "narrator", "content": "Once"}, *conversation(exchanges=1)],
    "no_assistant_turn": [{"role": "user", "content": "Hi"}],
    "empty_content": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "Hi"}],
    "bad_tool_call": [{"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}],
    "malformed": "[{\"role\": \"user\", \"content\": ",
}


def bad_frame(reason, messages=None):
    rows = [json.dumps(conversation(exchanges=i + 1)) for i in range(5)]
    bad = BAD[reason] if messages is None else messages
    rows[3] = bad if isinstance(bad, str) else json.dumps(bad)
    return pd.DataFrame({"messages": rows})


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_rows_fail_naming_the_row_or_are_dropped_and_counted(reason):
    with pytest.raises(DataError, match=rf"row 3 \(counted from 0\): {reason}: .*bad_rows: drop"):
        preprocess.prepare_rows(bad_frame(reason), chat_cfg())
    rows, _, dropped = preprocess.prepare_rows(bad_frame(reason), chat_cfg(bad_rows="drop"))
    assert len(rows) == 4 and dropped[reason] == 1 and sum(dropped.values()) == 1


@pytest.mark.parametrize("arguments", ["not json", "[1, 2]", 5])
def test_tool_call_arguments_must_be_a_mapping_or_its_json(arguments):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": arguments}}]}]
    with pytest.raises(DataError, match="row 3 .*bad_tool_call: tool call 0 \\(f\\)"):
        preprocess.prepare_rows(bad_frame("bad_tool_call", msgs), chat_cfg())


def test_bad_tools_column_is_a_bad_row():
    df = bad_frame("malformed", conversation(exchanges=1)).assign(tools=[None, "", None, "[1, 2]", json.dumps(TOOLS)])
    with pytest.raises(DataError, match="row 3 .*bad_tools"):
        preprocess.prepare_rows(df, chat_cfg())
    rows, _, dropped = preprocess.prepare_rows(df, chat_cfg(bad_rows="drop"))
    assert dropped["bad_tools"] == 1 and [r["conversation"].tools for r in rows] == [None, None, None, TOOLS]


def test_duplicate_conversations_are_dropped_before_the_split():
    one = conversation(exchanges=2)
    spaced = [{**m, "content": m["content"] + "  "} for m in one]  # same after stripping
    df = pd.DataFrame({"messages": [json.dumps(one), json.dumps(spaced), json.dumps(conversation(exchanges=1))]})
    rows, _, dropped = preprocess.prepare_rows(df, chat_cfg())
    assert len(rows) == 2 and dropped["duplicate_text"] == 1


def test_missing_messages_column_names_the_key():
    with pytest.raises(DataError, match="preprocess.chat.messages_field = 'conversations'"):
        preprocess.prepare_rows(pd.DataFrame({"messages": ["[]"]}), chat_cfg(messages_field="conversations"))


# --- config: chat needs no text/label fields; integer and boolean label keys ----------------------------------

def test_chat_format_needs_no_text_or_label_fields():
    cfg = parse_params({"preprocess": {"format": "chat", "text_fields": [], "label_field": None, "labels": {}}})
    assert cfg.preprocess.chat.train_on == "all" and cfg.preprocess.chat.bad_rows == "error"
    with pytest.raises(Exception, match="needs at least one column in text_fields"):
        parse_params({"preprocess": {"format": "instruction", "text_fields": []}})


def test_integer_and_boolean_label_keys_are_read_as_str_of_the_raw_value(tmp_path):
    (tmp_path / "params.yaml").write_text("preprocess:\n  labels: {0: terrible, 1: good}\n")
    assert load_params(tmp_path / "params.yaml").preprocess.labels == {"0": "terrible", "1": "good"}
    (tmp_path / "params.yaml").write_text(
        "preprocess:\n  labels: {true: good, false: terrible}\n  split: {group_by: null}\n")
    cfg = load_params(tmp_path / "params.yaml").preprocess
    assert cfg.labels == {"True": "good", "False": "terrible"}  # str(True): how a boolean cell compares
    df = pd.DataFrame({"text": ["fine film", "awful film", "great cast"], "category": [True, False, True]})
    df.to_parquet(tmp_path / "b.parquet")  # a real boolean column
    rows, names, _ = preprocess.prepare_rows(pd.read_parquet(tmp_path / "b.parquet"), cfg)
    assert names == ["good", "terrible"] and [r["target"] for r in rows] == ["good", "terrible", "good"]
    cfg = parse_params({"preprocess": {"labels": {0: "terrible", 1: "good"}, "split": {"group_by": None}}}).preprocess
    rows, _, _ = preprocess.prepare_rows(df.assign(category=[1, 0, 1]), cfg)
    assert [r["label"] for r in rows] == [1, 0, 1]


# --- the stage ---------------------------------------------------------------------------------------------

def test_run_on_an_ingested_chat_jsonl(tmp_path):
    root = make_project(tmp_path / "proj", {
        "ingest": {"source": "chats.jsonl"},
        "preprocess": {"format": "chat", "max_length": 96, "split": {"group_by": None, "test": 0.2,
                                                                     "validation": 0.2}}})
    lines = [{"messages": conversation(system=i % 2 == 0, exchanges=1 + i % 3)
              + [{"role": "user", "content": f"row {i}"}, {"role": "assistant", "content": f"done {i}"}]}
             for i in range(20)]
    lines[5] = lines[4]  # a duplicate conversation
    lines[7] = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "y" * 300}]}
    (root / "chats.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    params = load_params(root / "params.yaml")
    ingest.run(params)
    result = preprocess.run(params)

    ds = load_from_disk(str(root / layout.PROCESSED))
    assert ds["train"].column_names == ["input_ids", "labels", "label", "prompt", "target"]
    assert sum(result.rows.values()) == 18 and result.label_names == ()
    tok = byte_tok()
    for split in ds.values():
        for row in split:
            spans = supervised_spans(tok, row["input_ids"], row["labels"])
            assert spans[-1] == row["target"] + "<|im_end|>" and row["label"] == -1
            check_prompt_matches(tok, row["input_ids"], row["labels"], row)
    prompts = [p for split in ds.values() for p in split["prompt"]]
    assert len(set(prompts)) == len(prompts)  # one conversation sits in one split only
    report = json.loads((root / layout.report("preprocess")).read_text())
    assert report["format"] == "chat" and report["dropped"]["duplicate_text"] == 1
    assert report["dropped"]["too_long"] == 1 and report["chat"]["rows_shortened"] > 0
    assert report["chat"]["turns_dropped"] >= 2 * report["chat"]["rows_shortened"]
    assert report["tokens"]["max"] <= 96
