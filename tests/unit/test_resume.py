"""Kill-and-resume: `python -m tasks train` SIGKILLed at random points (also inside a checkpoint save)
and rerun ends byte-identical to an uninterrupted run, with the same loss curve."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from support.training import adapter_bytes, curve, finish, kill_when, launch, tiny_project
from tasks import checkpoints, layout

# Checkpoint every step so that random kills often land inside a save; dropout makes RNG state matter.
RESUME_PARAMS = {"max_steps": 6, "save_steps": 1, "global_batch_size": 4, "micro_batch_size": 2,
                 "peft": {"dropout": 0.1}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    params = tiny_project(tmp_path_factory.mktemp("ref") / "p", RESUME_PARAMS)
    finish(params)
    return params.parent


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_random_points_then_rerun_is_byte_identical(tmp_path, reference, seed):
    rng = random.Random(seed)
    params = tiny_project(tmp_path / "p", RESUME_PARAMS)
    root = params.parent
    cut_saves = 0
    # two kills per seed: right as a checkpoint folder appears (inside the save), or a bit later
    for step in sorted(rng.sample(range(1, RESUME_PARAMS["max_steps"]), 2)):
        cut_saves += kill_when(launch(params), root, step, extra_delay=rng.choice([0.0, rng.uniform(0, 0.5)]))
    assert not (root / layout.report("train")).exists(), "the run finished before it was killed"
    finish(params)

    report = json.loads((root / layout.report("train")).read_text())
    assert report["steps"] == RESUME_PARAMS["max_steps"] and report["resumed_from_step"] is not None
    assert adapter_bytes(root) == adapter_bytes(reference)
    assert curve(root) == curve(reference)
    print(f"seed {seed}: resumed from step {report['resumed_from_step']}, kills inside a save: {cut_saves}")


def test_kill_inside_a_save_leaves_an_unsealed_checkpoint_that_is_skipped(tmp_path, reference):
    params = tiny_project(tmp_path / "p", RESUME_PARAMS)
    root = params.parent
    for attempt in range(5):  # the save of a tiny adapter takes milliseconds; retry until the kill lands in it
        if kill_when(launch(params), root, 3 + attempt % 2, extra_delay=0.0):
            break
    else:
        pytest.fail("never managed to kill inside a checkpoint save")
    unsealed = [c for c in (root / layout.CHECKPOINTS).glob("*/checkpoint-*") if not checkpoints.verify(c)]
    assert unsealed
    finish(params)
    assert adapter_bytes(root) == adapter_bytes(reference)
    assert curve(root) == curve(reference)


def test_rerun_of_a_finished_run_does_not_train(reference):
    before = (reference / layout.report("train")).read_bytes()
    finish(reference / "params.yaml")
    assert (reference / layout.report("train")).read_bytes() == before  # skipped: report untouched


def test_killed_after_the_last_checkpoint_finishes_without_training(tmp_path, reference):
    """A kill after the final checkpoint is sealed but before the outputs are written: the rerun
    takes the sealed checkpoint as the result (no extra step) and ends byte-identical."""
    params = tiny_project(tmp_path / "p", RESUME_PARAMS)
    root = params.parent
    finish(params)
    for output in (root / layout.ADAPTER, root / layout.report("train")):
        subprocess.run(["rm", "-rf", str(output)], check=True)
    finish(params)
    report = json.loads((root / layout.report("train")).read_text())
    assert report["steps"] == RESUME_PARAMS["max_steps"]
    assert report["resumed_from_step"] == RESUME_PARAMS["max_steps"]
    assert adapter_bytes(root) == adapter_bytes(reference)
    assert curve(root) == curve(reference)
