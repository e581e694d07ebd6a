"""The exact state of a pipeline run, recorded as a git commit on a DVC experiment ref, without
touching the user's branch, HEAD, index or working tree (git plumbing only).

Contract:
- `record(root, name) -> RunState`: snapshot what `git commit -a` would record (every tracked
  file as it is in the working tree, staged or not) plus the project's untracked pipeline files
  (`pipeline_files`), as one commit whose parent is HEAD (no parent before the first commit), on
  `refs/exps/<HEAD[:2]>/<HEAD[2:]>/<name>`: DVC's own experiment ref layout, so `dvc exp list`,
  `dvc exp show`, `dvc exp push/pull <git remote> <name>` and `dvc exp apply <name>` work on it.
  Re-recording a name moves its ref. Sweeps call it once per trial with the trial's name.
- `git_state(root) -> tags`: `git.commit` (HEAD) and `git.dirty`: "true" when the recorded state
  would differ from HEAD, i.e. tracked edits OR untracked pipeline files (dvc.lock, .dvc pointers...).
- `pipeline_files(root)`: project-relative paths DVC names: dvc.yaml, dvc.lock, params files, stage
  deps, outs that git does not ignore (`cache: false` metrics and plots), every `.dvc` pointer and
  `.gitignore`, `.dvcignore` and `.dvc/config`. Git-ignored paths (the data, models) never go in:
  DVC holds their bytes, the pointers name them.
- `git_remote(root)`, `on_remote(root, state, remote)`, `push(root, state, remote)`: where the state
  ref goes for teammates (DVC's `exp.git_remote`, else `origin`), and whether it is there.
Raises PeftflowError (one line, with the fix) when git fails; outside a git work tree `record`
raises and `git_state` returns {}.

Why not `dvc exp save` (checked with dvc 3.67.1): it needs every stage output present (it runs
`dvc commit` of all stages, failing before a pipeline ran), leaves out untracked stage deps and
DVC's own `.gitignore` files unless each is named with --include-untracked, detaches HEAD and
stashes/resets the working tree while it works, and reset the user's index (a staged new file was
unstaged). A temporary index file plus `git commit-tree` and `git update-ref` gives the same ref
with none of that.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from tasks.errors import PeftflowError

EXPS = "refs/exps"
PIPELINE_NAMES = ("dvc.yaml", "dvc.lock", "params.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore")
# Who commits a state when git has no identity configured (commit-tree refuses to guess).
_FALLBACK_IDENTITY = {"GIT_AUTHOR_NAME": "peftflow", "GIT_AUTHOR_EMAIL": "peftflow@localhost",
                      "GIT_COMMITTER_NAME": "peftflow", "GIT_COMMITTER_EMAIL": "peftflow@localhost"}


@dataclass(frozen=True)
class RunState:
    commit: str  # the state commit
    ref: str  # refs/exps/<baseline[:2]>/<baseline[2:]>/<name>
    name: str  # the experiment name (`dvc exp push origin <name>`)
    baseline: str  # HEAD when recorded ("" when the repository had no commit yet)
    subdir: str  # the project's folder inside the git work tree ("" at its top)
    dirty: bool  # the state differs from HEAD
    added: tuple[str, ...]  # untracked pipeline files the state holds (work-tree relative)


def _git(cwd: Path, *args: str, env: dict[str, str] | None = None, check: bool = True,
         timeout: float = 120) -> subprocess.CompletedProcess:
    # GIT_TERMINAL_PROMPT=0: a remote that wants a password fails instead of waiting for a tty.
    full_env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", **(env or {})}
    try:
        done = subprocess.run(["git", *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.SubprocessError) as err:
        raise PeftflowError(f"`git {' '.join(args)}` in {cwd} failed: {err}") from None
    if check and done.returncode != 0:
        why = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise PeftflowError(f"`git {' '.join(args[:3])}` in {cwd} failed: {why[-1] if why else done.returncode}")
    return done


def toplevel(root: Path) -> Path | None:
    """The git work tree holding root, or None."""
    try:
        done = _git(Path(root), "rev-parse", "--show-toplevel", check=False, timeout=30)
    except PeftflowError:
        return None
    return Path(done.stdout.strip()).resolve() if done.returncode == 0 else None


def head(top: Path) -> str:
    done = _git(top, "rev-parse", "--verify", "-q", "HEAD^{commit}", check=False)
    return done.stdout.strip() if done.returncode == 0 else ""


def pipeline_files(root: Path) -> list[str]:
    """Paths (relative to root, may start with ../) that the project's DVC pipeline names."""
    root = Path(root)
    paths = set(PIPELINE_NAMES)
    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    except (OSError, yaml.YAMLError):
        lock = {}
    for stage in (lock.get("stages") or {}).values():
        paths.update(str(d["path"]) for d in (stage.get("deps") or []) + (stage.get("outs") or []) if "path" in d)
        paths.update(str(f) for f in (stage.get("params") or {}))
    return sorted(paths)


