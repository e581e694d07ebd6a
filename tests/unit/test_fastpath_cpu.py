"""CPU checks of the fast path's packing: boundaries, position ids, and that a packed batch gives
the same per-document logits and the same loss as a right-padded batch (random:tiny + LoRA)."""

from __future__ import annotations

import pytest
import torch

from tasks import fastpath, models
from tasks.config import FastPathConfig, TrainConfig
from tasks.errors import TrainingError


def _features(lengths, seed=0, prompt=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        labels = [-100] * min(prompt, n) + ids[prompt:]
        out.append({"input_ids": ids, "labels": labels, "prompt": "ignored"})
    return out


def _padded(features, pad_id):
    longest = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), longest), pad_id)
    labels = torch.full((len(features), longest), -100)
    mask = torch.zeros((len(features), longest), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def test_packing_collator_boundaries_and_positions():
    feats = _features([3, 5, 1], prompt=1)
    batch = fastpath.PackingCollator()(feats)
    assert batch["input_ids"].shape == (1, 9)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 8, 9] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == 5 == batch["max_length_k"]
    flat_ids = sum((f["input_ids"] for f in feats), [])
    assert batch["input_ids"][0].tolist() == flat_ids
    labels = batch["labels"][0].tolist()
    # first token of every document is never a target; the rest keep their labels
    assert [labels[i] for i in (0, 3, 8)] == [-100, -100, -100]
    assert labels[1:3] == feats[0]["labels"][1:] and labels[4:8] == feats[1]["labels"][1:]
    # Trainer counts labels[..., 1:] != -100: same count as the padded batch
    padded = _padded(feats, 256)
    assert int((batch["labels"][..., 1:] != -100).sum()) == int((padded["labels"][..., 1:] != -100).sum())


def test_equal_lengths_give_a_plain_batch():
    feats = _features([4, 4, 4])
    batch = fastpath.PackingCollator()(feats)
    assert batch["input_ids"].shape == (3, 4) and "cu_seq_lens_q" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3]] * 3
    assert batch["input_ids"][1].tolist() == feats[1]["input_ids"]


def test_packing_collator_rejects_bad_rows():
    with pytest.raises(TrainingError, match="labels"):
        fastpath.PackingCollator()([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(TrainingError, match="no input_ids"):
        fastpath.PackingCollator()([{"input_ids": []}])


@pytest.fixture()
def tiny_lora():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(models.random_config("tiny"))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    # make the adapters non-zero so they take part in the comparison
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def test_packed_equals_padded_on_tiny(tiny_lora):
    feats = _features([7, 19, 2, 12], seed=1, prompt=2)
    feats += _features([5, 5], seed=2)  # two equal-length rows in the same padded batch
    padded = _padded(feats, 256)
    with torch.no_grad():
        ref = tiny_lora(**padded)
    model, collator, kwargs = fastpath.prepare(tiny_lora, None, FastPathConfig(liger=False), allow_cpu=True)
    assert "packing" in model.peftflow_fast_path and isinstance(collator, fastpath.PackingCollator)
    packed = collator(feats)
    with torch.no_grad():
        out = model(**packed)
    cu = packed["cu_seq_lens_q"].tolist()
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        torch.testing.assert_close(out.logits[0, a:b], ref.logits[i, : b - a], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_prepare_is_a_no_op_when_off_and_needs_cuda_when_on(tiny_lora):
    collator = object()
    model, same, kwargs = fastpath.prepare(tiny_lora, collator, TrainConfig(fast_path=False).fast_path)
    assert same is collator and kwargs == {}
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="fast_path"):
            fastpath.prepare(tiny_lora, collator, FastPathConfig())


def test_adapter_inputs_stay_in_activation_dtype(tiny_lora):
    model, _, _ = fastpath.prepare(tiny_lora, None, FastPathConfig(liger=False, packing=False), allow_cpu=True)
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "cast_input_dtype_enabled")]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


def test_undo_process_patches_puts_back_swapped_module_globals():
    # What Liger does to the model's module (it is not installed on CPU): replace classes and
    # functions by name, for the whole process. undo_process_patches must put the originals back.
    from transformers.models.llama import modeling_llama

    norm, rope = modeling_llama.LlamaRMSNorm, modeling_llama.apply_rotary_pos_emb
    fastpath._UNDO.append(fastpath._snapshot_globals())
    modeling_llama.LlamaRMSNorm, modeling_llama.apply_rotary_pos_emb = torch.nn.LayerNorm, None
    fastpath.undo_process_patches()
    assert modeling_llama.LlamaRMSNorm is norm and modeling_llama.apply_rotary_pos_emb is rope
    assert fastpath._UNDO == []
    fastpath.undo_process_patches()  # nothing left to undo: a no-op



def test_compile_layers_reuses_one_graph_and_keeps_the_loss():
    """Regional compile: every decoder layer compiled; the first layer (its input needs no grad:
    the embeddings are frozen) and all later layers share two graphs, however deep the model;
    the loss and adapter gradients match eager."""
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters
    from transformers import LlamaForCausalLM

    config = models.random_config("tiny")
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    batch = _padded(_features([9, 9], seed=3), 256)
    ref = model(**batch)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    torch._dynamo.reset()
    counters.clear()
    model, _, _ = fastpath.prepare(model, None, FastPathConfig(liger=False, packing=False, compile=True),
                                   allow_cpu=True)
    layers = fastpath._base_model(model).model.layers
    assert "compile_layers" in model.peftflow_fast_path and all(layer._compiled_call_impl for layer in layers)
    out = model(**batch)
    out.loss.backward()
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # 3 layers, 2 graphs
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6)
