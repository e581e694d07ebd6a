"""`train.peft` -> a peft config object (one place that knows each method's knobs).

Contract: `build(cfg, task_type=..., max_steps=...)` returns a `peft.PeftConfig` ready for
`peft.get_peft_model`, or raises ConfigError naming the `train.peft.*` key that cannot work.
`needs_weight_conversion(cfg)` says whether the LoRA init rewrites the base weights (PiSSA,
OLoRA), in which case the saved adapter must be converted against the initial adapter so that
it applies to the untouched base model (see tasks/train.py).
"""

from __future__ import annotations

import re

from tasks.config import PeftConfig
from tasks.errors import ConfigError

# Methods that put trainable virtual tokens in front of the input instead of adapting layers.
PROMPT_METHODS = frozenset({"prompt_tuning", "prefix_tuning", "p_tuning"})

# LoRA inits that need a data pass or a quantiser before training; the train stage does not run those.
_UNSUPPORTED_INITS = {
    "eva": "needs a data-driven initialisation pass (peft.initialize_lora_eva_weights)",
    "corda": "needs a covariance pre-processing pass over data",
    "loftq": "needs a LoftQ quantisation pass; use quantize_4bit (QLoRA) instead",
}
_PLAIN_INITS = {"gaussian", "olora", "pissa", "orthogonal"}


def lora_init(init: str) -> bool | str:
    """Map `train.peft.init` to peft's `init_lora_weights` value."""
    if init == "default":
        return True
    if init in _UNSUPPORTED_INITS:
        raise ConfigError(f"train.peft.init = {init!r}: {_UNSUPPORTED_INITS[init]}; choose one of "
                          f"default, gaussian, pissa, pissa_niter_<n>, olora, orthogonal")
    if init in _PLAIN_INITS or re.fullmatch(r"pissa_niter_[1-9][0-9]*", init):
        return init
    raise ConfigError(f"train.peft.init = {init!r} is not a LoRA init; choose one of "
                      f"default, gaussian, pissa, pissa_niter_<n>, olora, orthogonal")


def needs_weight_conversion(cfg: PeftConfig) -> bool:
    """True when the init changes the base weights (PiSSA/OLoRA): the adapter must be converted on save."""
    return cfg.method == "lora" and (cfg.init == "olora" or cfg.init.startswith("pissa"))


def _targets(cfg: PeftConfig):
    return cfg.target_modules if cfg.target_modules == "all-linear" else list(cfg.target_modules)


def build(cfg: PeftConfig, *, task_type: str, max_steps: int, num_layers: int | None = None):
    """peft config for `cfg.method`. task_type is "CAUSAL_LM" or "SEQ_CLS"; num_layers (the
    model's layer count) is needed when `cfg.last_layers` is set."""
    import peft

    peft_config = _build(peft, cfg, task_type=task_type, max_steps=max_steps)
    if cfg.last_layers is not None:
        if cfg.method in PROMPT_METHODS:
            raise ConfigError(f"train.peft.last_layers applies to layer-adapting methods, not {cfg.method!r}; "
                              f"set it to null")
        if num_layers is None or cfg.last_layers > num_layers:
            raise ConfigError(f"train.peft.last_layers = {cfg.last_layers} but the model has {num_layers} layers")
        peft_config.layers_to_transform = list(range(num_layers - cfg.last_layers, num_layers))
    return peft_config


def _build(peft, cfg: PeftConfig, *, task_type: str, max_steps: int):
    if cfg.method != "lora" and (cfg.use_dora or cfg.use_rslora or cfg.init != "default"):
        raise ConfigError(f"train.peft.use_dora/use_rslora/init apply to method 'lora' only "
                          f"(method is {cfg.method!r}); reset them to their defaults")
    common = dict(task_type=task_type)
    m = cfg.method
    if m == "lora":
        return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                               target_modules=_targets(cfg), use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
                               init_lora_weights=lora_init(cfg.init), **common)
    if m == "adalora":
        # AdaLoRA prunes ranks from r down to r/2 between tinit and total_step - tfinal.
        return peft.AdaLoraConfig(init_r=cfg.r, target_r=max(1, cfg.r // 2), lora_alpha=cfg.alpha,
                                  lora_dropout=cfg.dropout, target_modules=_targets(cfg),
                                  total_step=max_steps, tinit=max_steps // 10, tfinal=max_steps // 5, **common)
    if m == "ia3":
        if cfg.target_modules == "all-linear":
            # IA3 also needs feedforward_modules (a subset of targets); peft's per-architecture
            # defaults give both consistently, all-linear would not.
            return peft.IA3Config(**common)
        return peft.IA3Config(target_modules=list(cfg.target_modules), feedforward_modules=[], **common)
    if m == "loha":
        return peft.LoHaConfig(r=cfg.r, alpha=cfg.alpha, module_dropout=cfg.dropout,
                               target_modules=_targets(cfg), **common)
    if m == "lokr":
        return peft.LoKrConfig(r=cfg.r, alpha=cfg.alpha, module_dropout=cfg.dropout,
                               target_modules=_targets(cfg), **common)
    if m == "vera":
        return peft.VeraConfig(r=cfg.r, vera_dropout=cfg.dropout, target_modules=_targets(cfg), **common)
    if m == "oft":
        # r = number of orthogonal blocks; peft wants oft_block_size=0 when r is given.
        return peft.OFTConfig(r=cfg.r, oft_block_size=0, module_dropout=cfg.dropout,
                              target_modules=_targets(cfg), **common)
    if m == "prompt_tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)
    if m == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)
    if m == "p_tuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)
    raise ConfigError(f"train.peft.method = {m!r} is not supported")  # unreachable: config.py validates
