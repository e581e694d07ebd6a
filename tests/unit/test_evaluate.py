"""Evaluate stage on the tiny random model (CPU), with real processed data and real adapters.

The project is real (tests/conftest.py `make_project`), its data goes through the real preprocess
stage, and adapters are real peft adapters saved with save_pretrained: LoRA with its B matrices
perturbed (peft initialises B to zero, which would make the adapter a no-op) and prompt tuning.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from conftest import make_project
from support.adapters import make_adapter
from support.projects import NEGATIVE, POSITIVE, prepared_project
from tasks import encoding, evalset, evaluate, layout, models, preprocess, processed, scoring
from tasks.config import Params, load_params
from tasks.errors import ModelError

@pytest.fixture
def tiny(tmp_path: Path) -> Params:
    return prepared_project(tmp_path / "proj")


def test_report_keys_lift_and_outputs(tiny: Params):
    make_adapter(tiny)
    result = evaluate.run(tiny)
    report = json.loads((tiny.root / layout.report("evaluate")).read_text())
    for which in ("base", "adapter", "lift"):
        assert set(report[which]) >= {"accuracy", "f1_macro", "loss", "perplexity", "exact_match"}
    assert report["label_names"] == ["negative", "positive"]
    n_test = len(processed.read_split(tiny.root, "test"))
    assert report["n_samples"] == min(tiny.evaluate.max_samples, n_test) == result.n_samples
    for k in ("accuracy", "f1_macro", "loss", "perplexity", "exact_match"):
        assert report["lift"][k] == report["adapter"][k] - report["base"][k]
    for which in ("base", "adapter"):
        m = report[which]
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["f1_macro"] <= 1.0 and 0.0 <= m["exact_match"] <= 1.0
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    # the perturbed adapter really changes the model
    assert report["adapter"]["loss"] != report["base"]["loss"]
    assert result.lift == report["lift"]

    with open(tiny.root / layout.PREDICTIONS, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == report["n_samples"]  # one line per scored row
    assert set(table[0]) >= {"row", "prompt", "reference", "base_output", "adapter_output", "base_label",
                             "adapter_label", "label", "base.pred", "adapter.pred", "adapter.nll_sum"}
    assert all(r["reference"] in {"negative", "positive"} for r in table)
    assert (tiny.root / layout.CONFUSION_MATRIX).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # same params, same files: the same report
    first = (tiny.root / layout.report("evaluate")).read_bytes()
    evaluate.run(tiny)
    assert (tiny.root / layout.report("evaluate")).read_bytes() == first


def test_loss_matches_model_loss_and_padding_is_exact(tiny: Params):
    """Batched, padded scoring equals one-row-at-a-time scoring and the model's own loss."""
    import torch

    base = models.resolve(tiny.model)
    model = models.load_model(base).eval()
    test = processed.read_split(tiny.root, "test")
    # rows cut by k prompt tokens so they differ in length and padding matters
    seqs = [(list(r["input_ids"])[3 * k:], list(r["labels"])[3 * k:])
            for k, r in enumerate(test.select(range(min(6, len(test)))))]
    kw = dict(pad_id=256, device=torch.device("cpu"), desc="t")
    batched = scoring.sequence_nll(model, seqs, batch_size=6, **kw)
    for (ids, labels), (nll, n, _) in zip(seqs, batched):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
        assert n == sum(lab != -100 for lab in labels[1:])
        assert nll / n == pytest.approx(ref, abs=1e-5)
    one_by_one = scoring.sequence_nll(model, seqs, batch_size=1, **kw)
    assert len({len(ids) for ids, _ in seqs}) > 1  # rows of different lengths: padding is exercised
    assert [n for _, n, _ in batched] == [n for _, n, _ in one_by_one]
    assert [s for s, _, _ in batched] == pytest.approx([s for s, _, _ in one_by_one], abs=1e-4)
    assert [t for _, _, t in batched] == pytest.approx([t for _, _, t in one_by_one], abs=1e-4)

    tok = models.load_tokenizer(base)
    prompts = [ids[: labels.index(next(x for x in labels if x != -100))] for ids, labels in seqs]
    kw = dict(max_new_tokens=5, tokenizer=tok, device=torch.device("cpu"), stop_ids=[tok.eos_token_id], desc="g")
    assert scoring.generate(model, prompts, batch_size=6, **kw) == scoring.generate(model, prompts, batch_size=1, **kw)


def test_prompt_tuning_adapter_is_scored(tiny: Params):
    make_adapter(tiny, method="prompt_tuning")
    report = json.loads(json.dumps(evaluate.run(tiny).__dict__))
    assert report["adapter"]["loss"] != report["base"]["loss"]
    assert report["lift"]["accuracy"] == report["adapter"]["accuracy"] - report["base"]["accuracy"]
    saved = json.loads((tiny.root / layout.report("evaluate")).read_text())
    assert saved["adapter_method"] == "PROMPT_TUNING"


