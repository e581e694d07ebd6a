"""Shared fixtures of every test; the helpers themselves live in tests/support/ (a package: import
them as `from support.projects import make_project`, `from support import invariants`).

Fixtures: `project` (a fresh real project with the tiny test params), `one_process_run` (the
tiny train stage on one process at support.training.SAME_GLOBAL_BATCH, trained once per session:
the DDP and FSDP tests both compare against it), `prefect_api` (a temporary
real Prefect server for a test module) and the team services of tests/support/services.py
(`postgres_db`, `s3`, `mlflow_on_postgres`, `mlflow_with_basic_auth`, `team_stack`).
Re-exported for `from conftest import ...`: REPO, TINY, deep_merge, git, make_project.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tasks.cli import apply_env_defaults

# No network, no telemetry, no pickle, in every test process and its children: the entry points' defaults.
apply_env_defaults()

from support.projects import REPO, TINY, deep_merge, git, make_project  # noqa: E402, F401
from support.services import (mlflow_on_postgres, mlflow_with_basic_auth, postgres_db, prefect_api, s3,  # noqa: E402, F401
                              team_stack)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh real project with the tiny test params (random:tiny model, 200 rows)."""
    return make_project(tmp_path / "proj")


@pytest.fixture(scope="session")
def one_process_run(tmp_path_factory) -> Path:
    """The root of a finished one-process train run at SAME_GLOBAL_BATCH (see the docstring)."""
    from support.training import SAME_GLOBAL_BATCH, finish, tiny_project

    params = tiny_project(tmp_path_factory.mktemp("one") / "p", {**SAME_GLOBAL_BATCH, "devices": 1})
    finish(params)
    return params.parent


# Child processes (dvc stages calling `python -m tasks`) must find this venv's python first.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
