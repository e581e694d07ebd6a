"""Multi-process training: `train.devices > 1` (or `auto` on a multi-GPU host) runs the train
stage as one process per device under torchrun, data-parallel (DDP through the HF Trainer), or
with the base model sharded over the processes when `train.sharding: fsdp` (tasks/fsdp.py).

Contract:
- `world_size(cfg, device)`: how many processes train (`auto` = every visible GPU; 1 on CPU).
- `worker()`: (rank, world size) of this process; (0, 1) outside a launch.
- `launch(params, world)`: run `python -m tasks train --params <file>` under torchrun with
  `world` processes on this host; returns when all exit, raises TrainingError if any failed
  (torchrun stops the others when one fails, so a failing rank cannot leave the rest hanging).
  Multi-node training uses the same entry point with torchrun's rendezvous flags
  (docs/operations.md).
- `exclusive(folder)`: context manager; one rank of the host at a time runs the body. Every
  rank runs the housekeeping that deletes files (stale temp folders, broken checkpoints) under it:
  the first does the deleting, the rest find nothing left to delete. No rank can have written a
  new checkpoint meanwhile: training needs every rank (the first collective of DDP or FSDP), and
  each does its housekeeping before it starts.

Why a relaunch instead of `accelerate launch` in dvc.yaml: the stage command stays
`python -m tasks train` for DVC, Prefect and users alike; the number of processes is a param.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from tasks.config import Params, TrainConfig
from tasks.errors import ConfigError, TrainingError


def world_size(cfg: TrainConfig, device: str) -> int:
    """Processes to train with; ConfigError if more GPUs are asked for than are visible."""
    if device == "cpu":
        return 1 if cfg.devices == "auto" else cfg.devices
    import torch

    visible = torch.cuda.device_count()
    if cfg.devices == "auto":
        return max(visible, 1)
    if cfg.devices > visible:
        raise ConfigError(f"train.devices = {cfg.devices} but {visible} CUDA GPU(s) are visible; "
                          f"set train.devices: auto, or at most {visible}")
    return cfg.devices


def worker() -> tuple[int, int]:
    """(rank, world size) from the variables torchrun sets; (0, 1) in a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def launch(params: Params, world: int) -> None:
    """Train with `world` processes on this host (see the module docstring)."""
    if params.path is None:
        raise ConfigError(f"train.devices = {world} needs the params from a file (each process reads it); "
                          f"load them with load_params(path)")
    if hashlib.sha256(params.path.read_bytes()).hexdigest() != params.sha256:
        raise ConfigError(f"{params.path} changed after it was read; rerun the stage so that every training "
                          f"process uses the same params")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           "-m", "tasks", "train", "--params", str(params.path)]
    # Workers' output goes to this terminal (rank 0 shows the progress bar); torchrun stops the
    # group when one worker fails and exits non-zero.
    code = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], check=False,
                          preexec_fn=_die_with_parent).returncode
    if code != 0:
        raise TrainingError(f"distributed training ({world} processes) failed (torchrun exit code {code}); "
                            f"the failing worker's error is printed above. A rerun resumes from the newest "
                            f"sealed checkpoint.")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when this process dies, even by SIGKILL (Linux), so
    torchrun stops its workers instead of training on as orphans next to a rerun."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def exclusive(folder: Path):
    """With several ranks, hold a host-wide lock named after `folder` for the body (see the module
    docstring); a plain process runs the body at once. The lock file lives in the temp folder, so
    the project gains no file from it."""
    if worker()[1] == 1:
        yield
        return
    import fcntl
    import tempfile

    key = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"peftflow-train-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
