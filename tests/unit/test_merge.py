"""Merge stage on the tiny random model (CPU) with real adapters: parity, skip, refusals, no-op."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from support.adapters import make_adapter
from support.projects import prepared_project
from tasks import layout, merge, models
from tasks.config import Params
from tasks.errors import ModelError


@pytest.fixture
def tiny(tmp_path: Path) -> Params:
    return prepared_project(tmp_path / "proj")


def with_merge(params: Params, **changes) -> Params:
    return params.model_copy(update={"merge": params.merge.model_copy(update=changes)})


def merged_logits(folder: Path, rows: list[list[int]]) -> list[torch.Tensor]:
    model = models.load_model(models.BaseModel(str(folder), str(folder), None, "", False), dtype=torch.float32)
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0] for ids in rows]


def test_lora_merge_parity_noop_and_refusal(tiny: Params):
    make_adapter(tiny, scale=0.05)
    result = merge.run(tiny)
    report = json.loads((tiny.root / layout.report("merge")).read_text())
    assert result.merged and not result.reused and report["passed"]
    assert 0.0 <= report["max_abs_logit_diff"] <= 1e-4 and report["max_abs_logit_diff"] == result.max_abs_logit_diff
    out = tiny.root / layout.MERGED
    assert {"config.json", "model.safetensors", "tokenizer.json", "MERGE.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.bin")) and not list(out.glob("*adapter*"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"

    # Independent check: the saved folder alone reproduces base + adapter (not base alone).
    from peft import PeftModel

    base = models.resolve(tiny.model)
    rows = [[5, 70, 80, 90, 100, 110], [256, 60, 61]]
    with torch.no_grad():
        plain = models.load_model(base)
        base_logits = [plain(input_ids=torch.tensor([ids])).logits[0] for ids in rows]
        with_adapter = PeftModel.from_pretrained(plain, str(tiny.root / layout.ADAPTER)).eval()
        ref = [with_adapter(input_ids=torch.tensor([ids])).logits[0] for ids in rows]
    got = merged_logits(out, rows)
    assert max(float((a - b).abs().max()) for a, b in zip(ref, got)) <= 1e-4
    assert min(float((a - b).abs().max()) for a, b in zip(base_logits, got)) > 1e-2  # the update is really in

    # Second run, same adapter/base/dtype: a no-op that leaves the folder and report untouched.
    weights = out / "model.safetensors"
    stamp = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    report_bytes = (tiny.root / layout.report("merge")).read_bytes()
    again = merge.run(tiny)
    assert again.reused and again.max_abs_logit_diff == result.max_abs_logit_diff
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == stamp
    assert (tiny.root / layout.report("merge")).read_bytes() == report_bytes

    # The merged folder as model.base with the same adapter: refused (it would add the update twice).
    as_base = tiny.model_copy(update={"model": tiny.model.model_copy(update={"base": str(out)})})
    with pytest.raises(ModelError, match="already contains this adapter.*Set model.base to the original base"):
        merge.run(as_base)


def test_bf16_target_merges_in_bf16_within_its_rounding(tiny: Params):
    """The merge works in the saved dtype (one copy of the model): every layer passes the float64
    check, the end-to-end tolerance is merge.tolerance scaled to bf16, and the saved weights are
    within bf16 rounding of an independent fp32 merge."""
    from peft import PeftModel

    make_adapter(tiny, scale=0.05)
    result = merge.run(with_merge(tiny, dtype="bf16"))
    report = json.loads((tiny.root / layout.report("merge")).read_text())
    assert result.dtype == "bfloat16" and report["passed"] and report["parity_dtype"] == "bfloat16"
    assert report["layers_checked"] > 0 and 0.0 <= report["max_layer_error"] <= 1.0
    eps = torch.finfo(torch.bfloat16).eps
    assert report["tolerance"] == pytest.approx(1e-4 * eps / torch.finfo(torch.float32).eps)
    assert result.max_abs_logit_diff <= report["tolerance"]
    out = tiny.root / layout.MERGED
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}

    # Rounding W, the delta and the sum to bf16 moves each entry by at most eps (|W| + |W'|).
    saved = load_file(str(out / "model.safetensors"))
    plain = {k: v.clone() for k, v in models.load_model(models.resolve(tiny.model), dtype=torch.float32).state_dict().items()}
    reference = PeftModel.from_pretrained(models.load_model(models.resolve(tiny.model), dtype=torch.float32),
                                          str(tiny.root / layout.ADAPTER)).merge_and_unload().state_dict()
    changed = 0
    for name, w in saved.items():
        ref = reference[name].float()
        assert ((w.float() - ref).abs() <= eps * (plain[name].abs() + ref.abs()) + 1e-30).all(), name
        changed += not torch.equal(plain[name].to(torch.bfloat16), w)
    assert changed > 0  # the update is in the saved weights


def test_a_wrong_layer_merge_is_caught_by_the_layer_check(tiny: Params, monkeypatch):
    """Fault injection: a merge that adds every update twice fails the float64 layer check, and
    nothing is left in models/merged."""
    from peft.tuners.lora import Linear

    make_adapter(tiny, scale=0.05)
    real_merge = Linear.merge

    def doubled(self, safe_merge=False, adapter_names=None):
        real_merge(self, safe_merge=safe_merge, adapter_names=adapter_names)
        for name in self.merged_adapters:
            self.get_base_layer().weight.data += self.get_delta_weight(name)

    monkeypatch.setattr(Linear, "merge", doubled)
    with pytest.raises(ModelError, match="float64 layer check"):
        merge.run(tiny)
    assert not (tiny.root / layout.MERGED).exists()
    assert json.loads((tiny.root / layout.report("merge")).read_text())["passed"] is False


def test_prompt_tuning_is_skipped_with_reason(tiny: Params):
    make_adapter(tiny, method="prompt_tuning")
    result = merge.run(tiny)
    report = json.loads((tiny.root / layout.report("merge")).read_text())
    assert not result.merged and report["merged"] is False
    assert report["method"] == "PROMPT_TUNING" and "nothing to merge" in report["reason"]
    marker = json.loads((tiny.root / layout.MERGED / merge.MARKER).read_text())
    assert marker["merged"] is False and not list((tiny.root / layout.MERGED).glob("*.safetensors"))


def test_nan_adapter_is_refused(tiny: Params):
    adapter = make_adapter(tiny)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(weights))
    with pytest.raises(ModelError, match=f"tensor '{key}' has 1 non-finite"):
        merge.run(tiny)
    assert not (tiny.root / layout.MERGED).exists()


def test_tolerance_exceeded_fails_and_leaves_nothing(tiny: Params):
    make_adapter(tiny, scale=0.05)
    first = merge.run(tiny)  # a good merge first: the failing run must not leave it behind
    assert first.max_abs_logit_diff > 0.0  # fp32 merge is not bit-exact, so a tiny tolerance is exceeded
    with pytest.raises(ModelError, match="max \\|logit diff\\|.*> merge.tolerance"):
        merge.run(with_merge(tiny, tolerance=first.max_abs_logit_diff / 10))
    assert not (tiny.root / layout.MERGED).exists()
    report = json.loads((tiny.root / layout.report("merge")).read_text())
    assert report["passed"] is False and report["max_abs_logit_diff"] > report["tolerance"]


def test_adapter_for_another_base_is_refused(tiny: Params, tmp_path: Path):
    from transformers import LlamaForCausalLM

    other = tmp_path / "other-base"
    config = models.random_config("tiny")
    config.hidden_size, config.intermediate_size = 32, 64
    LlamaForCausalLM(config).save_pretrained(str(other))
    models.byte_tokenizer().save_pretrained(str(other))
    other_params = tiny.model_copy(update={"model": tiny.model.model_copy(update={"base": str(other)})})
    adapter = make_adapter(other_params)
    with pytest.raises(ModelError, match="trained on base .*other-base.*but model.base is 'random:tiny'"):
        merge.run(tiny)

    # Same adapter claiming the right base name: the shapes still give it away.
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = models.resolve(tiny.model).path
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="does not fit model.base 'random:tiny'.*size mismatch"):
        merge.run(tiny)
    assert not (tiny.root / layout.MERGED).exists()


def test_classification_merge_keeps_the_trained_head(tmp_path: Path):
    params = prepared_project(tmp_path / "cls", {"preprocess": {"format": "classification"}})
    make_adapter(params, scale=0.05)
    result = merge.run(params)
    assert result.merged and result.max_abs_logit_diff <= 1e-4
    config = json.loads((params.root / layout.MERGED / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {"0": "negative", "1": "positive"}
