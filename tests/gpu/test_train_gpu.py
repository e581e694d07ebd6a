"""Train stage on CUDA in bf16 (opt-in: `pytest -m gpu`; skipped without a GPU)."""

from __future__ import annotations

import json

import pytest
import torch

from tasks import layout, train
from tasks.config import load_params
from tests.unit.test_train import tiny_project

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
