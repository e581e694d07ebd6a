"""Chaos for data versioning (tasks/versioning.py, real DVC on a real local remote):

- the remote is unavailable (its folder replaced by a file) -> push fails with a clear DataError,
  nothing half-pushed; once restored, the same push completes and `dvc status -c` is clean;
- `dvc push` SIGKILLed mid-transfer -> the remote holds only whole objects, and a rerun completes;
- a 1-byte flip in a local cache object -> push refuses it and checkout never writes it;
- a 1-byte flip in a remote object -> `dvc pull` refuses it (remote `verify = true`); a flip in the
  workspace copy of the raw data -> preprocess refuses it (md5 differs from its `.dvc` record).
Each ends with tests/support/invariants.check().
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import git, make_project
from support import invariants
from tasks import versioning
from tasks.errors import DataError

pytestmark = pytest.mark.integration
FILES = 120  # objects in the tracked folder: enough for a push to be cut in the middle


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, check=check)


def object_of(store: Path, file: Path) -> Path:
    """The object holding `file`'s bytes in a DVC cache or local remote (named by their md5)."""
    digest = hashlib.md5(file.read_bytes()).hexdigest()
    return store / "files" / "md5" / digest[:2] / digest[2:]


def flip(path: Path) -> None:
    path.chmod(0o644)  # DVC makes cache objects read-only
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def tracked(tmp_path) -> Path:
    """A project with data/shards/ (FILES small files) tracked by DVC and committed, not pushed."""
    root = make_project(tmp_path / "proj")
    shards = root / "data" / "shards"
    shards.mkdir(parents=True)
    for i in range(FILES):
        (shards / f"{i:04d}.txt").write_text(f"shard {i}\n" * (i + 1))
    versioning.add(root, "data/shards")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "data")
    return root


def test_unavailable_remote_is_a_clear_error_and_push_completes_after_restore(tracked):
    remote = tracked / ".dvc-storage"
    shutil.rmtree(remote, ignore_errors=True)
    remote.write_text("not a folder: the remote's disk is gone\n")
    with pytest.raises(DataError, match=r"remote|push"):
        versioning.push(tracked, ["data/shards"])
    remote.unlink()  # restored (an empty remote)
    assert versioning.push(tracked, ["data/shards"]) == FILES + 1  # every file + the .dir listing
    report = invariants.check(root=tracked).assert_ok()
    assert report.checked_objects == 2 * (FILES + 1)


def test_push_killed_midway_leaves_whole_objects_and_rerun_completes(tracked):
    remote_files = tracked / ".dvc-storage" / "files" / "md5"
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "push", "-j", "1"], cwd=tracked,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if remote_files.is_dir() and sum(1 for _ in remote_files.glob("*/*")) >= 5:
            break
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    pushed = invariants.dvc_objects(tracked / ".dvc-storage")
    assert 0 < len(pushed) < FILES + 1, f"the kill missed the transfer ({len(pushed)} objects pushed)"
    assert all(invariants.object_is_whole(o) for o in pushed)
    assert "deleted" in dvc(tracked, "status", "-c").stdout or "new" in dvc(tracked, "status", "-c").stdout
    versioning.push(tracked, ["data/shards"])
    invariants.check(root=tracked).assert_ok()
    print(f"FIGURE interrupted dvc push: killed after {len(pushed)}/{FILES + 1} objects, all whole; rerun complete")


def test_flipped_cache_object_is_never_pushed_nor_checked_out(tracked):
    obj = object_of(tracked / ".dvc" / "cache", tracked / "data/shards/0007.txt")
    flip(obj)
    with pytest.raises(DataError):
        versioning.push(tracked, ["data/shards"])
    assert not any(o.name == obj.name for o in invariants.dvc_objects(tracked / ".dvc-storage"))
    (tracked / "data/shards/0007.txt").unlink()
    out = dvc(tracked, "checkout", check=False)
    assert out.returncode != 0
    assert not (tracked / "data/shards/0007.txt").exists()  # never restored from the corrupt object


def test_flipped_remote_object_is_refused_before_use(tmp_path):
    """`dvc pull` (remote `verify = true`) refuses a flipped remote object; a flipped workspace copy
    is refused by preprocess, which checks the raw data against the md5 its .dvc file records."""
    import pandas as pd

    from tasks import layout, preprocess
    from tasks.config import load_params

    root = make_project(tmp_path / "proj", {"ingest": {"source": "data/reviews.csv"}})
    raw = root / layout.RAW_DATA
    raw.parent.mkdir(parents=True)
    pd.DataFrame({"text": [f"review {i}" for i in range(50)], "category": ["fresh", "rotten"] * 25}).to_parquet(raw)
    versioning.add(root, layout.RAW_DATA)
    versioning.push(root, [layout.RAW_DATA])
    git(root, "add", "-A")
    git(root, "commit", "-qm", "data")
    flip(object_of(root / ".dvc-storage", raw))

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
    dvc(clone, "remote", "modify", "local", "url", str(root / ".dvc-storage"))
    dvc(clone, "remote", "modify", "local", "verify", "true")
    out = dvc(clone, "pull", f"{layout.RAW_DATA}.dvc", check=False)
    assert out.returncode != 0 and not (clone / layout.RAW_DATA).exists(), out.stdout + out.stderr

    # A flip in the workspace copy (bit rot, an edit outside ingest): preprocess refuses it, changing nothing.
    flip(raw)
    before = sorted(p.relative_to(root) for p in root.rglob("*") if ".git" not in p.parts)
    with pytest.raises(DataError, match="corrupted or changed outside DVC"):
        preprocess.run(load_params(root / "params.yaml"))
    assert sorted(p.relative_to(root) for p in root.rglob("*") if ".git" not in p.parts) == before
