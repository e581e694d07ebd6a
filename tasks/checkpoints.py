"""Training checkpoints that survive kill -9: fingerprinted run folders, manifests, resume choice.

Layout: `checkpoints/<fingerprint>/checkpoint-<step>/` (written by the HF Trainer) plus
`MANIFEST.json` (sha256 of every other file), written atomically AFTER the checkpoint is
complete. A checkpoint counts only if its manifest verifies, so a folder half-written by a
killed save, or half-deleted by checkpoint rotation, is never resumed.

The fingerprint covers everything that shapes the trained weights (model, preprocess and train
params, base weights, processed data, device and dtype): a changed param never resumes a stale
checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

from tasks import atomic
from tasks.models import file_sha256

MANIFEST = "MANIFEST.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def tree_sha256(folder: Path, *, exclude: frozenset[str] = frozenset()) -> dict[str, str]:
    """{relative posix path: sha256} of every regular file under `folder` (sorted)."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() not in exclude
    }


def combined_sha256(hashes: dict[str, str]) -> str:
    """One digest over a {name: sha256} map (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(hashes):
        h.update(f"{name}\0{hashes[name]}\n".encode())
    return h.hexdigest()


def fingerprint(parts: dict) -> str:
    """sha256 of a JSON-able dict of everything that determines the training result."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def write_manifest(checkpoint: Path) -> None:
    """Hash every file of a finished checkpoint and write MANIFEST.json last, atomically."""
    checkpoint = Path(checkpoint)
    atomic.write_json(checkpoint / MANIFEST, {"files": tree_sha256(checkpoint, exclude=frozenset({MANIFEST}))})


def verify(checkpoint: Path) -> bool:
    """True if MANIFEST.json exists, parses, and lists exactly the folder's files with matching hashes."""
    checkpoint = Path(checkpoint)
    try:
        listed = json.loads((checkpoint / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not isinstance(listed, dict) or not listed:
        return False
    try:
        return tree_sha256(checkpoint, exclude=frozenset({MANIFEST})) == listed
    except FileNotFoundError:  # being deleted (rotation, or a resume discarding it) as we read it
        return False


def step_of(checkpoint: Path) -> int:
    m = _CKPT_RE.match(Path(checkpoint).name)
    if not m:
        raise ValueError(f"{checkpoint} is not a checkpoint-<step> folder")
    return int(m.group(1))


def latest_valid(run_dir: Path) -> Path | None:
    """The highest-step checkpoint whose manifest verifies; invalid checkpoints above it are deleted.

    Deleting them matters: the Trainer would otherwise write a new save into a folder that
    still holds files of the broken one.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = sorted((p for p in run_dir.iterdir() if p.is_dir() and _CKPT_RE.match(p.name)), key=step_of, reverse=True)
    best = None
    for ckpt in found:
        if best is None and verify(ckpt):
            best = ckpt
        elif best is None:
            shutil.rmtree(ckpt, ignore_errors=True)
    return best


def prune_other_runs(checkpoints_root: Path, keep: str) -> None:
    """Delete checkpoint folders of other fingerprints (they can never be resumed by these params)."""
    checkpoints_root = Path(checkpoints_root)
    if not checkpoints_root.is_dir():
        return
    for p in checkpoints_root.iterdir():
        if p.is_dir() and p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
