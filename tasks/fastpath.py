"""The fast LoRA training path on CUDA: padding-free packing with per-document attention, Liger
kernels, no fp32 upcasts of adapter inputs, fused AdamW.

Contract (called by tasks/train.py on CUDA when `train.fast_path.enabled` is true, after the PEFT
model is built and before the Trainer is):

    model, collator, trainer_kwargs = fastpath.prepare(model, collator, params.train.fast_path)

- `model` is the (PEFT-wrapped) causal LM; it is patched in place and returned.
- `collator` is the collator train.py would use otherwise; for a causal LM with packing on, a
  `PackingCollator` is returned instead (features need `input_ids`, optionally `labels`).
- `trainer_kwargs` are extra `TrainingArguments` keywords (e.g. `optim`); train.py's own
  arguments win on conflict only where it sets them explicitly after merging.
- Liger patches transformers modules process-wide; the caller runs `undo_process_patches()` once
  training is over (tasks/train.py `run` does), so later stages in the process get plain models.

What each technique buys and costs is measured in docs/benchmarks.md (bench/lora_throughput.py).
Nothing here changes the CPU path: `prepare` raises TrainingError when called without CUDA unless
`allow_cpu=True` (used by tests, which exercise the packing maths on CPU).

Numerics: packed batches compute the same per-document causal attention and the same token-mean
loss as right-padded batches (tests/unit/test_fastpath_cpu.py checks equality on random:tiny;
tests/gpu/test_fastpath.py checks the flash varlen kernel against per-document SDPA).
"""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Any, Callable

from tasks.config import FastPathConfig
from tasks.errors import TrainingError

log = logging.getLogger(__name__)

ATTN_NAME = "peftflow_varlen"  # the attention implementation registered with transformers
IGNORE_INDEX = -100
# torch 2.11's varlen_attn has no `enable_gqa`, but its flash kernel takes fewer KV heads as they
# are (flash-attn's GQA); tests/gpu/test_fastpath.py checks this against per-document SDPA.
# False = repeat the KV heads first (a copy per layer).
_NATIVE_GQA_STATE = [True]
# Restorers of the process-wide patches Liger made; undo_process_patches() runs them.
_UNDO: list[Callable[[], None]] = []


# ----------------------------------------------------------------------------- packing


class PackingCollator:
    """Concatenate a micro-batch of examples into one row of shape [1, total_tokens].

    Returns `input_ids`, `labels`, `position_ids` (restarting at 0 per example) and the varlen
    boundaries `cu_seq_lens_q/k` (int32, [n_examples + 1]) and `max_length_q/k` (int), which
    transformers passes through to the attention function. The first label of every example is
    IGNORE_INDEX so no token is trained to predict the next example's first token; a right-padded
    batch never trains that position either (the causal-LM shift drops it), so the loss and
    Trainer's token count (`labels[..., 1:] != -100`) match the padded batch exactly.
    Examples with labels use them (e.g. -100 on prompt tokens); others train on every token.
    A batch whose examples all have one length is returned as a plain [B, S] batch instead
    (nothing to pad, nothing to pack), without the varlen keywords.
    """

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if not features:
            raise TrainingError("PackingCollator got an empty batch")
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        bounds = [0]
        for i, f in enumerate(features):
            x = list(f["input_ids"])
            if not x:
                raise TrainingError(f"example {i} of the batch has no input_ids; drop empty rows in preprocess")
            y = list(f["labels"]) if f.get("labels") is not None else list(x)
            if len(y) != len(x):
                raise TrainingError(f"example {i}: labels ({len(y)}) and input_ids ({len(x)}) differ in length")
            y[0] = IGNORE_INDEX
            ids += x
            labels += y
            positions += range(len(x))
            bounds.append(bounds[-1] + len(x))
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        longest = max(lengths)
        if len(set(lengths)) == 1:
            # Equal lengths need no padding anyway: a plain [B, S] batch takes SDPA's causal flash
            # path, which measured ~5% faster than varlen on 2048-token rows (docs/benchmarks.md).
            shape = (len(lengths), longest)
            return {"input_ids": torch.tensor(ids).view(shape), "labels": torch.tensor(labels).view(shape),
                    "position_ids": torch.tensor(positions).view(shape)}
        cu = torch.tensor(bounds, dtype=torch.int32)
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": longest,
            "max_length_k": longest,
        }


# ----------------------------------------------------------------------------- attention


