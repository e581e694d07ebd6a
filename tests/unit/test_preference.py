"""Preference pairs: the data mapping (tasks/preference.py), the pure metrics, and the params rules.

Tokenizer-only (random:tiny's byte-level tokenizer with a ChatML template): no model is loaded.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tasks import metrics, models, preference
from tasks.config import ModelConfig, PreprocessConfig, parse_params
from tasks.errors import ConfigError, DataError
from tasks.preprocess import prepare_rows

END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer(models.resolve(ModelConfig(base="random:tiny")))


def cfg(**over) -> PreprocessConfig:
    base = {"format": "preference", "text_fields": [], "label_field": None, "labels": {}, "max_length": 128,
            "system_prompt": None, "split": {"group_by": None}}
    return PreprocessConfig.model_validate({**base, **over})


def encode(tok, records, **over):
    c = cfg(**over)
    rows, _, dropped = prepare_rows(pd.DataFrame(records), c)
    return preference.encode_rows(tok, c, rows, dropped), dropped


def test_text_and_message_prompts_and_conversational_responses_map_to_one_shared_prompt(tok):
    records = [
        {"prompt": "Is water wet?", "chosen": "Yes.", "rejected": "No."},
        {"prompt": json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                               {"role": "user", "content": "Is water wet?"}]),
         "chosen": json.dumps([{"role": "assistant", "content": "Yes, it is."}]),
         "rejected": [{"role": "assistant", "content": "Bananas."}]},
    ]
    rows, dropped = encode(tok, records)
    assert len(rows) == 2 and dropped["too_long"] == 0
    for r, chosen, rejected in zip(rows, ["Yes.", "Yes, it is."], ["No.", "Bananas."]):
        # one prompt for both sides, each response a whole assistant turn through its end-of-turn token
        assert tok.decode(r["chosen_ids"]) == chosen + END and tok.decode(r["rejected_ids"]) == rejected + END
        assert tok.decode(r["prompt_ids"]) == r["prompt"] and r["prompt"].endswith("<|im_start|>assistant\n")
        assert r["input_ids"] == r["prompt_ids"] + r["chosen_ids"]
        assert r["labels"] == [-100] * len(r["prompt_ids"]) + r["chosen_ids"]
        assert r["target"] == chosen and r["rejected"] == rejected
    assert "Hello!" in rows[1]["prompt"]  # earlier turns stay in the prompt when they fit


def test_column_mapping_and_bad_rows_named_by_number_or_dropped_and_counted(tok):
    records = [{"q": "a?", "good": "yes", "bad": "no"}, {"q": "b?", "good": "same", "bad": "same"},
               {"q": "", "good": "x", "bad": "y"},
               {"q": json.dumps([{"role": "wizard", "content": "c?"}]), "good": "x", "bad": "y"}]
    mapping = {"preference": {"prompt_field": "q", "chosen_field": "good", "rejected_field": "bad"}}
    with pytest.raises(DataError, match=r"row 1 \(counted from 0\): same_response.*bad_rows: drop"):
        encode(tok, records, **mapping)
    mapping["preference"]["bad_rows"] = "drop"
    rows, dropped = encode(tok, records, **mapping)
    assert [r["number"] for r in rows] == [0]
    assert (dropped["same_response"], dropped["empty_content"], dropped["unknown_role"]) == (1, 1, 1)
    with pytest.raises(DataError, match=r"preprocess.preference.chosen_field = 'chosen'.*Columns that exist: q, good"):
        encode(tok, records)


def test_unpaired_kto_rows_map_prompt_completion_and_label_and_bad_rows_are_named(tok):
    records = [{"q": "Is water wet?", "answer": "Yes.", "ok": True},
               {"q": json.dumps([{"role": "user", "content": "Hi"}]), "ok": "false",
                "answer": [{"role": "assistant", "content": "Go."}]},
               {"q": "Sky?", "answer": "Blue.", "ok": 1}]
    over = {"preference": {"rows": "unpaired", "prompt_field": "q", "completion_field": "answer", "label_field": "ok"}}
    rows, dropped = encode(tok, records, **over)
    assert [r["kto_label"] for r in rows] == [True, False, True] and dropped["too_long"] == 0
    for r, text in zip(rows, ["Yes.", "Go.", "Blue."]):  # the completion is a whole assistant turn, as in pairs
        assert tok.decode(r["completion_ids"]) == text + END and r["target"] == text
        assert r["input_ids"] == r["prompt_ids"] + r["completion_ids"]
        assert r["labels"] == [-100] * len(r["prompt_ids"]) + r["completion_ids"]
        assert "chosen_ids" not in r and "rejected_ids" not in r
    cols = preference.columns(rows, cfg(**over))
    assert set(cols) == {*preference.features(cfg(**over)), "truncated"}
    bad = records + [{"q": "x?", "answer": "y", "ok": "maybe"}, {"q": "z?", "answer": " ", "ok": False}]
    with pytest.raises(DataError, match=r"row 3 \(counted from 0\): bad_label: column 'ok' holds 'maybe', not a "
                       r"boolean.*bad_rows: drop"):
        encode(tok, bad, **over)
    over["preference"]["bad_rows"] = "drop"
    rows, dropped = encode(tok, bad, **over)
    assert len(rows) == 3 and (dropped["bad_label"], dropped["empty_content"]) == (1, 1)
    with pytest.raises(DataError, match=r"preprocess.preference.completion_field = 'completion'.*Columns that exist"):
        encode(tok, records, preference={"rows": "unpaired", "prompt_field": "q", "label_field": "ok"})


def test_truncation_drops_earliest_exchanges_and_never_cuts_a_response(tok):
    turns = []
    for k in range(6):
        turns += [{"role": "user", "content": f"question number {k} " * 3}, {"role": "assistant", "content": "ok " * 6}]
    long_reply = "a long and complete answer " * 2
    rows, dropped = encode(tok, [{"prompt": json.dumps(turns + [{"role": "user", "content": "last?"}]),
                                  "chosen": long_reply, "rejected": "no"}], max_length=128)
    (r,), _ = rows, dropped
    assert r["truncated"] and "question number 0" not in r["prompt"] and "last?" in r["prompt"]
    assert tok.decode(r["chosen_ids"]) == long_reply + END and tok.decode(r["rejected_ids"]) == "no" + END
    assert len(r["prompt_ids"]) + len(r["chosen_ids"]) <= 128  # the longer side fits beside the same prompt
    # a response too long to fit beside any prompt: the row is dropped and counted, never cut
    rows, dropped = encode(tok, [{"prompt": "q?", "chosen": "x" * 200, "rejected": "y"}], max_length=128)
    assert rows == [] and dropped["too_long"] == 1


def test_without_a_chat_template_the_prompt_is_cut_to_the_longer_responses_budget(tok):
    rows, _ = encode(tok, [{"prompt": "long prompt " * 40, "chosen": "short", "rejected": "a longer reply"}],
                     chat_template=False, max_length=64)
    (r,) = rows
    assert r["truncated"] and len(r["prompt_ids"]) + len(r["rejected_ids"]) <= 64
    assert tok.decode(r["chosen_ids"]).startswith("short")
    assert tok.decode(r["rejected_ids"]).startswith("a longer reply")
    assert r["chosen_ids"][-1] == r["rejected_ids"][-1] == tok.eos_token_id


def test_preference_metrics_are_statistics_of_the_per_row_columns():
    assert metrics.preference_accuracy([0.5, -1.0, 0.0, 2.0]) == 0.5  # a tie is not a win
    with pytest.raises(ValueError):
        metrics.preference_accuracy([])
    base = {"label": np.full(4, -1), "chosen_logp": np.array([-1.0, -5.0, -2.0, -3.0]),
            "rejected_logp": np.array([-2.0, -1.0, -2.5, -1.0]), "reward_margin": np.zeros(4)}
    base["pref_margin"] = base["chosen_logp"] - base["rejected_logp"]
    assert metrics.table_metric("preference_accuracy", base, 1) == 0.5
    assert metrics.table_metric("logp_accuracy", base, 1) == 0.5
    assert metrics.table_metric("reward_margin", base, 1) == 0.0
    adapter = {**base, "reward_margin": np.array([0.2, 0.4, -0.2, 0.6])}
    adapter["pref_margin"] = adapter["reward_margin"]
    assert metrics.table_metric("preference_accuracy", adapter, 1) == 0.75
    assert metrics.table_metric("reward_margin", adapter, 1) == pytest.approx(0.25)
    # tables without pair columns do not report them (so instruction/chat reports are unchanged)
    assert metrics.table_metric("preference_accuracy", {"label": np.zeros(2)}, 2) is None
    assert {"preference_accuracy", "logp_accuracy", "reward_margin"} <= set(metrics.metric_names(adapter, 1))


@pytest.mark.parametrize("train, fmt, message", [
    ({"objective": "dpo", "fast_path": False}, "instruction", "set preprocess.format: preference"),
    ({"objective": "orpo", "fast_path": False}, {"format": "preference", "preference": {"rows": "unpaired"}},
     r"preprocess.preference.rows 'unpaired' .* trains with train.objective: kto only \(it is 'orpo'\)"),
    ({"objective": "orpo", "fast_path": False}, "instruction", "set preprocess.format: preference"),
    ({"objective": "kto", "fast_path": False, "micro_batch_size": 1}, "preference",
     r"'kto' estimates its KL term .* set train.micro_batch_size >= 2 \(it is 1\)"),
    ({"objective": "dpo"}, "preference", "set train.fast_path: false"),
    ({"objective": "orpo"}, "preference", "'orpo' does not run on the CUDA fast path.*set train.fast_path: false"),
    ({"objective": "kto"}, "preference", "set train.fast_path: false"),
    ({"objective": "dpo", "fast_path": False, "devices": 2, "micro_batch_size": 4}, "preference",
     "set train.devices: 1"),
    ({"objective": "kto", "fast_path": False, "devices": 2, "micro_batch_size": 4}, "preference",
     "'kto' trains on one device here.*set train.devices: 1"),
])
def test_params_refuse_what_preference_training_does_not_support(train, fmt, message):
    with pytest.raises(ConfigError, match=message):
        pre = fmt if isinstance(fmt, dict) else {"format": fmt}
        parse_params({"preprocess": {**pre, "split": {"group_by": None}}, "train": train})
    for objective in ("dpo", "orpo", "kto"):
        ok = parse_params({"preprocess": {"format": "preference"},
                           "train": {"objective": objective, "fast_path": False},
                           "register": {"primary_metric": "preference_accuracy"}})
        assert ok.train.objective == objective
    assert parse_params({}).train.objective == "sft"
