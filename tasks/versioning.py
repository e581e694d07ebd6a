"""The only module that talks to DVC (through its Python API, `dvc.repo.Repo`).

Contract:
- `add(root, path) -> md5`: track a file with `dvc add`. Idempotent: unchanged data keeps the
  same md5, adds no cache object and leaves the `.dvc` file's bytes untouched.
- `push(root, targets, remote=None)`: push tracked outputs, then check that the remote really
  holds every object (a push can succeed while cache files are missing).
- `md5(root, path)`: the DVC md5 of a tracked file or folder (folders end in `.dir`).
- `recorded_md5(root, path)`: the md5 in `<path>.dvc`, or None (no DVC call, no lock).
- `stage_is_current(root, stage_name) -> bool`: `dvc status` of one dvc.yaml stage is clean.
- `commit(root, stage_names)`: record stages' current deps/outs in dvc.lock (forced, no prompt).

Raises DataError (a PeftflowError) with what to do for a missing git/DVC repo, a missing remote,
an unknown target or stage, or objects missing on the remote.

DVC allows one writer per repository: calls here are serialised in-process by a lock (and run
with the cwd set to the project root, which DVC assumes in places), and each opens the repo with
wait-for-lock so it waits for another DVC process instead of failing after ~3 s.
A DVC stage command must never call this module on its own outputs (DVC holds the repo lock
while the stage runs), which is why `ingest` is not a dvc.yaml stage.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from tasks.errors import DataError

_LOCK = threading.RLock()


@contextlib.contextmanager
def _repo(root: Path) -> Iterator:
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo import Repo

    # DVC logs CLI hints ("To track the changes with git, run: ...") at INFO on stdout, which
    # would mix with the stage's JSON result; keep warnings and errors only.
    dvc_logger = logging.getLogger("dvc")
    with _LOCK:
        level = dvc_logger.level
        dvc_logger.setLevel(max(level, logging.WARNING))
        try:
            try:
                # `_wait_for_lock` is what `dvc --wait-for-lock` passes: wait for other DVC processes.
                repo = Repo(str(root), _wait_for_lock=True)
            except NotDvcRepoError:
                raise DataError(
                    f"{root} is not a DVC project; run `git init && dvc init` there "
                    f"(and `dvc remote add -d <name> <url>` for pushes)"
                ) from None
            try:
                # Some DVC code paths (e.g. the stage cache on commit) resolve paths against the
                # process cwd, whatever the Repo root is; so DVC runs inside root (under _LOCK).
                with contextlib.chdir(root):
                    yield repo
            except DvcException as err:
                raise DataError(f"DVC failed in {root}: {type(err).__name__}: {err}") from None
            finally:
                repo.close()
        finally:
            dvc_logger.setLevel(level)


def _rel(root: Path, path: Path | str) -> str:
    # Paths handed to DVC are made absolute (root / rel): DVC resolves relative ones against the cwd.
    path = Path(path)
    return str(path.relative_to(root) if path.is_absolute() else path)


def recorded_md5(root: Path, path: Path | str) -> str | None:
    """md5 that `<path>.dvc` records (read without locking the repo), or None when absent/unreadable."""
    import yaml

    dvcfile = Path(root) / f"{_rel(Path(root), path)}.dvc"
    try:
        outs = yaml.safe_load(dvcfile.read_text()).get("outs") or []
    except (OSError, ValueError, AttributeError):
        return None
    return outs[0].get("md5") if len(outs) == 1 else None


def add(root: Path, path: Path | str) -> str:
    """`dvc add` one file or folder (relative to root); return its md5. No-op when unchanged."""
    root = Path(root)
    rel = _rel(root, path)
    if not (root / rel).exists():
        raise DataError(f"cannot track {root / rel}: it does not exist")
    dvcfile = root / f"{rel}.dvc"
    with _repo(root) as repo:
        # Skipping `dvc add` when status is clean keeps the .dvc file byte-for-byte (and its mtime).
        recorded = recorded_md5(root, rel)
        if recorded and not repo.status(targets=[str(dvcfile)]):
            return recorded
        repo.add(str(root / rel))
    digest = recorded_md5(root, rel)
    if not digest:
        raise DataError(f"`dvc add {rel}` did not record an md5 in {dvcfile}")
    return digest


def md5(root: Path, path: Path | str) -> str:
    """The md5 DVC records for a tracked file or folder (`<hash>.dir` for folders)."""
    root = Path(root)
    rel = _rel(root, path)
    with _repo(root) as repo:
        outs = [o for o in _outs(repo, [str(root / rel)]) if o.hash_info and o.hash_info.value]
    if not outs:
        raise DataError(f"{rel} is not tracked by DVC in {root} (no .dvc file or dvc.lock entry)")
    return outs[0].hash_info.value


def _stage(root: Path, name: str) -> str:
    # DVC resolves targets against the process cwd; an absolute dvc.yaml path makes them cwd-proof.
    return f"{root.resolve() / 'dvc.yaml'}:{name}"


def _outs(repo, targets: Iterable[str]) -> list:
    outs = []
    for target in targets:
        for info in repo.stage.collect_granular(target):
            outs.extend(info.stage.outs)
    return outs


def _object_ids(repo, outs: list) -> set[str]:
    """Every object id an output needs on a remote: the file, or the .dir listing and its files."""
    from dvc_data.hashfile.tree import Tree

    oids: set[str] = set()
    for out in outs:
        hi = out.hash_info
        if not hi or not hi.value:
            raise DataError(f"{out} has no recorded hash; run the stage (or `dvc add`) first")
        oids.add(hi.value)
        if hi.isdir:
            tree = Tree.load(repo.cache.local, hi)
            oids.update(entry_hi.value for _, _, entry_hi in tree if entry_hi)
    return oids


def push(root: Path, targets: Iterable[Path | str], remote: str | None = None) -> int:
    """Push targets (tracked paths or .dvc files, relative to root) and verify the remote has them all.

    Returns the number of objects DVC transferred (0 when the remote was already complete).
    Raises DataError when no remote is configured or any object is missing on the remote.
    """
    from dvc.config import NoRemoteError
    from dvc.exceptions import UploadError

    root = Path(root)
    rels = [str(root / _rel(root, t)) for t in targets]
    with _repo(root) as repo:
        try:
            transferred = repo.push(targets=rels, remote=remote)
            odb = repo.cloud.get_remote_odb(name=remote, command="push")
        except NoRemoteError as err:
            raise DataError(f"{err}\n(or set ingest.remote in params.yaml)") from None
        except UploadError as err:
            raise DataError(f"dvc push to remote '{remote or 'default'}' failed: {err}") from None
        except OSError as err:  # e.g. a local/NFS remote whose disk is gone, full or read-only
            raise DataError(f"dvc push to remote '{remote or 'default'}' failed: {type(err).__name__}: {err}; "
                            f"check that the remote is reachable and writable, then push again") from None
        missing = sorted(oid for oid in _object_ids(repo, _outs(repo, rels)) if not odb.exists(oid))
    if missing:
        raise DataError(
            f"after dvc push, the remote '{remote or 'default'}' lacks {len(missing)} object(s) "
            f"(e.g. {missing[0]}); the local cache is probably incomplete: re-run the producing stage "
            f"or `dvc fetch`, then push again"
        )
    return transferred


def stage_is_current(root: Path, stage_name: str) -> bool:
    """True when `dvc status <stage>` is clean: dvc.lock matches its deps, params and outs."""
    root = Path(root)
    with _repo(root) as repo:
        return not repo.status(targets=[_stage(root, stage_name)], check_updates=False)


def commit(root: Path, stage_names: Iterable[str]) -> None:
    """Record the stages' current deps, params and outs in dvc.lock and the cache (forced)."""
    root = Path(root)
    with _repo(root) as repo:
        for name in stage_names:
            repo.commit(target=_stage(root, name), force=True)


