"""DPO training (tasks/preference_train.py) on the tiny model: one model copy (the reference is the
base with the adapter off), resume to the same bytes, start from an adapter, evaluation columns."""

from __future__ import annotations

import csv
import json
import math
import shutil

import pytest
import yaml

from support.preference import assert_one_model_copy, preference_project
from tasks import checkpoints, evaluate, layout, train
from tasks.config import load_params


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    params = preference_project(tmp_path_factory.mktemp("dpo") / "p", {"train": {"max_steps": 4, "save_steps": 2}})
    result, model = train.fit(params)
    return params, result, model


def test_one_model_copy_and_the_reference_pass_is_the_base(trained):
    assert_one_model_copy(trained[0])


def test_dpo_starts_at_log_2_and_resumes_to_the_same_adapter_bytes(trained):
    params, result, _ = trained
    root = params.root
    with open(root / layout.TRAIN_LOG) as f:
        first = next(csv.DictReader(f))
    # policy == reference at step 0 (fresh LoRA, reference = base): DPO's sigmoid loss is log 2 exactly
    assert float(first["loss"]) == pytest.approx(math.log(2), abs=1e-5)
    report = json.loads((root / layout.report("train")).read_text())
    assert report["objective"] == "dpo" and report["beta"] == 0.5 and report["init_adapter"] is None
    uninterrupted = {p.name: p.read_bytes() for p in (root / layout.ADAPTER).glob("*.safetensors")}
    # as after a crash between the two checkpoints: outputs and the last checkpoint gone
    shutil.rmtree(root / layout.ADAPTER)
    (root / layout.report("train")).unlink()
    shutil.rmtree(root / layout.CHECKPOINTS / result.fingerprint / "checkpoint-4")
    assert checkpoints.step_of(checkpoints.latest_valid(root / layout.CHECKPOINTS / result.fingerprint)) == 2
    again, _ = train.fit(params)
    assert again.resumed_from_step == 2 and again.steps == 4
    assert {p.name: p.read_bytes() for p in (root / layout.ADAPTER).glob("*.safetensors")} == uninterrupted


def test_init_adapter_folder_is_the_start_and_is_recorded(trained):
    params, result, _ = trained
    shutil.copytree(params.root / layout.ADAPTER, params.root / "start-adapter")
    data = yaml.safe_load((params.root / "params.yaml").read_text())
    data["train"].update({"init_adapter": "start-adapter", "max_steps": 1})
    (params.root / "params-init.yaml").write_text(yaml.safe_dump(data))
    res, _ = train.fit(load_params(params.root / "params-init.yaml"))
    report = json.loads((params.root / layout.report("train")).read_text())
    assert report["init_adapter"] == "start-adapter" and report["init_adapter_sha256"] == result.adapter_sha256
    with open(params.root / layout.TRAIN_LOG) as f:  # the policy starts from the trained adapter, not the base
        assert abs(float(next(csv.DictReader(f))["loss"]) - math.log(2)) > 1e-4
    assert res.fingerprint != result.fingerprint


def test_evaluate_reports_preference_figures_with_intervals(trained):
    params, _, _ = trained
    train.fit(params)  # restores the 4-step adapter after the init-adapter test (or skips)
    evaluate.run(params)
    rep = json.loads((params.root / layout.report("evaluate")).read_text())
    assert rep["base"]["reward_margin"] == 0.0  # the base is its own reference
    for which in ("base", "adapter"):
        for m in ("preference_accuracy", "logp_accuracy", "reward_margin"):
            low, high = rep["intervals"][which][m]
            assert low <= rep[which][m] <= high
    assert rep["base"]["preference_accuracy"] == rep["base"]["logp_accuracy"]  # the base ranks by log-prob
    assert rep["adapter"]["reward_margin"] != 0.0 and "preference_accuracy" in rep["lift"]
