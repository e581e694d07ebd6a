"""ORPO and KTO (tasks/preference_trl.py) on the tiny model, on the DPO tests' pairs: KTO's rows
from pairs, training through the train stage's entry point, KTO's one model copy and resume to
the same bytes, each objective's implied reward in evaluate; KTO on unpaired rows."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from support.preference import assert_one_model_copy, pair_rows, preference_project
from tasks import checkpoints, evaluate, layout, models, preference_trl, processed, train

SHORT = {"max_steps": 4, "save_steps": 2}


@pytest.fixture(scope="module")
def orpo(tmp_path_factory):
    params = preference_project(tmp_path_factory.mktemp("orpo") / "p", {"train": {"objective": "orpo", **SHORT}})
    return params, train.run(params)  # what `python -m tasks train` runs


@pytest.fixture(scope="module")
def kto(tmp_path_factory):
    params = preference_project(tmp_path_factory.mktemp("kto") / "p", {"train": {"objective": "kto", **SHORT}})
    return params, train.run(params)


def _log(params) -> list[dict]:
    with open(params.root / layout.TRAIN_LOG) as f:
        return list(csv.DictReader(f))


def _evaluate(params) -> dict:
    evaluate.run(params)
    rep = json.loads((params.root / layout.report("evaluate")).read_text())
    for which in ("base", "adapter"):
        for m in ("preference_accuracy", "logp_accuracy", "reward_margin"):
            low, high = rep["intervals"][which][m]
            assert low <= rep[which][m] <= high
    assert "preference_accuracy" in rep["lift"]  # what the gate reads
    return rep


def test_kto_rows_unpair_each_pair_shuffled_with_kl_completions_rotated_within_micro_batches():
    from datasets import Dataset

    pairs = Dataset.from_dict({"prompt_ids": [[k] for k in range(5)], "chosen_ids": [[10 + k] for k in range(5)],
                               "rejected_ids": [[20 + k] for k in range(5)]})
    rows = preference_trl.kto_rows(pairs, seed=0, micro_batch=4)
    assert len(rows) == 10 and sum(rows["label"]) == 5
    for r in rows:  # chosen -> desirable, rejected -> undesirable, each beside its own prompt
        assert r["completion_ids"] == [(10 if r["label"] else 20) + r["prompt_ids"][0]]
    assert rows["prompt_ids"] != sorted(rows["prompt_ids"])  # shuffled: TRL samples KTO rows in order
    assert preference_trl.kto_rows(pairs, seed=0, micro_batch=4)["prompt_ids"] == rows["prompt_ids"]
    for start in range(0, 10, 4):  # TRL's KL pairing: each micro-batch's completions, rotated by one
        chunk = rows.select(range(start, min(start + 4, 10)))
        done = chunk["completion_ids"]
        assert chunk["KL_completion_ids"] == [done[-1]] + done[:-1]


def test_orpo_trains_without_a_reference_and_ranks_by_its_own_log_probability(orpo):
    params, result = orpo
    report = json.loads((params.root / layout.report("train")).read_text())
    assert report["objective"] == "orpo" and result.steps == 4 and report["tokens_trained"] > 0
    losses = [float(r["loss"]) for r in _log(params)]
    assert losses[-1] < losses[0]  # NLL + odds-ratio term falls
    assert not (params.root / layout.ADAPTER / "ref").exists()  # one adapter saved, no reference copy
    rep = _evaluate(params)
    # reference-free: the base has its own implied reward, beta * (mean chosen logp - mean rejected logp)
    base = models.load_model(models.resolve(params.model))
    test = processed.read_split(params.root, "test", set(preference_trl.PAIR_COLUMNS))
    margins = []
    with torch.no_grad():
        for p, c, r in zip(test["prompt_ids"], test["chosen_ids"], test["rejected_ids"]):
            means = []
            for resp in (c, r):
                ids = torch.tensor([list(p) + list(resp)])
                logp = torch.log_softmax(base(input_ids=ids).logits[0, len(p) - 1: -1].double(), dim=-1)
                means.append(logp.gather(1, torch.tensor(resp).unsqueeze(1)).mean().item())
            margins.append(params.train.beta * (means[0] - means[1]))
    assert rep["base"]["reward_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)
    assert rep["base"]["preference_accuracy"] == sum(m > 0 for m in margins) / len(margins)


def test_kto_keeps_one_model_copy_and_the_reference_pass_is_the_base(kto):
    assert_one_model_copy(kto[0])


def test_kto_starts_at_one_half(kto):
    params = kto[0]
    # policy == reference at step 0 (fresh LoRA, reference = base, KL estimate 0): 1 - sigmoid(0) per row
    assert float(_log(params)[0]["loss"]) == pytest.approx(0.5, abs=1e-6)
    report = json.loads((params.root / layout.report("train")).read_text())
    assert report["objective"] == "kto" and report["beta"] == 0.5 and report["tokens_trained"] > 0


@pytest.mark.parametrize("objective", ["orpo", "kto"])
def test_resume_after_a_checkpoint_gives_the_same_adapter_bytes(objective, request):
    params, result = request.getfixturevalue(objective)
    root = params.root
    assert train.make_plan(params).fingerprint == result.fingerprint  # training left data/processed as it was
    uninterrupted = {p.name: p.read_bytes() for p in (root / layout.ADAPTER).glob("*.safetensors")}
    shutil.rmtree(root / layout.ADAPTER)  # as after a crash between the two checkpoints
    (root / layout.report("train")).unlink()
    shutil.rmtree(root / layout.CHECKPOINTS / result.fingerprint / "checkpoint-4")
    assert checkpoints.step_of(checkpoints.latest_valid(root / layout.CHECKPOINTS / result.fingerprint)) == 2
    again = train.run(params)
    assert again.resumed_from_step == 2 and again.steps == 4
    assert {p.name: p.read_bytes() for p in (root / layout.ADAPTER).glob("*.safetensors")} == uninterrupted


def test_kto_evaluates_with_the_implied_reward_against_the_base(kto):
    rep = _evaluate(kto[0])
    assert rep["base"]["reward_margin"] == 0.0  # the base is its own reference
    assert rep["base"]["preference_accuracy"] == rep["base"]["logp_accuracy"]
    assert rep["adapter"]["reward_margin"] != 0.0


def test_kto_trains_on_unpaired_rows_and_evaluate_reports_no_pair_figures(tmp_path):
    rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in pair_rows(20) for side in ("chosen", "rejected")]
    params = preference_project(tmp_path / "p", {"preprocess": {"preference": {"rows": "unpaired"}},
                                                 "train": {"objective": "kto", "max_steps": 2, "save_steps": 2},
                                                 "register": {"primary_metric": "loss"}}, rows)
    split = processed.read_split(params.root, "train", set(preference_trl.UNPAIRED_COLUMNS))
    assert sorted(set(split["kto_label"])) == [False, True] and "chosen_ids" not in split.column_names
    result = train.run(params)
    assert result.steps == 2 and float(_log(params)[0]["loss"]) == pytest.approx(0.5, abs=1e-6)
    evaluate.run(params)
    rep = json.loads((params.root / layout.report("evaluate")).read_text())
    assert "loss" in rep["adapter"] and "preference_accuracy" not in rep["adapter"]  # no pair to rank
