"""Merge an adapter layer by layer and check it, without a float64 copy of the model.

Contract:
- `merge_checked(model, rows, tokens_per_layer) -> (merged, Parity)`: `model` is a PeftModel
  (base + adapter, eval mode, every weight in the working dtype). One forward pass over `rows`
  records the end-to-end logits and each adapted layer's real inputs (its first
  `tokens_per_layer` tokens); then each adapted layer is merged with peft's own
  `merge(safe_merge=True)` and checked on its own right away; peft's `unload()` then returns the
  plain model, whose logits on `rows` are compared with the recorded ones. Peak memory: the model
  once, plus one layer in float64 and the recorded inputs.
- Layer check, in float64: `y_ref` = the adapted layer's forward (base + adapter) before its
  merge, `y` = the merged layer's forward. The merged weight W' = W + D is stored in the working
  dtype; rounding the delta D and the sum moves each entry by at most eps/2 (|D| + |W'|) <=
  eps (|W| + |W'|) (as |D| <= |W| + |W'|, which also covers W and W' cancelling), so a correct
  merge keeps |y - y_ref| <= eps |x| (|W| + |W'|)^T elementwise.
  `max_layer_error` is the largest |y - y_ref| in units of that bound: <= 1 for a correct merge,
  thousands for a lost or doubled update (in fp32; in bf16 an update below half a bf16 step of W
  is lost by storing the merged model in bf16 at all, and this check cannot see it).
- End to end, in the working dtype: `max_abs_logit_diff` of merged vs base + adapter; the caller
  compares it with a tolerance derived for that dtype (tasks/merge.py).
"""

from __future__ import annotations

from dataclasses import dataclass



@dataclass(frozen=True)
class Parity:
    max_abs_logit_diff: float
    max_layer_error: float  # in units of the rounding bound; a correct merge is <= 1
    worst_layer: str | None
    layers_checked: int


def _logits(model, rows: list[list[int]]) -> list:
    """Logits per row, one row at a time (no padding, so nothing to mask)."""
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
                .logits[0] for ids in rows]


def _forward64(layer, x):
    """The layer's forward with its parameters and float buffers in float64 (copies of this layer only)."""
    import torch
    from torch.func import functional_call

    state = {k: v.double() if v.is_floating_point() else v
             for k, v in [*layer.named_parameters(), *layer.named_buffers()]}
    with torch.no_grad():
        return functional_call(layer, state, (x,))


def _bound_scale(base_layer, x, y_ref):
    """|x| |W'|^T for a linear map (nn.Linear, or transformers' Conv1D which stores W transposed);
    for other layers (embeddings, convolutions) the largest |y_ref|, a looser bound."""
    import torch

    weight = getattr(base_layer, "weight", None)
    if isinstance(base_layer, torch.nn.Linear) and x.is_floating_point():
        return torch.nn.functional.linear(x.abs(), weight.double().abs())
    if type(base_layer).__name__ == "Conv1D" and x.is_floating_point():
        return x.abs() @ weight.double().abs()
    return y_ref.abs().amax().expand_as(y_ref)


def _record_inputs(layers: dict, tokens_per_layer: int) -> tuple[dict, list]:
    """Forward hooks keeping each adapted layer's first `tokens_per_layer` input tokens."""
    import torch

    inputs: dict = {}

    def hook(name):
        def keep(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]) if args[0].dim() > 1 else args[0].detach()
            have = inputs.get(name)
            room = tokens_per_layer - (0 if have is None else len(have))
            if room > 0:
                inputs[name] = x[:room].clone() if have is None else torch.cat([have, x[:room]])
        return keep

    return inputs, [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]


def merge_checked(model, rows: list[list[int]], tokens_per_layer: int = 64):
    """See the module docstring."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    inputs, hooks = _record_inputs(layers, tokens_per_layer)
    try:
        reference = _logits(model, rows)
    finally:
        for h in hooks:
            h.remove()

    worst, worst_name = 0.0, None
    for name, layer in layers.items():
        x = inputs.get(name)
        if x is None:  # never reached by these rows (e.g. a layer only another input path uses)
            layer.merge(safe_merge=False)
            continue
        x64 = x.double() if x.is_floating_point() else x
        y_ref = _forward64(layer, x64)
        scale = _bound_scale(layer.get_base_layer(), x64, y_ref)  # |x| |W|^T, before the merge
        layer.merge(safe_merge=False)
        y = _forward64(layer, x64)
        scale = scale + _bound_scale(layer.get_base_layer(), x64, y_ref)  # + |x| |W'|^T
        eps = torch.finfo(layer.get_base_layer().weight.dtype).eps
        bound = (eps * scale).clamp_min(torch.finfo(torch.float64).tiny)
        error = float(((y - y_ref).abs() / bound).max())
        if not error <= worst:  # NaN counts as worst
            worst, worst_name = error, name
    merged = model.unload()
    diff = max(float((a.double() - b.double()).abs().max()) for a, b in zip(reference, _logits(merged, rows)))
    return merged, Parity(diff, worst, worst_name, sum(1 for n in layers if n in inputs))