LOCAL_REMOTE = "local"


def init_project(root: Path, remote_dir: Path | None = None) -> list[str]:
    """Make `root` (inside a git work tree) a DVC project of its own with a default remote.

    Idempotent: an existing `.dvc/` and an existing default remote are kept. When `root` is not
    the top of its git work tree, DVC is initialised as a subdirectory project (`dvc init
    --subdir`), which an enclosing DVC project ignores, so their stages and data never mix. The
    remote `local` is the folder `remote_dir` (default `<root>/.dvc-storage`), which `.dvc/config`
    records relative to itself, so the project can move.
    Returns what was done (for the caller to report). Raises DataError when DVC refuses.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.scm import SCM

    root = Path(root).resolve()
    remote = Path(remote_dir or root / ".dvc-storage").resolve()
    done: list[str] = []
    from dvc.config_schema import RelPath

    dvc_logger = logging.getLogger("dvc")
    level = dvc_logger.level
    # `dvc init` logs a welcome text at INFO; the caller reports what was done instead.
    with _LOCK:
        dvc_logger.setLevel(max(level, logging.WARNING))
        try:
            if not (root / Repo.DVC_DIR).is_dir():
                top = Path(SCM(str(root), search_parent_directories=True).root_dir).resolve()
                Repo.init(str(root), subdir=top != root).close()
                done.append("dvc init" + (" --subdir" if top != root else ""))
            repo = Repo(str(root))
            try:
                with repo.config.edit() as conf:
                    conf["core"]["analytics"] = False
                    if not conf["core"].get("remote"):
                        # RelPath: DVC writes it relative to .dvc/config (a plain str would be kept absolute).
                        conf["remote"][LOCAL_REMOTE] = {"url": RelPath(str(remote))}
                        conf["core"]["remote"] = LOCAL_REMOTE
                        done.append(f"dvc remote add -d {LOCAL_REMOTE} {remote}")
            finally:
                repo.close()
        except DvcException as err:
            raise DataError(f"cannot set up DVC in {root}: {type(err).__name__}: {err}") from None
        finally:
            dvc_logger.setLevel(level)
    return done


def pointers(root: Path) -> list[str]:
    """The project's `.dvc` pointer files (data DVC tracks outside dvc.yaml), relative to root.
    Hidden folders (.venv, .git, .dvc) and nested DVC projects (a folder with its own .dvc/) are
    not walked: their pointers are not this project's."""
    import os

    root = Path(root)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"
                   and not (Path(folder) / d / ".dvc").is_dir()]
        found += [str((Path(folder) / f).relative_to(root)) for f in files if f.endswith(".dvc")]
    return sorted(found)