def test_missing_adapter_is_a_clear_error(tiny: Params):
    with pytest.raises(ModelError, match="adapter_config.json not found; run `python -m tasks train`"):
        evaluate.run(tiny)


def test_select_rows_is_deterministic():
    assert evalset.select_rows(5, None, 0) == [0, 1, 2, 3, 4]
    assert evalset.select_rows(5, 9, 0) == [0, 1, 2, 3, 4]
    picked = evalset.select_rows(100, 10, 42)
    assert picked == evalset.select_rows(100, 10, 42) == sorted(set(picked)) and len(picked) == 10


def test_classification_head_is_scored_by_argmax(tmp_path: Path):
    params = prepared_project(tmp_path / "cls", {"preprocess": {"format": "classification"}})
    make_adapter(params)
    report = evaluate.run(params)
    assert report.label_names == ("negative", "positive")
    for which in (report.base, report.adapter):
        assert 0.0 <= which["accuracy"] <= 1.0 and which["loss"] > 0 and which["exact_match"] is None
    assert report.lift["exact_match"] is None
    assert report.lift["loss"] == report.adapter["loss"] - report.base["loss"] != 0.0
    with open(params.root / layout.PREDICTIONS, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(processed.read_split(params.root, "test"))
    assert {r["adapter_label"] for r in table} <= {"negative", "positive"}


def test_text_format_has_loss_but_no_label_metrics(tmp_path: Path):
    params = prepared_project(tmp_path / "text", {"preprocess": {"format": "text"}})
    make_adapter(params)
    result = evaluate.run(params)
    for which in (result.base, result.adapter, result.lift):
        assert which["accuracy"] is None and which["f1_macro"] is None and which["exact_match"] is None
    assert result.base["loss"] > 0 and result.lift["loss"] == result.adapter["loss"] - result.base["loss"]
    assert (params.root / layout.CONFUSION_MATRIX).read_bytes()[:4] == b"\x89PNG"  # placeholder, dvc.yaml names it


def test_prompt_cache_scoring_equals_full_sequences(tiny: Params):
    """Batched label scoring through a shared prompt cache (left padding, prompts of different
    lengths, responses of different lengths) gives the full-sequence scores, for the base, a LoRA
    adapter, and (through its fallback) prompt tuning."""
    import torch
    from peft import PeftModel

    base = models.resolve(tiny.model)
    tok = models.load_tokenizer(base)
    test = processed.read_split(tiny.root, "test")
    names = ["no", "positive", "meh"]
    groups = [[encoding.encode_pair(tok, p, name, 512) for name in names] for p in test["prompt"][:3]]
    groups.append([encoding.encode_pair(tok, "short prompt", name, 512) for name in names])
    kw = dict(batch_size=4, pad_id=tok.pad_token_id, device=torch.device("cpu"), desc="t")
    lora = make_adapter(tiny, target=tiny.root / "lora")
    prompt = make_adapter(tiny, method="prompt_tuning", target=tiny.root / "prompt")
    for adapter in (None, lora, prompt):
        model = models.load_model(base).eval()
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter)).eval()
        assert scoring.shares_prompt_cache(model) == (adapter != prompt)
        shared = scoring.label_nll(model, groups, **kw)
        full = scoring.sequence_nll(model, [pair for g in groups for pair in g], **kw)
        assert [n for row in shared for _, n, _ in row] == [n for _, n, _ in full]
        assert [s for row in shared for s, _, _ in row] == pytest.approx([s for s, _, _ in full], abs=1e-4)
        assert [t for row in shared for _, _, t in row] == pytest.approx([t for _, _, t in full], abs=1e-4)


def test_long_multi_label_rows_share_one_prompt_and_never_fall_back(tmp_path: Path):
    """Prompts cut to fit max_length are cut once per row, to the budget of the longest label, so
    every row's labels follow one prompt: all rows go through the prompt cache (O item 4), and the
    training rows are tokenised exactly so (encode_pair with the same reserve)."""
    labels = {"a": "no", "b": "a much longer label name", "c": "medium label", "d": "x"}
    params = prepared_project(tmp_path / "long", {"preprocess": {"labels": labels, "max_length": 48,
                                                                 "label_field": "category"}})
    long = prepared_long_rows(params, labels)
    tok = models.load_tokenizer(models.resolve(params.model))
    es = evalset.build(long, tok)
    assert any(t for t in processed.read_split(long.root, "test")["prompt"] if len(encoding.token_ids(tok, t)) > 48)
    assert es.label_pairs and all(scoring.split_prompt(pairs) is not None for pairs in es.label_pairs)
    names = processed.label_names(long.root)
    per_label_cuts = [[encoding.encode_pair(tok, p, n, 48) for n in names] for p in es.prompts]
    assert any(scoring.split_prompt(pairs) is None for pairs in per_label_cuts)  # what fell back before
    reserve = encoding.label_reserve(tok, names)
    for (ids, labs), prompt, target in zip(es.sequences, es.prompts, es.targets):
        assert (ids, labs) == encoding.encode_pair(tok, prompt, target, 48, reserve)  # training saw the same tokens
        assert len(ids) <= 48