def _untracked(top: Path, root: Path) -> list[str]:
    """Untracked, not ignored pipeline files, relative to the work tree top."""
    inside = []
    for p in pipeline_files(root):
        full = (root / p).resolve()
        if full.is_relative_to(top) and full.exists():
            inside.append(str(full.relative_to(top)))
    sub = root.resolve().relative_to(top)
    globs = [f":(glob){sub.as_posix() + '/' if str(sub) != '.' else ''}**/{pat}" for pat in ("*.dvc", ".gitignore")]
    out = _git(top, "ls-files", "-z", "--others", "--exclude-standard", "--", *inside, *globs).stdout
    return sorted({p for p in out.split("\0") if p and not p.startswith(".dvc/tmp")})


def _snapshot(top: Path, root: Path) -> tuple[str, str, list[str]]:
    """(tree, HEAD, added files): the tree of the state, built in a temporary index."""
    baseline = head(top)
    added = _untracked(top, root)
    with tempfile.TemporaryDirectory(prefix="peftflow-index-") as tmp:
        index = Path(tmp) / "index"
        real = Path(_git(top, "rev-parse", "--path-format=absolute", "--git-path", "index").stdout.strip())
        if real.is_file():
            shutil.copyfile(real, index)  # keeps git's stat cache: `add -u` re-hashes only edited files
        env = {"GIT_INDEX_FILE": str(index)}
        if not real.is_file() and baseline:
            _git(top, "read-tree", baseline, env=env)
        _git(top, "add", "-u", "--", ".", env=env)
        for chunk in _chunks(added, 500):
            _git(top, "add", "--", *chunk, env=env)
        tree = _git(top, "write-tree", env=env).stdout.strip()
    return tree, baseline, added


