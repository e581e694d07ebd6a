"""Train stage on CUDA in bf16 (opt-in: `pytest -m gpu`; skipped without a GPU)."""

from __future__ import annotations

import json

import pytest
import torch

from tasks import layout, train
from tasks.config import load_params
from support.training import tiny_project

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("fast_path", [False, True])
def test_tiny_trains_in_bf16_on_cuda(tmp_path, fast_path):
    params = load_params(tiny_project(tmp_path / "p", {"max_steps": 6, "save_steps": 3, "device": "cuda",
                                                       "fast_path": fast_path, "learning_rate": 5.0e-3}))
    result = train.run(params)
    report = json.loads((params.root / layout.report("train")).read_text())
    assert report["device"] == "cuda" and report["dtype"] == "bf16" and result.steps == 6
    assert report["peak_memory_kind"] == "cuda_max_allocated" and report["peak_memory_bytes"] > 0
    assert result.final_loss is not None and result.final_loss == result.final_loss  # finite, not NaN
    assert report["tokens_trained"] > 0


def test_after_fast_path_training_a_new_model_runs_on_cpu(tmp_path):
    # The flow runs train (Liger patches transformers process-wide) and then the CPU merge in one
    # process; a model built after training must be a plain transformers model.
    from tasks import models

    params = load_params(tiny_project(tmp_path / "p", {"max_steps": 2, "save_steps": 2, "device": "cuda",
                                                       "fast_path": True}))
    train.run(params)
    model = models.load_model(models.resolve(params.model), dtype=torch.float32).eval()  # merge's load, CPU
    norm = type(model.model.norm)
    assert norm.__module__.startswith("transformers."), norm
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
