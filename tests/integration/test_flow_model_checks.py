"""A setting the base model cannot take stops the finetune flow CLI at load, before ingest, in one
line that names the value to set (issue N4)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO
from support.projects import make_project
from tasks import layout

pytestmark = pytest.mark.integration


def test_last_layers_beyond_the_model_fails_before_ingest(tmp_path, prefect_api):
    from prefect.settings import PREFECT_API_URL

    project = make_project(tmp_path / "proj", {"train": {"peft": {"last_layers": 3}}})  # random:tiny has 2
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    out = subprocess.run([sys.executable, "-m", "flows.finetune", "--params", str(project / "params.yaml")], cwd=REPO,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert out.returncode == 2, out.stdout[-3000:]
    assert "Traceback" not in out.stdout
    assert out.stdout.strip().splitlines()[-1] == (
        "error: train.peft.last_layers = 3 but random:tiny has 2 layers; set train.peft.last_layers to <= 2 or null")
    assert not (project / layout.RAW_DATA).exists() and not (project / layout.report("ingest")).exists()
