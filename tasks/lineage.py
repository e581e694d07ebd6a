"""Lineage of a pipeline run as MLflow tags: params and data digests, git state, library versions,
the base model's weights digest, the adapter digest and what training recorded. No MLflow here:
tasks/tracking.py logs what `tags` returns.
"""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path
from typing import Any

from tasks import layout, models, runstate
from tasks.adapters import adapter_sha256
from tasks.config import Params

LIBRARIES = ("torch", "transformers", "peft", "datasets", "accelerate", "mlflow", "dvc", "prefect", "safetensors")


def gpu_hours(train: dict[str, Any]) -> float:
    """GPU-hours of the train stage (one device per training process): wall hours on CUDA, 0 on CPU."""
    if not str(train.get("device", "")).startswith("cuda"):
        return 0.0
    return float(train.get("wall_seconds") or 0.0) / 3600.0


def git_state(root: Path) -> dict[str, str]:
    """{"git.commit": sha, "git.dirty": "true"/"false"} of the project, or {} outside git. Dirty
    covers untracked pipeline files too (dvc.lock, .dvc pointers, stage deps): tasks/runstate.py."""
    return runstate.git_state(root)


def library_versions() -> dict[str, str]:
    out = {}
    for lib in LIBRARIES:
        try:
            out[f"lib.{lib}"] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def tags(params: Params, ingest: dict[str, Any], train: dict[str, Any], flow_run_id: str | None) -> dict[str, str]:
    """Everything needed to say where this run's model came from, as string tags (from the
    ingest and train reports, git, the installed libraries and the resolved base model)."""
    root = Path(params.root)
    tags = {"params.sha256": params.sha256, "python": platform.python_version(), **git_state(root),
            **library_versions()}
    if ingest.get("md5"):
        tags["data.md5"] = str(ingest["md5"])
    if ingest.get("source"):
        tags["data.source"] = str(ingest["source"])
    base = models.resolve(params.model)
    tags.update({"base.spec": base.spec, "base.path": base.path, "base.revision": base.revision or "",
                 "base.weights_sha256": base.weights_sha256})
    if (root / layout.ADAPTER / "adapter_config.json").is_file():
        tags["adapter.sha256"] = adapter_sha256(root / layout.ADAPTER)
    for key in ("device", "tokens_trained", "fingerprint", "method", "objective", "init_adapter", "init_adapter_sha256"):
        if train.get(key) is not None:
            tags[f"train.{key}"] = str(train[key])
    if train:
        tags["train.gpu_hours"] = f"{gpu_hours(train):.6f}"
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    return tags