def _flash_varlen():
    """torch's varlen flash attention and which keywords this torch version takes, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


def _per_document_sdpa(q, k, v, cu, scaling):
    """Reference (and CPU) path: causal SDPA on each document separately. q/k/v: [T, H, D]."""
    import torch
    import torch.nn.functional as F

    n_rep = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qd, kd, vd = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        if n_rep > 1:
            kd, vd = kd.repeat_interleave(n_rep, 0), vd.repeat_interleave(n_rep, 0)
        out[a:b] = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scaling).transpose(0, 1)
    return out


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function for packed rows: each document attends only to itself.

    query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None). Needs the
    `cu_seq_lens_q` / `max_length_q` keywords that PackingCollator emits. Without them the batch
    is taken as unpacked and right-padded (causal attention never looks at later padding), which
    is what a padded evaluation batch needs.
    """
    import torch
    import torch.nn.functional as F

    if dropout:
        raise TrainingError("the fast path's attention has no dropout; set the model's attention_dropout to 0")
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask[:, 0].all()):
            raise TrainingError("left-padded batch on the fast path; pad on the right or set train.fast_path: false")
        gqa = query.shape[1] != key.shape[1]
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    if query.shape[0] != 1:
        raise TrainingError(f"packed attention expects one packed row, got a batch of {query.shape[0]}")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    cu = cu.to(device=q.device, dtype=torch.int32)
    flash = _flash_varlen() if q.is_cuda else None
    if flash is None:
        out = _per_document_sdpa(q, k, v, cu, scaling)
    else:
        fn, params = flash
        dtype = q.dtype
        if dtype not in (torch.float16, torch.bfloat16):
            # QLoRA: prepare_model_for_kbit_training keeps the norms in fp32, so bitsandbytes layers hand
            # fp32 to attention, and flash kernels take only half precision: attend in the autocast dtype
            half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
            q, k, v = q.to(half), k.to(half), v.to(half)
        extra: dict[str, Any] = {}
        if "enable_gqa" in params:
            extra["enable_gqa"] = q.shape[1] != k.shape[1]
        elif q.shape[1] != k.shape[1] and not _NATIVE_GQA_STATE[0]:  # older torch without enable_gqa
            n_rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
        if "scale" in params:
            extra["scale"] = scaling
        elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-6:
            raise TrainingError("this torch's varlen attention has no `scale`; set train.fast_path: false")
        if "is_causal" in params:
            extra["is_causal"] = True
        else:
            extra["window_size"] = (-1, 0)
        m = int(kwargs["max_length_q"])
        try:
            out = fn(q, k, v, cu, cu, m, m, **extra)
        except RuntimeError:
            if q.shape[1] == k.shape[1] or "enable_gqa" in params:
                raise
            _NATIVE_GQA_STATE[0] = False  # this build refuses unequal head counts: repeat KV heads from now on
            n_rep = q.shape[1] // k.shape[1]
            out = fn(q, k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1), cu, cu, m, m, **extra)
        out = out.to(dtype)
    return out.unsqueeze(0), None


