"""Reproducing registered versions from the registry alone (real git, DVC, MLflow, Prefect).

One team, two flow runs: Alice's project (git origin: a bare repository; DVC remote: a shared
folder) registers v1, then v2 on changed data. Then: Alice reproduces `@challenger` (v2) with the
Prefect flow; a teammate's clone of the origin, with the same DVC remote and MLflow store,
reproduces v1 (v1's old data) with the CLI; a remote that lacks the data fails in one line naming
the md5 and the remote. Each rebuild runs `dvc repro` in other processes than the flow that
trained, so byte equality of the adapter also checks that CPU training is deterministic.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, git
from support.projects import small_project, write_reviews
from tasks import layout, runstate, sharing, tracking
from tasks.config import load_params

pytestmark = pytest.mark.integration


def _dvc(root, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, check=True, capture_output=True,
                          text=True).stdout


def _version(params, version: str):
    return tracking.client(params).get_model_version(params.register.model_name, version)


@pytest.fixture(scope="module")
def team(tmp_path_factory, prefect_api):
    from prefect.settings import PREFECT_API_URL

    from flows.finetune import finetune

    base = tmp_path_factory.mktemp("team")
    origin, storage = base / "origin.git", base / "dvc-storage"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    alice = small_project(base / "alice")
    _dvc(alice, "remote", "modify", "local", "url", str(storage))  # the team's remote, committed
    git(alice, "commit", "-qam", "shared DVC remote")
    git(alice, "remote", "add", "origin", str(origin))
    git(alice, "push", "-q", "origin", "HEAD:refs/heads/main")
    params = load_params(alice / "params.yaml")
    v1 = finetune(params=str(alice / "params.yaml"))
    status_after_v1 = git(alice, "status", "--porcelain", "--untracked-files=all")
    head_after_v1 = git(alice, "rev-parse", "HEAD")
    tags_v1 = dict(_version(params, v1["version"]).tags)
    _dvc(alice, "exp", "push", "origin", tags_v1[sharing.TAG_NAME])  # documented in docs/operations.md

    write_reviews(alice / "data" / "reviews.csv", 120, seed=1)  # new data under the same path
    _dvc(alice, "config", "exp.auto_push", "true")  # from now on registration pushes the state itself
    v2 = finetune(params=str(alice / "params.yaml"))
    return {"alice": alice, "origin": origin, "storage": storage, "params": params, "v1": v1, "v2": v2,
            "tags_v1": tags_v1, "status_after_v1": status_after_v1, "head_after_v1": head_after_v1,
            "prefect_url": PREFECT_API_URL.value(), "base": base}


def test_registration_records_the_state_on_an_experiment_ref_and_flags_what_is_not_shared(team):
    alice, params, tags = team["alice"], team["params"], team["tags_v1"]
    assert (team["v1"]["version"], team["v2"]["version"]) == ("1", "2")
    head = team["head_after_v1"].strip()
    # The user's branch, HEAD and files are untouched; the run's dvc.lock and pointer stay untracked there...
    assert git(alice, "rev-parse", "HEAD").strip() == head
    assert "?? dvc.lock" in team["status_after_v1"] and "data/raw/dataset.parquet.dvc" in team["status_after_v1"]
    assert tags["git.commit"] == head and tags["git.dirty"] == "true", "untracked pipeline files make it dirty"
    # ...but the state commit holds them, on DVC's experiment ref layout, with HEAD as parent.
    ref, commit = tags[sharing.TAG_REF], tags[sharing.TAG_COMMIT]
    assert ref == f"refs/exps/{head[:2]}/{head[2:]}/{tags[sharing.TAG_NAME]}"
    assert git(alice, "rev-parse", f"{commit}^").strip() == head
    files = git(alice, "ls-tree", "-r", "--name-only", commit).split()
    assert {"dvc.lock", "data/raw/dataset.parquet.dvc", "params.yaml", "tasks/train.py"} <= set(files)
    outputs = [f for f in files if f.startswith(("models/", "data/")) and not f.endswith((".dvc", ".gitignore"))]
    assert outputs == [], "the data and models are DVC's (pointers and dvc.lock name them), never in git"
    assert tags[sharing.TAG_NAME] in _dvc(alice, "exp", "list", "--all-commits", "--name-only")
    # v1 was not on the git remote when registered: flagged (tag + summary line), never silent.
    assert tags[sharing.TAG_STATE_SHARED] == "false" and tags[sharing.TAG_DATA_SHARED] == "true"
    assert any("dvc exp push origin" in w for w in team["v1"]["warnings"])
    # v2: exp.auto_push set, so registration pushed it; the origin has the state.
    tags_v2 = _version(params, "2").tags
    assert tags_v2[sharing.TAG_STATE_SHARED] == "true" and team["v2"]["warnings"] == []
    assert tags_v2[sharing.TAG_COMMIT] in git(team["origin"], "ls-remote", str(team["origin"]), tags_v2[sharing.TAG_REF])
    assert tags_v2["data.md5"] != tags["data.md5"]


def test_alice_reproduces_the_challenger_byte_for_byte_in_a_fresh_worktree(team):
    from prefect.client.orchestration import get_client

    from flows.reproduce import reproduce

    alice, params = team["alice"], team["params"]
    report = reproduce(params.register.model_name, "@challenger", params=str(alice / "params.yaml"))
    checks = {c["name"]: c for c in report["checks"]}
    assert report["version"] == "2" and report["reproduced"], report
    assert checks["adapter.sha256"]["ok"] and checks["adapter.sha256"]["required"]
    assert checks["adapter.sha256"]["actual"] == _version(params, "2").tags["adapter.sha256"]
    assert checks["dvc.lock deps"]["ok"] and checks["data.md5"]["ok"]
    assert not os.path.exists(report["workdir"]), "a reproduced worktree is removed"
    assert git(alice, "worktree", "list").count("\n") == 1
    tags = _version(params, "2").tags
    assert tags["peftflow.reproduced"] == "true" and tags["peftflow.reproduced_at"]
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
    keys = {a.key for a in artifact}
    assert f"reproduce-{params.register.model_name}-v2".lower().replace("_", "-") in keys


@pytest.fixture(scope="module")
def teammate(team):
    clone = team["base"] / "bob"
    # --no-local: a real transport, as from a server (a local clone would hard-link every object, state commits too)
    subprocess.run(["git", "clone", "-q", "--no-local", "-b", "main", str(team["origin"]), str(clone)], check=True)
    return clone


def _reproduce_cli(team, clone, version: str) -> subprocess.CompletedProcess:
    params = team["params"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(params), "PREFECT_API_URL": team["prefect_url"]}
    return subprocess.run([sys.executable, "-m", "flows.reproduce", params.register.model_name, version,
                           "--params", str(clone / "params.yaml")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


def test_a_remote_that_lacks_the_data_fails_in_one_line_naming_the_md5_and_the_remote(team, teammate, tmp_path):
    empty = tmp_path / "empty-remote"
    empty.mkdir()
    _dvc(teammate, "remote", "add", "--local", "--force", "local", str(empty))
    try:
        done = _reproduce_cli(team, teammate, "1")
    finally:
        (teammate / ".dvc" / "config.local").unlink()
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert team["tags_v1"]["data.md5"] in errors[0] and str(empty) in errors[0] and "dvc push" in errors[0]
    assert _version(team["params"], "1").tags["peftflow.reproduced"].startswith("error: DVC remote local")
    assert git(teammate, "worktree", "list").count("\n") == 1, "the failed attempt's worktree is removed"


def test_a_teammates_clone_reproduces_v1_with_its_old_data_from_the_cli(team, teammate):
    params = team["params"]
    done = _reproduce_cli(team, teammate, "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "reproduced" in done.stdout and "MISMATCH" not in done.stdout
    tags = _version(params, "1").tags
    assert tags["peftflow.reproduced"] == "true" and tags["peftflow.reproduced.mode"] == "cpu: adapter bytes"
    # The clone fetched the state ref from the origin; its own branch and files did not move.
    assert tags[sharing.TAG_COMMIT] in git(teammate, "rev-parse", tags[sharing.TAG_REF])
    assert git(teammate, "status", "--porcelain") == ""
    assert not (teammate / layout.ADAPTER).exists()


def test_record_leaves_head_index_and_working_tree_alone(tmp_path):
    repo = tmp_path / "r"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "t@t")
    git(repo, "config", "user.name", "t")
    (repo / "dvc.yaml").write_text("stages: {}\n")
    (repo / "code.py").write_text("x = 1\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "init")
    (repo / "code.py").write_text("x = 2\n")  # unstaged edit
    (repo / "staged.py").write_text("y = 1\n")
    git(repo, "add", "staged.py")  # staged new file
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # untracked pipeline file
    (repo / "scratch.txt").write_text("notes\n")  # untracked, not the pipeline's
    before = (git(repo, "status", "--porcelain"), git(repo, "rev-parse", "HEAD"), git(repo, "symbolic-ref", "HEAD"))
    state = runstate.record(repo, "trial-1")
    assert (git(repo, "status", "--porcelain"), git(repo, "rev-parse", "HEAD"), git(repo, "symbolic-ref", "HEAD")) == before
    assert state.dirty and state.added == ("dvc.lock",)
    assert git(repo, "show", f"{state.commit}:code.py") == "x = 2\n"
    assert set(git(repo, "ls-tree", "--name-only", state.commit).split()) == {"code.py", "dvc.lock", "dvc.yaml", "staged.py"}
    assert runstate.git_state(repo)["git.dirty"] == "true"


def test_a_first_run_before_any_commit_and_a_project_outside_git_are_recorded_or_flagged(tmp_path):
    repo = tmp_path / "fresh"
    repo.mkdir()
    git(repo, "init", "-q")  # what `python -m tasks.project new` leaves: no commit yet
    (repo / "params.yaml").write_text("seed: 1\n")
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    state = runstate.record(repo, "first")
    assert state.baseline == "" and state.dirty
    assert state.ref == f"refs/exps/{state.commit[:2]}/{state.commit[2:]}/first"  # its own baseline
    assert set(git(repo, "ls-tree", "--name-only", state.commit).split()) == {"dvc.lock", "params.yaml"}
    assert git(repo, "status", "--porcelain") == "?? dvc.lock\n?? params.yaml\n"

    outside = tmp_path / "no-git"
    outside.mkdir()
    tags = sharing.record_for_version(outside, "m", "0" * 64)
    assert tags[sharing.TAG_STATE_SHARED] == "false" and "git init" in sharing.warnings(tags)[0]


def test_a_project_in_a_subfolder_records_its_pointers_and_its_code_deps_outside_it(tmp_path):
    repo = tmp_path / "checkout"
    (repo / "tasks").mkdir(parents=True)
    (repo / "examples" / "chat" / "data").mkdir(parents=True)
    git(repo, "init", "-q")
    (repo / "README").write_text("x\n")
    git(repo, "add", ".")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    (repo / "tasks" / "train.py").write_text("# new, untracked stage code\n")
    (repo / "tasks" / "scratch.py").write_text("# untracked, no stage names it\n")
    project = repo / "examples" / "chat"
    (project / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train:\n    cmd: python -m tasks train\n"
                                      "    deps:\n    - path: ../../tasks/train.py\n      md5: 0\n")
    (project / "data" / "raw.parquet.dvc").write_text("outs:\n- md5: 1\n  path: raw.parquet\n")
    state = runstate.record(project, "chat-1")
    assert state.subdir == "examples/chat"
    assert set(state.added) == {"examples/chat/dvc.lock", "examples/chat/data/raw.parquet.dvc", "tasks/train.py"}