def prepared_long_rows(params: Params, labels: dict) -> Params:
    """Re-run preprocess on long texts (several times max_length) with four labels."""
    rows = [{"text": " ".join(POSITIVE + NEGATIVE) * (1 + k % 3) + f" #{k}", "category": cat,
             "movie_name": f"movie {k % 12}"} for k in range(40) for cat in labels]
    pd.DataFrame(rows).to_parquet(params.root / layout.RAW_DATA)
    preprocess.run(params)
    return params


def test_chat_format_is_judged_by_what_it_generates(tmp_path: Path):
    """Generative evaluation: greedy generation on every scored row from the conversation up to its
    last assistant turn, scored against that turn with every generative metric, with intervals,
    and a per-row table holding prompt, reference, both outputs and their scores."""
    make_project(tmp_path / "chat", {"preprocess": {"format": "chat", "max_length": 96,
                                                    "split": {"group_by": None, "validation": 0.1, "test": 0.3}},
                                     "evaluate": {"max_new_tokens": 6, "max_samples": 12}})
    root = tmp_path / "chat"
    convs = [[{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": f"{a + b}."},
              {"role": "user", "content": "And doubled?"}, {"role": "assistant", "content": f"It is {2 * (a + b)}."}]
             for a in range(6) for b in range(5)]
    (root / layout.RAW_DATA).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"messages": [json.dumps(c) for c in convs]}).to_parquet(root / layout.RAW_DATA)
    params = load_params(root / "params.yaml")
    preprocess.run(params)
    make_adapter(params)
    report = evaluate.run(params).__dict__
    saved = json.loads((root / layout.report("evaluate")).read_text())
    generative = {"exact_match", "token_f1", "rouge_l", "chrf", "embedding_similarity", "length", "length_ratio"}
    for which in ("base", "adapter", "lift"):
        assert generative <= {k for k, v in report[which].items() if v is not None}, which
        assert report[which]["accuracy"] is None  # no labels in a conversation
    assert saved["n_generated"] == saved["n_samples"] == 9
    low, high = saved["intervals"]["adapter"]["rouge_l"]
    assert low <= saved["adapter"]["rouge_l"] <= high
    with open(root / layout.PREDICTIONS, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 9
    test = processed.read_split(root, "test")
    assert [r["reference"] for r in table] == [test["target"][int(r["row"])] for r in table]
    assert all(r["reference"].startswith("It is ") for r in table)  # the last assistant turn
    assert {"base.rouge_l", "adapter.rouge_l", "adapter.chrf", "adapter.embedding_similarity"} <= set(table[0])
    from tasks import textmetrics

    for r in table:  # each per-row score is the metric of that row's output and reference
        assert float(r["adapter.rouge_l"]) == pytest.approx(textmetrics.rouge_l(r["adapter_output"], r["reference"]))
    assert report["lift"]["rouge_l"] == pytest.approx(report["adapter"]["rouge_l"] - report["base"]["rouge_l"])


def test_instruction_with_a_response_column_is_judged_by_what_it_generates(tmp_path: Path):
    """`instruction` + `response_field` is generative too: every scored row generates from its
    prompt (the training row's tokens before the response) and is scored against the response."""
    make_project(tmp_path / "gen", {"preprocess": {"format": "instruction", "text_fields": ["question"],
                                                   "prompt_template": "{question}", "label_field": None,
                                                   "labels": {}, "response_field": "answer",
                                                   "split": {"group_by": None, "validation": 0.1, "test": 0.3}},
                                    "evaluate": {"max_new_tokens": 4, "max_samples": 8, "generation_samples": 0}})
    root = tmp_path / "gen"
    rows = [{"question": f"Spell {w} backwards.", "answer": w[::-1]} for w in
            ["cat", "dog", "bird", "fish", "lion", "bear", "wolf", "frog", "duck", "goat", "mole", "seal"] * 2]
    rows = [{**r, "question": f"{r['question']} ({k})"} for k, r in enumerate(rows)]
    (root / layout.RAW_DATA).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(root / layout.RAW_DATA)
    params = load_params(root / "params.yaml")
    preprocess.run(params)
    make_adapter(params)
    report = json.loads(json.dumps(evaluate.run(params).__dict__))
    saved = json.loads((root / layout.report("evaluate")).read_text())
    n_test = len(processed.read_split(root, "test"))
    assert saved["n_generated"] == saved["n_samples"] == min(8, n_test) > 0  # every row, whatever generation_samples says
    for which in ("base", "adapter"):
        assert {"token_f1", "rouge_l", "chrf", "embedding_similarity", "length_ratio"} <= set(
            k for k, v in report[which].items() if v is not None)
    with open(root / layout.PREDICTIONS, newline="") as f:
        table = list(csv.DictReader(f))
    test = processed.read_split(root, "test")
    assert [r["reference"] for r in table] == [test["target"][int(r["row"])] for r in table]
