"""GPU checks of the fast path (opt-in: `pytest -m gpu tests/gpu`): the flash varlen attention
equals per-document SDPA, and a packed Liger + LoRA bf16 Llama gives the eager padded baseline's
loss and gradients."""

from __future__ import annotations

import pytest
import torch

from tasks import fastpath, models
from tasks.config import FastPathConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_flash_varlen_matches_per_document_sdpa():
    torch.manual_seed(1)
    lengths = [37, 600, 1, 2048, 129]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    t = sum(lengths)
    q = torch.randn(1, 32, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 8, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 8, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, _ = fastpath.varlen_attention(None, q, k, v, None, scaling=64**-0.5, cu_seq_lens_q=cu,
                                       max_length_q=max(lengths))
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = fastpath._per_document_sdpa(qd[0].transpose(0, 1), kd[0].transpose(0, 1), vd[0].transpose(0, 1), cu,
                                      64**-0.5).unsqueeze(0)
    ref_grads = torch.autograd.grad(ref.square().sum(), (qd, kd, vd))
    assert _rel(out, ref) < 1e-2
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < 2e-2


def test_packed_fast_path_matches_padded_baseline():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    cfg = models.random_config("tiny")
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads = 256, 512, 4, 2

    def build():
        torch.manual_seed(0)
        with torch.device("cuda"):
            m = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
        m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator("cuda").manual_seed(hash(n) % 2**31))
        return m

    g = torch.Generator().manual_seed(3)
    feats = [{"input_ids": (ids := torch.randint(0, 300, (n,), generator=g).tolist()), "labels": ids}
             for n in (50, 300, 7, 128)]
    longest = max(len(f["input_ids"]) for f in feats)
    ids = torch.full((4, longest), 256)
    labels = torch.full((4, longest), -100)
    mask = torch.zeros((4, longest), dtype=torch.long)
    for i, f in enumerate(feats):
        ids[i, : len(f["input_ids"])] = labels[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1

    base = build()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = base(input_ids=ids.cuda(), labels=labels.cuda(), attention_mask=mask.cuda()).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in base.named_parameters() if p.requires_grad}
    del base

    fast, collator, kwargs = fastpath.prepare(build(), None, FastPathConfig())
    assert kwargs.get("optim") == "adamw_torch_fused"
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in collator(feats).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fast(**batch).loss
    loss.backward()
    assert abs(loss.item() - ref.item()) / ref.item() < 5e-3
    for n, p in fast.named_parameters():
        if p.requires_grad:
            assert _rel(p.grad, ref_grads[n]) < 5e-2, n
