"""`dvc repro` parity with the Prefect flow, on a tiny real project (git + DVC + local remote).

After a flow run and a commit: `dvc exp run -S train.learning_rate=...` reruns only train,
evaluate and merge; `dvc metrics show` / `dvc plots show` work; and a fresh clone of the first
commit, with only the raw data pulled, rebuilds with `dvc repro` a byte-identical adapter.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import git
from support.projects import dvc_status, small_project
from tasks import layout

pytestmark = pytest.mark.integration


def dvc(root: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def lock_md5(lock_text: str, stage: str, path: Path) -> str:
    outs = yaml.safe_load(lock_text)["stages"][stage]["outs"]
    return next(o["md5"] for o in outs if o["path"] == str(path))


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def committed(prefect_api, tmp_path_factory):
    """A project after one flow run, committed (dvc.lock, .dvc files, metrics) and pushed."""
    from flows.finetune import finetune

    project = small_project(tmp_path_factory.mktemp("repro") / "proj")
    finetune(params=str(project / "params.yaml"))
    dvc(project, "push")
    git(project, "add", "-A")  # outs are git-ignored by DVC; metrics/plots (cache: false) are committed
    git(project, "commit", "-qm", "run 1")
    return project, git(project, "rev-parse", "HEAD").strip(), file_hashes(project / layout.ADAPTER)


def test_train_param_change_reruns_only_train_evaluate_merge(committed):
    project, _, adapter_v1 = committed
    assert "models/adapter" not in git(project, "ls-files"), "DVC outputs must not be committed to git"
    out = dvc(project, "exp", "run", "-S", "train.learning_rate=3.0e-3")
    assert ran_stages(out) == {"train", "evaluate", "merge"}, out
    assert "preprocess" in re.findall(r"Stage '(\w+)' didn't change", out)
    assert file_hashes(project / layout.ADAPTER) != adapter_v1
    assert dvc_status(project) == {}
    metrics = dvc(project, "metrics", "show")
    assert "reports/evaluate.json" in metrics and "reports/train.json" in metrics
    dvc(project, "plots", "show", "-o", str(project / "dvc_plots"))
    assert (project / "dvc_plots" / "index.html").is_file()


def test_clone_of_first_commit_rebuilds_a_byte_identical_adapter(committed, tmp_path):
    project, first, adapter_v1 = committed
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    git(clone, "checkout", "-q", first)
    dvc(clone, "remote", "modify", "--local", "local", "url", str(project / ".dvc-storage"))
    dvc(clone, "pull", f"{layout.RAW_DATA}.dvc")  # only the raw data: everything else is rebuilt
    assert not (clone / layout.ADAPTER).exists()
    out = dvc(clone, "repro")
    # preprocess and train rebuild byte-identical outputs (the flow's and `dvc repro`'s), so
    # evaluate, whose outputs are committed, is up to date; merge's model is not committed.
    assert ran_stages(out) == {"preprocess", "train", "merge"}, out
    assert "evaluate" in re.findall(r"Stage '(\w+)' didn't change", out), out
    assert file_hashes(clone / layout.ADAPTER) == adapter_v1
    first_lock, rebuilt_lock = git(project, "show", f"{first}:dvc.lock"), (clone / "dvc.lock").read_text()
    assert lock_md5(rebuilt_lock, "preprocess", layout.PROCESSED) == lock_md5(first_lock, "preprocess", layout.PROCESSED)
    assert lock_md5(rebuilt_lock, "train", layout.ADAPTER) == lock_md5(first_lock, "train", layout.ADAPTER)
