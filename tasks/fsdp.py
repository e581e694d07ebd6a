"""`train.sharding: fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) through the HF Trainer and
accelerate, for `train.devices` > 1 (processes launched as for DDP, tasks/distributed.py).

Contract:
- `training_arguments(cfg, world)`: the `TrainingArguments` keywords that turn FSDP2 on (`fsdp`,
  `fsdp_config`), or {} for `sharding: none`; ConfigError when sharding is asked of one process.
  Wrapping: one FSDP unit per decoder layer (accelerate's TRANSFORMER_BASED_WRAP over the model's
  `_no_split_modules`, e.g. LlamaDecoderLayer), the embedding and final norm + LM head as units
  of their own, the rest in the root. Frozen base weights and trainable LoRA weights share a
  unit: FSDP2 shards per parameter (no flat parameter, so no use_orig_params question) and only
  parameters with requires_grad get gradients and optimizer state.
- `trainer_construction(args)`: context manager around building the Trainer; on CPU it makes
  accelerate take its FSDP branch, which it otherwise keeps for accelerators (see below).
- `full_adapter_state(model)`: collective (every rank calls it): the trainable parameters of an
  FSDP-sharded model gathered whole onto rank 0's CPU ({} on the other ranks); None when `model`
  is not sharded (nothing was trained, e.g. the run restored its last sealed checkpoint).

Checkpoints: `state_dict_type: FULL_STATE_DICT`, so every checkpoint holds the whole adapter as
`adapter_model.safetensors` (what train_or_restore reads back) plus accelerate's FSDP files
(`pytorch_model_fsdp.bin`: the trainable parameters only; `optimizer.bin`), written by rank 0;
the manifest seals them after every rank's RNG state is written (tasks/trainers.py). A resume
loads them through the Trainer (accelerate's load_fsdp_model / load_fsdp_optimizer).

CPU: torch 2.13 runs fully_shard over gloo, but accelerate 1.15's AcceleratorState enables FSDP
only when the distributed type is one of the accelerator kinds (MULTI_GPU, MULTI_XPU, ...), not
MULTI_CPU, and then silently trains DDP. `trainer_construction` presents the CPU process group
as MULTI_GPU while the Trainer builds its Accelerator; accelerate then records FSDP, and every
later step (fsdp2_prepare_model, saving, loading) is accelerate's own code on CPU tensors. The
2-process test (tests/unit/test_fsdp.py) trains through it.
"""

from __future__ import annotations

import contextlib

from tasks.config import TrainConfig
from tasks.errors import ConfigError


def training_arguments(cfg: TrainConfig, world: int) -> dict:
    """FSDP2 keywords for `transformers.TrainingArguments` (see the module docstring); pure."""
    if cfg.sharding == "none":
        return {}
    if world < 2:
        raise ConfigError(f"train.sharding 'fsdp' needs several processes but train.devices = {cfg.devices!r} "
                          f"resolved to {world}; set train.devices to 2 or more, or train.sharding: none")
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # classes from the model's _no_split_modules
            "reshard_after_forward": True,  # free each layer's gathered weights after use: memory first
            "state_dict_type": "FULL_STATE_DICT",  # checkpoints hold the whole adapter (module docstring)
            # FSDP's own checkpoint wrapper (the Trainer's would add an all-gather per layer in backward)
            "activation_checkpointing": cfg.gradient_checkpointing,
            "cpu_ram_efficient_loading": False,  # every rank builds the model itself (models.load_model)
        },
    }


@contextlib.contextmanager
def trainer_construction(args):
    """Build the Trainer inside this block (module docstring, "CPU"); a no-op without FSDP or on
    an accelerator. `args`: the TrainingArguments the Trainer gets."""
    if not args.fsdp or args.device.type != "cpu":  # args.device also sets up accelerate's PartialState
        yield
        return
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    shared = PartialState._shared_state
    if shared.get("distributed_type") != DistributedType.MULTI_CPU:
        raise ConfigError(f"train.sharding 'fsdp' on CPU expects accelerate's MULTI_CPU set-up, found "
                          f"{shared.get('distributed_type')}; run with train.devices > 1 under the stage's launch")
    shared["distributed_type"] = DistributedType.MULTI_GPU  # read once, by AcceleratorState's FSDP branch
    try:
        yield
    finally:
        if shared.get("distributed_type") == DistributedType.MULTI_GPU:  # no Accelerator was built
            shared["distributed_type"] = DistributedType.MULTI_CPU


def full_adapter_state(model) -> dict | None:
    """Trainable parameters gathered whole onto rank 0's CPU (see the module docstring)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return None
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)
