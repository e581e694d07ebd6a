"""Shared fixtures: a real temporary project (git + DVC + local remote) with its own params.yaml."""

from __future__ import annotations

import os
import shutil
import sys
import subprocess
from pathlib import Path

import pytest
import yaml

from tasks.cli import apply_env_defaults

REPO = Path(__file__).resolve().parents[1]

# No network, no telemetry, no pickle, in every test process and its children: the entry points' defaults.
apply_env_defaults()


def deep_merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for k, v in overrides.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# Small, fast defaults for tests: tiny random model, few rows, few steps.
TINY = {
    "model": {"base": "random:tiny"},
    "preprocess": {"max_length": 64, "max_samples": 200, "system_prompt": None},
    "train": {"max_steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "save_steps": 2,
              "learning_rate": 1.0e-3, "peft": {"last_layers": None}},
    "evaluate": {"max_samples": 16, "batch_size": 8, "generation_samples": 2, "sample_predictions": 4},
    "merge": {"parity_samples": 2},
}


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def make_project(root: Path, overrides: dict | None = None, *, tiny: bool = True) -> Path:
    """Create a real project at `root`: params.yaml (defaults + TINY + overrides), dvc.yaml and a
    copy of tasks/ and flows/ (the stages' code deps), `git init`, `dvc init`, and a local DVC remote at `<root>/.dvc-storage`."""
    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if tiny:
        params = deep_merge(params, TINY)
    params = deep_merge(params, overrides or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # A test project is a clone of this repo: dvc.yaml names the code files as stage deps.
    for name in ("dvc.yaml", ".gitignore"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, root / name)
    for package in ("tasks", "flows"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    git(root, "init", "-q")
    git(root, "config", "user.email", "test@peftflow.local")
    git(root, "config", "user.name", "peftflow test")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", ".dvc-storage"], cwd=root, check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "modify", "local", "url", ".dvc-storage"], cwd=root, check=True)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "init")
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh real project with the tiny test params (random:tiny model, 200 rows)."""
    return make_project(tmp_path / "proj")


# Child processes (dvc stages calling `python -m tasks`) must find this venv's python first.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
