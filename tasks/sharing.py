"""What registration records about a run's state, and whether a teammate can get it.

Contract:
- `record_for_version(root, model_name, token) -> tags`: records the project's state
  (`tasks.runstate.record`, name `<model>-<token[:12]>`), pushes it when DVC's `exp.auto_push` is
  set (to `exp.git_remote`, else origin), then checks that the state is on the git remote and the
  data (every `.dvc` pointer's objects) is on the DVC remote. Returns the version tags below; never
  raises for a state or data that is not shared, nor for a project outside git (nothing is
  recorded then): that is a flag (`peftflow.share.warning`), which the run summary prints.
  Raises PeftflowError when git itself fails on the project.
- `warnings(tags) -> list[str]`: the summary lines for a version's tags (empty when shared).

Decision: registration pushes the state only when the project opted in with `dvc config
exp.auto_push true` (DVC's own switch for `dvc exp run/save`), because a push writes to a shared
repository; otherwise it flags and names the command. Data is pushed by ingest already.
"""

from __future__ import annotations

import re
from pathlib import Path

from tasks import runstate, versioning
from tasks.errors import PeftflowError

# The same names a sweep trial's MLflow run carries (tasks/sweep_tracking.py), next to lineage's git.commit.
TAG_REF, TAG_COMMIT, TAG_DIR, TAG_NAME = "git.state_ref", "git.state_commit", "git.state_dir", "git.state_name"
TAG_STATE_REMOTE, TAG_STATE_SHARED = "peftflow.state.remote", "peftflow.state.shared"
TAG_DATA_REMOTE, TAG_DATA_SHARED = "peftflow.data.remote", "peftflow.data.shared"
TAG_WARNING = "peftflow.share.warning"


def state_name(model_name: str, token: str) -> str:
    """A git-ref-safe experiment name for a registered run."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-.") or "run"
    return f"{slug}-{token[:12]}"


def _state_shared(root: Path, state: runstate.RunState) -> tuple[str, str | None]:
    """(remote, problem): where the state ref is, or why it is not on a git remote."""
    remote = runstate.git_remote(root)
    if remote is None:
        return "", (f"state {state.name} is on no git remote (the project has none); add one and run "
                    f"`dvc exp push <remote> {state.name}` (or `git push <remote> {state.ref}`)")
    try:
        if runstate.auto_push(root):
            runstate.push(root, state.ref, remote)
        if runstate.on_remote(root, state.ref, state.commit, remote):
            return remote, None
    except PeftflowError as err:
        return remote, f"state {state.name} could not be pushed to or checked on git remote {remote}: {err}"
    return remote, f"state {state.name} is not on git remote {remote}; run `dvc exp push {remote} {state.name}`"


def _data_shared(root: Path) -> tuple[str, str | None]:
    """(remote, problem): the DVC remote, or why the data is not (all) on it."""
    pointers = versioning.pointers(root)
    try:
        name, url = versioning.remote_url(root)
        missing = versioning.missing_on_remote(root, pointers) if pointers else []
    except PeftflowError as err:
        return "", f"data not checked on a DVC remote: {err}"
    if missing:
        path, md5 = missing[0]
        return f"{name} {url}", (f"DVC remote {name} ({url}) lacks {len(missing)} tracked output(s), e.g. {path} "
                                 f"md5 {md5}; run `dvc push` in {root}")
    return f"{name} {url}", None


def record_for_version(root: Path, model_name: str, token: str) -> dict[str, str]:
    """Record the run's state and say where teammates get it; see the module docstring."""
    root = Path(root)
    if runstate.toplevel(root) is None:
        return {TAG_STATE_SHARED: "false", TAG_WARNING: f"{root} is not in a git work tree, so this version's state "
                f"is not recorded and it cannot be reproduced from the registry; run `git init` there"}
    state = runstate.record(root, state_name(model_name, token), message=f"peftflow: {model_name} run {token[:12]}")
    state_remote, state_problem = _state_shared(root, state)
    data_remote, data_problem = _data_shared(root)
    tags = {TAG_REF: state.ref, TAG_COMMIT: state.commit, TAG_DIR: state.subdir or ".", TAG_NAME: state.name,
            TAG_STATE_REMOTE: state_remote, TAG_STATE_SHARED: str(state_problem is None).lower(),
            TAG_DATA_REMOTE: data_remote, TAG_DATA_SHARED: str(data_problem is None).lower()}
    problems = [p for p in (state_problem, data_problem) if p]
    if problems:
        tags[TAG_WARNING] = "; ".join(problems)[:5000]
    return tags


def warnings(tags: dict[str, str]) -> list[str]:
    """Summary lines for a version: why its state or data is not where teammates get them."""
    if TAG_REF not in tags and not tags.get(TAG_WARNING):
        return ["this version has no recorded state (registered before states were recorded): "
                "it cannot be reproduced from the registry"]
    return [tags[TAG_WARNING]] if tags.get(TAG_WARNING) else []
