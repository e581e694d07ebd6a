"""`random:tiny` resolves to real safetensors weights with a self-contained tokenizer; bad specs fail clearly."""

from __future__ import annotations

import pytest
import torch

from tasks import models
from tasks.config import ModelConfig
from tasks.errors import ModelError


def test_random_tiny_resolves_loads_and_runs():
    base = models.resolve(ModelConfig(base="random:tiny"))
    assert base.spec == "random:tiny" and not base.is_encoder
    assert len(base.weights_sha256) == 64
    assert models.resolve(ModelConfig(base="random:tiny")).weights_sha256 == base.weights_sha256

    tok = models.load_tokenizer(base)
    model = models.load_model(base)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == model.config.eos_token_id
    ids = tok("héllo", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "héllo"  # byte-level: any text round-trips
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), models.SHAPES["tiny"]["vocab_size"])
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("spec, fragment", [
    ("random:huge", "unknown random shape"),
    ("embedded:gpt-9", "unknown embedded model"),
])
def test_unknown_specs_fail_clearly(spec, fragment):
    with pytest.raises(ModelError, match=fragment):
        models.resolve(ModelConfig(base=spec))


def test_local_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelError, match="only safetensors"):
        models.resolve(ModelConfig(base=str(tmp_path)))


def test_pyfunc_weights_hash_stays_the_same_definition_as_models(tmp_path):
    """tasks/adapter_pyfunc.py runs standalone inside MLflow, so it carries its own copy of
    weights_sha256; the copy must give the digest the registry recorded with models.weights_sha256."""
    from safetensors.torch import save_file
    import torch

    from tasks import adapter_pyfunc, models

    save_file({"a": torch.arange(6.0).reshape(2, 3)}, str(tmp_path / "adapter_model.safetensors"))
    save_file({"b": torch.ones(4)}, str(tmp_path / "extra.safetensors"))
    (tmp_path / "adapter_config.json").write_text("{}")  # not weights: in neither digest
    assert adapter_pyfunc.weights_sha256(tmp_path) == models.weights_sha256(tmp_path)
