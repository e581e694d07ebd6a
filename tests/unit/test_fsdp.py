"""`train.sharding: fsdp` on CPU: two processes over gloo train FSDP2-sharded (through accelerate)
the same global batch as one process; the adapter rank 0 gathers and saves is what evaluate and
merge load, a killed sharded run resumes from its sealed checkpoint to the same bytes, and the
combinations that are not supported are refused naming the key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tasks import adapters, checkpoints, layout, models
from tasks.config import ModelConfig, TrainConfig, load_params
from tasks.errors import ConfigError
from tasks.train import training_arguments
from support.projects import REPO
from support.training import (SAME_GLOBAL_BATCH, adapter_bytes, curve, finish, launch, losses, sealed_step,
                              tiny_project, wait_until)

SHARDED = {**SAME_GLOBAL_BATCH, "devices": 2, "sharding": "fsdp"}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    params = tiny_project(tmp_path_factory.mktemp("fsdp") / "p", SHARDED)
    finish(params)
    return params.parent


def test_sharded_training_matches_one_process_and_saves_the_whole_adapter(one_process_run, sharded):
    one_losses, fsdp_losses = losses(one_process_run), losses(sharded)
    assert len(fsdp_losses) == SAME_GLOBAL_BATCH["max_steps"]
    assert fsdp_losses == pytest.approx(one_losses, rel=1e-5, abs=1e-6)
    a = load_file(str(one_process_run / layout.ADAPTER / "adapter_model.safetensors"))
    b = load_file(str(sharded / layout.ADAPTER / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert {k: (t.dtype, t.shape) for k, t in a.items()} == {k: (t.dtype, t.shape) for k, t in b.items()}
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-5, f"max |adapter(FSDP, 2 processes) - adapter(1 process)| = {diff:.2e}"
    assert any((b[k] != 0).any() for k in b)  # a trained adapter, not the zero-initialised B
    config = json.loads((sharded / layout.ADAPTER / "adapter_config.json").read_text())
    assert config == json.loads((one_process_run / layout.ADAPTER / "adapter_config.json").read_text())

    # It really ran sharded: accelerate's FSDP save wrote its files (DDP writes optimizer.pt instead),
    # holding the trainable parameters only, and the manifest, sealed after both ranks, lists them.
    [last] = (sharded / layout.CHECKPOINTS).glob(f"*/checkpoint-{SAME_GLOBAL_BATCH['max_steps']}")
    assert checkpoints.verify(last)
    listed = json.loads((last / checkpoints.MANIFEST).read_text())["files"]
    assert {"pytorch_model_fsdp.bin", "optimizer.bin", "adapter_model.safetensors", "rng_state_0.pth",
            "rng_state_1.pth"} <= listed.keys()
    assert "optimizer.pt" not in listed
    fsdp_weights = torch.load(last / "pytorch_model_fsdp.bin", weights_only=True)
    assert {k for k in fsdp_weights if "lora_" in k} and all("lora_" in k or "lm_head" in k for k in fsdp_weights)

    # What evaluate and merge do with it: attach it to the base and get its weights back.
    base = models.resolve(ModelConfig(base="random:tiny"))
    model = adapters.attach_adapter(models.load_model(base), sharded / layout.ADAPTER, base)
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert all(torch.equal(loaded[k], b[k]) for k in b)
    report = json.loads((sharded / layout.report("train")).read_text())
    assert report["steps"] == SAME_GLOBAL_BATCH["max_steps"] and report["devices"] == 2
    print(f"FIGURE FSDP 2-process gloo vs 1 process: max |loss diff| "
          f"{max(abs(x - y) for x, y in zip(one_losses, fsdp_losses)):.2e}, max |adapter diff| {diff:.2e}")


def test_killed_sharded_run_resumes_from_its_sealed_checkpoint_to_the_same_bytes(tmp_path, sharded):
    params = tiny_project(tmp_path / "p", SHARDED)
    root = params.parent
    proc = launch(params)
    wait_until(proc, lambda: sealed_step(root, 3), 300)
    proc.kill()  # the launcher: torchrun and its workers stop with it (tasks/distributed.py)
    proc.wait()
    assert not (root / layout.report("train")).exists(), "the run finished before the kill"
    finish(params)
    report = json.loads((root / layout.report("train")).read_text())
    assert report["resumed_from_step"] == 3
    assert adapter_bytes(root) == adapter_bytes(sharded)
    assert curve(root) == curve(sharded)


@pytest.mark.parametrize("overrides, key", [
    ({"devices": 1}, "train.devices"),
    ({"objective": "dpo", "fast_path": False, "devices": "auto"}, "train.objective"),
    ({"peft": {"quantize_4bit": True}}, "train.peft.quantize_4bit"),
    ({"peft": {"method": "ia3"}}, "train.peft.method"),
    ({"peft": {"init": "pissa"}}, "train.peft.init"),
    ({"peft": {"use_dora": True}}, "train.peft.use_dora"),
])
def test_unsupported_combinations_are_refused_naming_the_key(tmp_path, overrides, key):
    peft = {**yaml.safe_load((REPO / "params.yaml").read_text())["train"]["peft"], "last_layers": None}
    train = {"devices": 2, "sharding": "fsdp", **overrides, "peft": {**peft, **overrides.get("peft", {})}}
    with pytest.raises(ConfigError, match=r"train\.sharding 'fsdp'.*" + re.escape(key)):
        load_params(tiny_project(tmp_path / "p", train))


def test_sharding_needs_several_processes_when_devices_resolve_late():
    cfg = TrainConfig(devices="auto", sharding="fsdp", global_batch_size=8, micro_batch_size=2)
    with pytest.raises(ConfigError, match=r"train\.sharding 'fsdp' needs several processes.*resolved to 1"):
        training_arguments(cfg, Path("out"), device="cpu", dtype_name="fp32", world=1)
    args = training_arguments(cfg, Path("out"), device="cpu", dtype_name="fp32", world=2)
    assert args["fsdp"] is True and args["fsdp_config"]["version"] == 2
    assert "fsdp" not in training_arguments(TrainConfig(devices=2), Path("out"), device="cpu", dtype_name="fp32",
                                            world=2)
