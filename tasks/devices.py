"""Where a stage computes: `train.device` and `train.precision` resolved once, for every stage.

Contract:
- `resolve_device(cfg) -> "cpu" | "cuda"`: `auto` takes CUDA when a GPU is visible; ConfigError
  when `cuda` is asked for and none is.
- `resolve_precision(cfg, device) -> "bf16" | "fp32"`: `auto` is bf16 on CUDA, fp32 on CPU.
- `torch_placement(cfg) -> (torch.device, torch.dtype)`: both, as torch objects (evaluation and the
  gate score where training trained, so a bf16-trained adapter is judged in bf16).
"""

from __future__ import annotations

from tasks.config import TrainConfig
from tasks.errors import ConfigError


def resolve_device(cfg: TrainConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA GPU is visible; set train.device: auto or cpu")
    return cfg.device


def resolve_precision(cfg: TrainConfig, device: str) -> str:
    if cfg.precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return cfg.precision


def torch_placement(cfg: TrainConfig):
    import torch

    device = resolve_device(cfg)
    precision = resolve_precision(cfg, device)
    return torch.device(device), torch.bfloat16 if precision == "bf16" else torch.float32
