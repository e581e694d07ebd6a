"""`train.devices: 2` on CPU: two processes over gloo (DDP under torchrun) train the same global
batch as one process, so the loss curve and the adapter match single-process training; a killed
multi-process run leaves no orphan worker behind and resumes to the same bytes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tasks import checkpoints, layout
from tasks.config import load_params
from tasks.errors import ConfigError
from support.training import (SAME_GLOBAL_BATCH, adapter_bytes, curve, finish, launch, losses, sealed_step,
                              tiny_project, wait_until)



@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    params = tiny_project(tmp_path_factory.mktemp("two") / "p", {**SAME_GLOBAL_BATCH, "devices": 2})
    finish(params)
    return params.parent


def test_two_processes_match_one_on_the_same_global_batch(one_process_run, two):
    one_losses, two_losses = losses(one_process_run), losses(two)
    assert len(one_losses) == len(two_losses) == SAME_GLOBAL_BATCH["max_steps"]
    assert two_losses == pytest.approx(one_losses, rel=1e-5, abs=1e-6)
    a = load_file(str(one_process_run / layout.ADAPTER / "adapter_model.safetensors"))
    b = load_file(str(two / layout.ADAPTER / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-5, f"max |adapter(2 processes) - adapter(1 process)| = {diff:.2e}"
    assert any((a[k] != 0).any() for k in a)  # a trained adapter, not the zero-initialised B
    report = json.loads((two / layout.report("train")).read_text())
    assert report["steps"] == SAME_GLOBAL_BATCH["max_steps"]
    # both ranks put their RNG state into the checkpoint, and the manifest (written after both) lists them
    [last] = (two / layout.CHECKPOINTS).glob(f"*/checkpoint-{SAME_GLOBAL_BATCH['max_steps']}")
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
    params = tiny_project(tmp_path / "p", {**SAME_GLOBAL_BATCH, "devices": 2})
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
