"""`train.devices: 2` on CPU: two processes over gloo (DDP under torchrun) train the same global
batch as one process, so the loss curve and the adapter match single-process training; a killed
multi-process run leaves no orphan worker behind and resumes to the same bytes."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tasks import checkpoints, layout
from tasks.config import load_params
from tasks.errors import ConfigError
from support.training import adapter_bytes, curve, finish, launch, sealed_step, tiny_project, wait_until

# Same global batch either way: 1 process x micro 2 x accumulation 4, or 2 processes x micro 2 x 2.
COMMON = {"max_steps": 6, "global_batch_size": 8, "micro_batch_size": 2, "save_steps": 3}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    params = tiny_project(tmp_path_factory.mktemp("one") / "p", {**COMMON, "devices": 1})
    finish(params)
    return params.parent


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    params = tiny_project(tmp_path_factory.mktemp("two") / "p", {**COMMON, "devices": 2})
    finish(params)
    return params.parent


def losses(root: Path) -> list[float]:
    with open(root / layout.TRAIN_LOG) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_two_processes_match_one_on_the_same_global_batch(single, two):
    one_losses, two_losses = losses(single), losses(two)
    assert len(one_losses) == len(two_losses) == COMMON["max_steps"]
    assert two_losses == pytest.approx(one_losses, rel=1e-5, abs=1e-6)
    a = load_file(str(single / layout.ADAPTER / "adapter_model.safetensors"))
    b = load_file(str(two / layout.ADAPTER / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-5, f"max |adapter(2 processes) - adapter(1 process)| = {diff:.2e}"
    assert any((a[k] != 0).any() for k in a)  # a trained adapter, not the zero-initialised B
    report = json.loads((two / layout.report("train")).read_text())
    assert report["steps"] == COMMON["max_steps"]
    # both ranks put their RNG state into the checkpoint, and the manifest (written after both) lists them
    [last] = (two / layout.CHECKPOINTS).glob(f"*/checkpoint-{COMMON['max_steps']}")
    assert checkpoints.verify(last)
    listed = json.loads((last / checkpoints.MANIFEST).read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= listed.keys()
    print(f"FIGURE 2-process gloo vs 1 process: max |loss diff| "
          f"{max(abs(x - y) for x, y in zip(one_losses, two_losses)):.2e}, max |adapter diff| {diff:.2e}")


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:  # the process ended while we looked
            pass
    return found


def test_killed_launcher_leaves_no_worker_and_rerun_resumes_to_the_same_bytes(tmp_path, two):
    params = tiny_project(tmp_path / "p", {**COMMON, "devices": 2})
    root = params.parent
    proc = launch(params)
    wait_until(proc, lambda: sealed_step(root, 3), 300)
    proc.kill()  # SIGKILL of the launcher only: torchrun and its workers must not train on as orphans
    proc.wait()
    deadline = time.monotonic() + 60
    while _processes_mentioning(str(params)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _processes_mentioning(str(params)), "workers outlived their launcher"
    assert not (root / layout.report("train")).exists(), "the workers finished the run after the kill"

    finish(params)
    report = json.loads((root / layout.report("train")).read_text())
    assert report["resumed_from_step"] == 3
    assert adapter_bytes(root) == adapter_bytes(two)
    assert curve(root) == curve(two)


def test_batch_that_does_not_split_over_devices_is_refused_naming_the_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"global_batch_size .*micro_batch_size .*devices"):
        load_params(tiny_project(tmp_path / "a", {"global_batch_size": 6, "micro_batch_size": 2, "devices": 2}))
    with pytest.raises(ConfigError, match=r"train\.devices = 0: must be at least 1, or auto"):
        load_params(tiny_project(tmp_path / "b", {"devices": 0}))