def register_attention() -> None:
    """Register `varlen_attention` with transformers under ATTN_NAME (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, varlen_attention)


def _set_attention(base_model) -> None:
    register_attention()
    try:
        base_model.set_attn_implementation(ATTN_NAME)
    except (ValueError, AttributeError, KeyError):
        base_model.config._attn_implementation = ATTN_NAME


# ----------------------------------------------------------------------------- prepare


def _base_model(model):
    """The transformers model under a PeftModel (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _packable(model, base) -> bool:
    """Causal LMs only, and not prompt-learning methods (their virtual tokens are prepended per row)."""
    peft_configs = getattr(model, "peft_config", {}) or {}
    if any(getattr(c, "is_prompt_learning", False) for c in peft_configs.values()):
        return False
    return type(base).__name__.endswith("ForCausalLM")


def _snapshot_globals() -> Callable[[], None]:
    """A function that puts back the current globals of every loaded transformers model module
    and of torch.nn.functional (Liger replaces names there; it adds none that matter)."""
    import torch.nn.functional

    spaces = [m for name, m in list(sys.modules.items()) if name.startswith("transformers.models.") and m is not None]
    spaces.append(torch.nn.functional)
    saved = [(m, dict(vars(m))) for m in spaces]

    def restore() -> None:
        for module, before in saved:
            now = vars(module)
            for name, value in before.items():
                if now.get(name) is not value:
                    setattr(module, name, value)
    return restore


def _apply_liger(base, *, layers: bool = True) -> bool:
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        log.warning("liger-kernel is not installed: the fast path runs without fused kernels "
                    "(pip install liger-kernel; see docs/benchmarks.md)")
        return False
    # Liger also swaps names in the model's transformers module (RMSNorm and MLP classes, the RoPE
    # function) for the whole process: a model built later in this process would run Triton kernels,
    # which fail on CPU tensors (the flow runs evaluate and the CPU merge in the same process).
    _UNDO.append(_snapshot_globals())
    # layers=False keeps only the fused linear cross-entropy (RMSNorm, RoPE and SwiGLU are left to
    # torch.compile inside the compiled decoder layers)
    _apply_liger_kernel_to_instance(model=base, rms_norm=layers, rope=layers, swiglu=layers)
    return True


def undo_process_patches() -> None:
    """Put back what `prepare` patched process-wide (Liger's module globals), newest first.

    Models patched by `prepare` keep their instance patches but must not be trained further;
    models built afterwards are plain transformers models. A no-op when nothing was patched.
    """
    while _UNDO:
        _UNDO.pop()()


def _keep_adapter_input_dtype(model) -> int:
    """Stop peft from copying each LoRA input to the adapter's fp32 dtype.

    Under bf16 autocast the adapter matmul runs in bf16 anyway, so peft's cast only adds two
    full-size activation copies per adapted layer (bf16 -> fp32 -> bf16) and keeps the fp32 copy
    for backward. The fp32 adapter weights (master copy for AdamW) are unchanged.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled") and hasattr(module, "lora_A"):
            module.cast_input_dtype_enabled = False
            n += 1
    return n


def _fused_lora_forward(self, x, *args, **kwargs):
    """peft LoRA Linear forward with `base(x) + scale * B(A(x))` done as one addmm.

    peft computes B(A(x)), multiplies by the scale and adds it to the base output: two extra
    full-size elementwise passes over the layer output forward and more backward. addmm(base,
    A(x), B^T, alpha=scale) accumulates in the GEMM epilogue instead. Anything unusual (several
    or disabled adapters, merged weights, variants such as DoRA, a LoRA bias, extra args) goes
    to peft's own forward.
    """
    import torch
    import torch.nn.functional as F

    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if (args or kwargs or name is None or self.disable_adapters or self.merged or name not in self.lora_A
            or name in self.lora_variant or self.lora_B[name].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    h = F.linear(self.lora_dropout[name](x), self.lora_A[name].weight)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                      self.lora_B[name].weight.t(), alpha=self.scaling[name])
    return out.view(result.shape)


def _fuse_lora(model) -> int:
    import types

    n = 0
    for module in model.modules():
        if type(module).__name__ == "Linear" and hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            module.forward = types.MethodType(_fused_lora_forward, module)
            n += 1
    return n


def _compile_layers(base) -> int:
    """torch.compile every decoder layer in place (regional compilation); returns how many.

    All layers run the same code, and torch >= 2.5 traces parameters as graph inputs (inlined
    nn.Modules), so dynamo compiles two graphs whatever the depth (the first layer, whose input
    needs no grad because the embeddings are frozen, and one for every later layer): compile time
    is a layer's, not the whole model's. The embedding, LM head and loss (Liger's fused linear
    cross-entropy) stay outside the graph. The cache limit is raised to the layer count so that a
    layer whose guards differ still gets compiled instead of silently running eager.
    """
    import torch

    layers = getattr(getattr(base, "model", None), "layers", None)
    if not layers:
        return 0
    base.config.use_cache = False  # a KV cache is per layer (`layer_idx`): one graph per layer; training needs none
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, len(layers) + 8)
    for layer in layers:
        layer.compile()
    return len(layers)


def prepare(model, collator, options: FastPathConfig, *, allow_cpu: bool = False):
    """Patch `model` for fast LoRA training; return (model, collator, trainer_kwargs).

    `options` is `train.fast_path` (everything is returned unchanged when `enabled` is false).
    Raises TrainingError on a machine without CUDA (`allow_cpu`: tests run the packing path on CPU
    through a per-document SDPA loop). Packing a model that cannot be packed (not a causal LM) is
    skipped, not an error.
    The techniques applied are recorded in `model.peftflow_fast_path` (a tuple of names).
    """
    import torch

    if not options.enabled:
        return model, collator, {}
    if not torch.cuda.is_available() and not allow_cpu:
        raise TrainingError("train.fast_path needs CUDA; set train.fast_path: false or train.device: cuda")
    base = _base_model(model)
    applied: list[str] = []
    trainer_kwargs: dict[str, Any] = {}

    if options.packing and _packable(model, base):
        _set_attention(base)
        collator = PackingCollator()
        applied.append("packing")
    # With compiled layers, inductor fuses the norms, RoPE and SwiGLU with their neighbours: 8B
    # measured 15,151-15,444 tok/s that way against 14,721 with Liger's kernels inside the compiled
    # layers (docs/benchmarks.md), so Liger keeps only its fused linear cross-entropy then.
    if options.liger and _apply_liger(base, layers=not options.compile):
        applied.append("liger" if not options.compile else "liger_cross_entropy")
    if not options.adapter_input_cast and _keep_adapter_input_dtype(model):
        applied.append("bf16_adapter_inputs")
    if options.fused_lora and _fuse_lora(model):
        applied.append("fused_lora")
    if options.fused_adamw and torch.cuda.is_available():
        trainer_kwargs["optim"] = "adamw_torch_fused"
        applied.append("fused_adamw")
    if options.compile and _compile_layers(base):
        applied.append("compile_layers")
    model.peftflow_fast_path = tuple(applied)
    log.info("fast path: %s", ", ".join(applied) or "nothing applied")
    return model, collator, trainer_kwargs
