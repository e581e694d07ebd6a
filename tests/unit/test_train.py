"""Train stage on the tiny random model (CPU): loss falls, determinism, skip, NaN stop, QLoRA error, outputs.

The processed data is built with the real byte tokenizer in the layout preprocess writes
(docs/architecture.md; support/training.py), so these tests do not depend on the preprocess stage.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from support.training import adapter_bytes, tiny_project
from tasks import adapters, layout, models, train
from tasks.config import load_params
from tasks.errors import ModelError, TrainingError

def test_loss_falls_and_outputs_are_complete(tmp_path):
    params = load_params(tiny_project(tmp_path / "p", {"max_steps": 30, "learning_rate": 5.0e-3,
                                                       "save_steps": 100, "logging_steps": 1}))
    t0 = time.perf_counter()
    result = train.run(params)
    print(f"30 steps in {time.perf_counter() - t0:.1f}s")
    root = params.root
    with open(root / layout.TRAIN_LOG) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert set(rows[0]) == set(train.LOG_FIELDS)
    losses = [float(r["loss"]) for r in rows]
    # random:tiny ties a 0.02-std embedding to its head behind an RMSNorm, so its logits cannot get
    # sharp: the reachable loss is ~4.5 nats, not ~0. A fall of 0.4 nats is far beyond noise.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.4, losses
    assert all(float(r["tokens_per_second"]) > 0 and float(r["grad_norm"]) >= 0 for r in rows)

    report = json.loads((root / layout.report("train")).read_text())
    assert report["steps"] == 30 and result.steps == 30
    assert report["final_loss"] == pytest.approx(losses[-1])
    assert 0 < report["trainable_params"] < report["total_params"]
    # non-padding tokens only: 30 steps x 4 rows = 7.5 passes over the 16 rows
    from datasets import load_from_disk

    epoch_tokens = sum(len(ids) for ids in load_from_disk(str(root / layout.PROCESSED))["train"]["input_ids"])
    assert 7 * epoch_tokens < report["tokens_trained"] < 8 * epoch_tokens
    assert report["device"] == "cpu" and report["dtype"] == "fp32"
    assert report["adapter_sha256"] == adapters.adapter_sha256(root / layout.ADAPTER) == result.adapter_sha256
    names = {p.name for p in (root / layout.ADAPTER).iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    assert (root / layout.LOSS_CURVE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_params_give_byte_identical_adapter_and_finished_run_is_skipped(tmp_path):
    overrides = {"max_steps": 3, "save_steps": 2, "peft": {"method": "lora", "dropout": 0.1}}
    a = load_params(tiny_project(tmp_path / "a", overrides))
    b = load_params(tiny_project(tmp_path / "b", overrides))
    ra, rb = train.run(a), train.run(b)
    assert not ra.skipped and ra.fingerprint == rb.fingerprint
    assert adapter_bytes(a.root) == adapter_bytes(b.root)

    again = train.run(a)
    assert again.skipped and again.adapter_sha256 == ra.adapter_sha256 and again.steps == 3


def test_changed_param_or_tampered_adapter_retrains(tmp_path):
    params = load_params(tiny_project(tmp_path / "p", {"max_steps": 2}))
    first = train.run(params)
    (params.root / layout.ADAPTER / "adapter_config.json").write_text("{}")
    assert not train.run(params).skipped  # hash mismatch -> trained again (resumed at the final checkpoint)

    changed = load_params(tiny_project(tmp_path / "p", {"max_steps": 2, "learning_rate": 2.0e-3}))
    second = train.run(changed)
    assert second.fingerprint != first.fingerprint and second.resumed_from_step is None
    # the stale run's checkpoints are gone; only the current fingerprint's remain
    assert [p.name for p in (params.root / layout.CHECKPOINTS).iterdir()] == [second.fingerprint]


def test_non_finite_loss_stops_with_the_step_and_writes_no_adapter(tmp_path):
    # Responses cut off by truncation leave every label at -100: the mean loss is 0/0 = NaN.
    # (A huge learning rate does not reliably give NaN here: with clipping, fp32 and RMSNorm,
    # random:tiny and SmolLM2 at lr 10-100 collapse to a uniform output, loss = ln(vocab).)
    params = load_params(tiny_project(tmp_path / "p", {"max_steps": 5, "save_steps": 1}))
    from datasets import load_from_disk

    processed = params.root / layout.PROCESSED
    data = load_from_disk(str(processed))
    data = data.map(lambda row: {"labels": [-100] * len(row["labels"])})
    data.save_to_disk(str(processed.with_name("masked")))
    import shutil

    shutil.rmtree(processed)
    processed.with_name("masked").rename(processed)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 1 of 5"):
        train.run(params)
    assert not (params.root / layout.ADAPTER).exists()
    assert not (params.root / layout.report("train")).exists()
    assert not list((params.root / layout.CHECKPOINTS).glob("*/checkpoint-*"))


def test_qlora_on_cpu_fails_before_loading_anything(tmp_path, monkeypatch):
    params = load_params(tiny_project(tmp_path / "p", {"device": "cpu", "peft": {"quantize_4bit": True}}))

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    monkeypatch.setattr(models, "resolve", no_load)
    with pytest.raises(ModelError, match=r"quantize_4bit \(QLoRA\) needs a CUDA GPU"):
        train.run(params)


@pytest.mark.parametrize("base", ["random:tiny", "embedded:minilm-l6"])
def test_classification_head_trains_and_reloads(tmp_path, base):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    params = load_params(tiny_project(tmp_path / "p", {"max_steps": 2}, fmt="classification", base=base))
    result = train.run(params)
    report = json.loads((params.root / layout.report("train")).read_text())
    assert report["task_type"] == "SEQ_CLS" and result.steps == 2

    resolved = models.resolve(params.model)
    tok = models.load_tokenizer(resolved)
    model = AutoModelForSequenceClassification.from_pretrained(resolved.path, num_labels=2, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    model = PeftModel.from_pretrained(model, result.adapter_dir).eval()
    batch = tok(["a warm, funny film", "dull"], return_tensors="pt", padding=True)
    logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    # the classifier head is trained and saved with the adapter (modules_to_save), not left random
    saved = set(__import__("safetensors.torch", fromlist=["load_file"]).load_file(
        Path(result.adapter_dir) / "adapter_model.safetensors"))
    assert any("score" in k or "classifier" in k for k in saved), sorted(saved)[:5]


def test_training_arguments_come_from_params_alone_and_build_real_training_arguments(tmp_path):
    from transformers import TrainingArguments

    from tasks.config import TrainConfig

    cfg = TrainConfig(global_batch_size=16, micro_batch_size=2, warmup_steps=5.0, learning_rate=3.0e-4,
                      gradient_checkpointing=True)
    one = train.training_arguments(cfg, tmp_path / "run", device="cpu", dtype_name="fp32", world=1)
    assert one["gradient_accumulation_steps"] == 8 and one["warmup_steps"] == 5 and isinstance(one["warmup_steps"], int)
    assert one["use_cpu"] and not one["bf16"] and one["output_dir"] == str(tmp_path / "run")
    assert one["activation_checkpointing"] and one["activation_checkpointing_kwargs"] == {"use_reentrant": False}
    assert "ddp_backend" not in one and "ddp_find_unused_parameters" not in one
    # the same dict, given twice, is the same: nothing but the arguments feeds it
    assert one == train.training_arguments(cfg, tmp_path / "run", device="cpu", dtype_name="fp32", world=1)

    two = train.training_arguments(cfg, tmp_path / "run", device="cpu", dtype_name="fp32", world=2)
    assert two["gradient_accumulation_steps"] == 4  # 16 = 2 per pass x 2 processes x 4
    assert two["ddp_backend"] == "gloo" and two["ddp_find_unused_parameters"] is False
    gpu = train.training_arguments(TrainConfig(warmup_steps=0.25), tmp_path, device="cuda", dtype_name="bf16",
                                   world=2, extra={"optim": "adamw_torch_fused", "learning_rate": 9.0})
    assert gpu["bf16"] and not gpu["use_cpu"] and "ddp_backend" not in gpu and gpu["warmup_steps"] == 0.25
    assert gpu["optim"] == "adamw_torch_fused" and gpu["learning_rate"] == 2.0e-4  # extra adds, never overrides

    args = TrainingArguments(**one)
    assert (args.max_steps, args.learning_rate, args.seed, args.save_total_limit) == (100, 3.0e-4, 42, 2)
    assert args.report_to == []  # "none": no integration logs anywhere


def test_epochs_train_the_steps_the_trainer_derives_and_the_report_has_device_hours(tmp_path):
    params = load_params(tiny_project(tmp_path / "p", {"max_steps": None, "epochs": 1.5, "save_steps": 100}))
    from datasets import load_from_disk

    rows = len(load_from_disk(str(params.root / layout.PROCESSED))["train"])
    # 16 rows, 2 per pass, 2 passes per optimizer step: 4 steps an epoch, 1.5 epochs = 6 steps
    assert rows == 16 and params.train.optimizer_steps(rows) == 6
    args = train.training_arguments(params.train, tmp_path, device="cpu", dtype_name="fp32", world=1)
    assert (args["max_steps"], args["num_train_epochs"]) == (-1, 1.5)
    result = train.run(params)
    report = json.loads((params.root / layout.report("train")).read_text())
    assert result.steps == report["steps"] == 6
    assert report["devices"] == 1 and report["device_hours"] == pytest.approx(report["wall_seconds"] / 3600)


def test_training_arguments_refuse_a_global_batch_that_does_not_split_over_the_processes(tmp_path):
    from tasks.config import TrainConfig
    from tasks.errors import ConfigError

    # `devices: auto` resolves to a process count only at run time: 16 rows do not split over 3 x 2
    with pytest.raises(ConfigError, match="global_batch_size"):
        train.training_arguments(TrainConfig(global_batch_size=16, micro_batch_size=2), tmp_path, device="cuda",
                                 dtype_name="bf16", world=3)
