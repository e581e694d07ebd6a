"""A project per task, as the README tells a new user to make one (tasks/project.py).

One module-scoped scene, on real git, real DVC, one real (temporary) Prefect server and one
shared MLflow store (MLFLOW_TRACKING_URI, as a team shares one):
- `python -m tasks.project new <tmp>/support-tickets --from examples/quality-run`, the user's own
  CSV in its data/, params edited (source, columns, labels; a tiny model), then
  `make run PARAMS=<project>/params.yaml` in the checkout;
- an example run in place, in a copy of the checkout: `python -m flows.finetune --params
  examples/quality-run/params.yaml`, a DVC project nested in the checkout's.
Each finds its version in the registry under its own name, leaves its own `dvc status` clean
(and the enclosing checkout's), pushes its data to its own remote, and has no copy of the code.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY, deep_merge, git
from tasks import layout, project

pytestmark = pytest.mark.integration

EXAMPLE = "examples/quality-run"


def write_tickets(path: Path, rows: int = 120, seed: int = 0) -> None:
    """The user's own CSV: support messages and the team that handled them, per customer."""
    rng = random.Random(seed)
    words = {"billing": ["invoice", "refund", "charge", "payment"], "technical": ["crash", "error", "login", "bug"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["message", "team", "customer"])
        for i in range(rows):
            team = rng.choice(sorted(words))
            a, b = rng.sample(words[team], 2)
            w.writerow([f"My {a} and the {b} again, ticket {i}.", team, f"customer-{i % 13}"])


def edit_params(path: Path, overrides: dict) -> None:
    params = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(deep_merge(deep_merge(params, TINY), overrides), sort_keys=False))


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-4000:]
    return out.stdout


def dvc_status(root: Path) -> dict:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.status()


def dvc_stages(root: Path) -> list[str]:
    """`folder:name` of each dvc.yaml stage DVC collects in `root`'s project (`dvc stage list --all`)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return sorted(f"{Path(s.path).parent.relative_to(root.resolve())}:{s.name}" for s in repo.index.stages
                      if hasattr(s, "name"))  # dvc.yaml stages (a .dvc file's stage has no name)


def copy_checkout(dest: Path) -> Path:
    """A clone-like copy of the checkout's stage code, dvc.yaml and one example (git + DVC at its top)."""
    dest.mkdir()
    shutil.copy(REPO / "dvc.yaml", dest / "dvc.yaml")
    shutil.copytree(REPO / "tasks", dest / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    files = git(REPO, "ls-files", EXAMPLE).split()
    assert {f"{EXAMPLE}/.dvc/config", f"{EXAMPLE}/dvc.yaml", f"{EXAMPLE}/params.yaml"} <= set(files)
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, dest / rel)
    git(dest, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True)
    return dest


@pytest.fixture(scope="module")
def scene(tmp_path_factory, prefect_api):
    from prefect.settings import PREFECT_API_URL

    base = tmp_path_factory.mktemp("projects")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # one Prefect server for both projects
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{base / 'shared-mlflow.db'}"  # one store for both projects

    # 1. A new project for one's own CSV, from anywhere, then `make run PARAMS=...` in the checkout.
    mine = base / "support-tickets"
    created = run([sys.executable, "-m", "tasks.project", "new", str(mine), "--from", EXAMPLE], cwd=base, env=env)
    write_tickets(mine / "data" / "tickets.csv")
    edit_params(mine / "params.yaml", {
        "ingest": {"source": "data/tickets.csv"},
        "preprocess": {"text_fields": ["message"], "label_field": "team", "prompt_template": "{message}",
                       "labels": {"billing": "billing", "technical": "technical"},
                       "split": {"group_by": "customer"}}})
    flow_mine = run(["make", "-o", "setup", "run", f"PARAMS={mine / 'params.yaml'}"], cwd=REPO, env=env)

    # 2. An example in place, in a copy of the checkout (the real one stays untouched).
    checkout = copy_checkout(base / "checkout")
    example = checkout / EXAMPLE
    edit_params(example / "params.yaml", {})
    flow_example = run([sys.executable, "-m", "flows.finetune", "--params", f"{EXAMPLE}/params.yaml"], cwd=checkout,
                       env=env)
    print(flow_mine[-2500:], flow_example[-2500:], sep="\n")
    return {"mine": mine, "checkout": checkout, "example": example, "env": env, "created": created,
            "flows": (flow_mine, flow_example)}


def _versions(scene, model_name: str) -> list:
    from mlflow import MlflowClient

    uri = scene["env"]["MLFLOW_TRACKING_URI"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions(f"name='{model_name}'")


def test_new_project_has_its_params_dvc_git_remote_and_ignores_but_no_code(scene):
    mine = scene["mine"]
    assert "make run PARAMS=" in scene["created"] and "python -m flows.finetune --params" in scene["created"]
    assert (mine / ".git").is_dir() and (mine / ".dvc").is_dir()
    assert "url = ../.dvc-storage" in (mine / ".dvc" / "config").read_text()
    assert "/.dvc-storage/" in (mine / ".gitignore").read_text().splitlines()
    assert not (mine / "tasks").exists() and not (mine / "flows").exists(), "the stage code stays in the package"
    assert (mine / "dvc.yaml").read_text() == project.render_dvc_yaml(mine)


def test_each_project_registers_under_its_own_name_in_the_shared_store(scene):
    for root, name in ((scene["mine"], "support-tickets-adapter"), (scene["example"], "quality-run-adapter")):
        versions = _versions(scene, name)
        assert [str(v.version) for v in versions] == ["1"], name
        report = json.loads((root / layout.report("register")).read_text())
        assert (report["model_name"], report["version"]) == (name, "1"), report
    assert _versions(scene, "peftflow-adapter") == [], "no project registered under the checkout's model name"
    for out, name in zip(scene["flows"], ("support-tickets-adapter", "quality-run-adapter"), strict=True):
        assert name in out, out[-3000:]


def test_dvc_state_is_per_project_and_clean_after_the_flow(scene):
    mine, example, checkout = scene["mine"], scene["example"], scene["checkout"]
    for root in (mine, example):
        assert dvc_status(root) == {}, root
        assert sorted(yaml.safe_load((root / "dvc.lock").read_text())["stages"]) == [
            "evaluate", "merge", "preprocess", "train"]
        assert any((root / ".dvc-storage").rglob("*")), f"{root}: nothing pushed to its own remote"
    # The enclosing checkout's DVC project does not see the example's stages (a --subdir project).
    assert dvc_stages(checkout) == [".:evaluate", ".:merge", ".:preprocess", ".:train"]
    assert dvc_stages(example) == [".:evaluate", ".:merge", ".:preprocess", ".:train"]
    # dvc.lock names the package's code: absolute outside the checkout, relative (portable) inside it.
    lock_mine = yaml.safe_load((mine / "dvc.lock").read_text())["stages"]["train"]["deps"]
    lock_example = yaml.safe_load((example / "dvc.lock").read_text())["stages"]["train"]["deps"]
    assert f"{REPO}/tasks/train.py" in {d["path"] for d in lock_mine}
    assert "../../tasks/train.py" in {d["path"] for d in lock_example}
    assert (mine / layout.RAW_DATA).is_file() and (example / layout.RAW_DATA).is_file()