def _chunks(items: list[str], n: int) -> Iterable[list[str]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _require_top(root: Path) -> Path:
    top = toplevel(root)
    if top is None:
        raise PeftflowError(f"{root} is not in a git work tree, so its run state cannot be recorded; "
                            f"run `git init` there (`python -m tasks.project sync {root}` does)")
    return top


def git_state(root: Path) -> dict[str, str]:
    """{"git.commit", "mlflow.source.git.commit", "git.dirty"} of the project, or {} outside git."""
    root = Path(root)
    top = toplevel(root)
    if top is None:
        return {}
    tree, baseline, _ = _snapshot(top, root)
    head_tree = _git(top, "rev-parse", f"{baseline}^{{tree}}").stdout.strip() if baseline else ""
    return {"git.commit": baseline, "mlflow.source.git.commit": baseline, "git.dirty": str(tree != head_tree).lower()}


def exp_ref(baseline: str, name: str) -> str:
    # DVC's layout (ExpRefInfo); a first commit has no baseline, so it stands as its own.
    return f"{EXPS}/{baseline[:2]}/{baseline[2:]}/{name}"


def record(root: Path, name: str, message: str | None = None) -> RunState:
    """Commit the project's current state on an experiment ref; see the module docstring."""
    root = Path(root)
    top = _require_top(root)
    done = _git(top, "check-ref-format", f"{EXPS}/ab/cd/{name}", check=False)
    if done.returncode != 0:
        raise PeftflowError(f"{name!r} cannot name a git ref (state of a run); use letters, digits, '-', '_' and '.'")
    tree, baseline, added = _snapshot(top, root)
    env = {} if _git(top, "var", "GIT_AUTHOR_IDENT", check=False).returncode == 0 else _FALLBACK_IDENTITY
    parents = ["-p", baseline] if baseline else []
    text = message or f"peftflow: state of run {name}"
    commit = _git(top, "commit-tree", tree, *parents, "-m", text, env=env).stdout.strip()
    ref = exp_ref(baseline or commit, name)
    _git(top, "update-ref", "-m", f"peftflow: record {name}", ref, commit)
    head_tree = _git(top, "rev-parse", f"{baseline}^{{tree}}").stdout.strip() if baseline else ""
    sub = root.resolve().relative_to(top).as_posix()
    return RunState(commit, ref, name, baseline, "" if sub == "." else sub, tree != head_tree, tuple(added))


def git_remote(root: Path) -> str | None:
    """The git remote for states: DVC's `exp.git_remote` setting, else `origin`, if configured."""
    top = toplevel(root)
    if top is None:
        return None
    remotes = _git(top, "remote", check=False).stdout.split()
    wanted = _dvc_exp_setting(root, "git_remote") or "origin"
    return wanted if wanted in remotes else None


def auto_push(root: Path) -> bool:
    """DVC's `exp.auto_push` setting (`dvc config exp.auto_push true`): push states when recorded."""
    return str(_dvc_exp_setting(root, "auto_push") or "").lower() in ("true", "1", "yes")


def _dvc_exp_setting(root: Path, key: str) -> str | None:
    # Read from the config files (no DVC repo lock needed); config.local overrides config.
    value = None
    for name in ("config", "config.local"):
        path = Path(root) / ".dvc" / name
        if path.is_file():
            import configparser

            parser = configparser.ConfigParser()
            try:
                parser.read(path)
            except configparser.Error:
                continue
            value = parser.get("exp", key, fallback=value)
    return value


def on_remote(root: Path, state_ref: str, commit: str, remote: str) -> bool:
    """True when `remote` has `state_ref` at `commit` (`git ls-remote`)."""
    top = _require_top(root)
    out = _git(top, "ls-remote", remote, state_ref, timeout=60).stdout.split()
    return commit in out


def push(root: Path, state_ref: str, remote: str) -> None:
    """Push the state ref to the git remote (what `dvc exp push <remote> <name>` does)."""
    top = _require_top(root)
    _git(top, "push", "-q", remote, f"{state_ref}:{state_ref}", timeout=300)


def fetch(root: Path, state_ref: str, remote: str) -> None:
    """Fetch a state ref from a git remote (what `dvc exp pull <remote> <name>` does)."""
    top = _require_top(root)
    _git(top, "fetch", "-q", remote, f"+{state_ref}:{state_ref}", timeout=300)


def has_commit(root: Path, commit: str) -> bool:
    top = _require_top(root)
    return _git(top, "cat-file", "-e", f"{commit}^{{commit}}", check=False).returncode == 0


def add_worktree(root: Path, path: Path, commit: str) -> Path:
    """`git worktree add --detach path commit`; returns path."""
    top = _require_top(root)
    _git(top, "worktree", "add", "-q", "--detach", str(path), commit, timeout=600)
    return Path(path)


def remove_worktree(root: Path, path: Path) -> None:
    top = _require_top(root)
    _git(top, "worktree", "remove", "--force", str(path), check=False, timeout=600)
    _git(top, "worktree", "prune", check=False)


def show(root: Path, commit: str, path: str) -> str | None:
    """The text of `path` (work-tree relative) in `commit`, or None."""
    top = _require_top(root)
    done = _git(top, "show", f"{commit}:{path}", check=False)
    return done.stdout if done.returncode == 0 else None