def remote_url(root: Path, remote: str | None = None) -> tuple[str, str]:
    """(name, url) of `remote` (default: the project's default remote), relative paths made absolute."""
    root = Path(root)
    with _repo(root) as repo:
        name = remote or repo.config["core"].get("remote")
        conf = repo.config["remote"].get(name) if name else None
    if not conf:
        raise DataError(f"{root} has no DVC remote {name or '(no default)'}; "
                        f"run `dvc remote add -d <name> <url>` there")
    return name, str(conf["url"])


def missing_on_remote(root: Path, targets: Iterable[Path | str], remote: str | None = None) -> list[tuple[str, str]]:
    """(path, md5) of every tracked output among targets whose objects the remote lacks (no transfer)."""
    root = Path(root)
    rels = [str(root / _rel(root, t)) for t in targets]
    missing: list[tuple[str, str]] = []
    with _repo(root) as repo:
        odb = repo.cloud.get_remote_odb(name=remote, command="pull")
        for out in _outs(repo, rels):
            hi = out.hash_info
            if not hi or not hi.value or not odb.exists(hi.value):
                missing.append((str(out), hi.value if hi else "?"))
                continue
            if hi.isdir:  # the listing is there; every file it names must be too
                from dvc_data.hashfile.tree import Tree

                tree = Tree.load(odb, hi)
                if any(e and not odb.exists(e.value) for _, _, e in tree):
                    missing.append((str(out), hi.value))
    return missing


def pull(root: Path, targets: Iterable[Path | str], remote: str | None = None) -> None:
    """`dvc pull` the targets (tracked paths or .dvc files) into the workspace."""
    root = Path(root)
    rels = [str(root / _rel(root, t)) for t in targets]
    with _repo(root) as repo:
        repo.pull(targets=rels, remote=remote)


def use_remotes_of(source: Path, target: Path) -> None:
    """Give `target` (e.g. a fresh worktree of the same project) the DVC remotes of `source`, with
    relative local URLs resolved against source, in target's `.dvc/config.local` (never committed)."""
    with _repo(Path(source)) as repo:
        remotes = {name: dict(conf) for name, conf in repo.config["remote"].items()}
        default = repo.config["core"].get("remote")
    from dvc.config import Config

    conf = Config(dvc_dir=str(Path(target) / ".dvc"), validate=False)
    with conf.edit("local") as local:
        local.setdefault("remote", {}).update({k: {kk: vv for kk, vv in v.items() if isinstance(vv, str | int)}
                                               for k, v in remotes.items()})
        if default:
            local.setdefault("core", {})["remote"] = default


def repro(root: Path, log_path: Path, env: dict[str, str]) -> None:
    """`dvc repro --force` in root, as its own process (stage commands run there, no run cache);
    output to log_path. Raises DataError with the log's last line when it fails."""
    import subprocess
    import sys

    with open(log_path, "w") as log:
        done = subprocess.run([sys.executable, "-m", "dvc", "repro", "--force"], cwd=root, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        lines = [ln for ln in Path(log_path).read_text(errors="replace").splitlines() if ln.strip()]
        raise DataError(f"`dvc repro` in {root} failed ({lines[-1] if lines else done.returncode}); see {log_path}")
