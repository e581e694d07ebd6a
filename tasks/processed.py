"""The one reader of the preprocess stage's outputs: processed splits and label names.

Contract:
- `read_split(root, split, columns) -> datasets.Dataset`: the split of `data/processed/`, checked
  to have `columns` and at least one row.
- `preprocess_report(root) -> dict`: `reports/preprocess.json`.
- `label_names(root) -> list[str]`: `label_names` of `reports/preprocess.json` ([] when the data
  has no class labels).
Both raise DataError naming the file and the command that rebuilds it; every stage that reads
processed data (train, evaluate, merge, register's gate) goes through here, so the errors are one.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks import layout
from tasks.errors import DataError

REBUILD = "re-run `python -m tasks preprocess`"


def read_split(root: Path, split: str, columns: set[str] | frozenset[str] = frozenset()):
    """`data/processed/<split>` as a datasets.Dataset with `columns` (DataError if not)."""
    from datasets import load_from_disk

    path = Path(root) / layout.PROCESSED
    try:
        data = load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path} ({err}); {REBUILD}") from None
    if split not in data:
        raise DataError(f"{path} has no '{split}' split (has {list(data)}); {REBUILD}")
    part = data[split]
    missing = set(columns) - set(part.column_names)
    if missing:
        raise DataError(f"{path}/{split} lacks column(s) {sorted(missing)}; {REBUILD}")
    if len(part) == 0:
        raise DataError(f"{path}/{split} is empty; raise preprocess.split.{split} or use more data")
    return part


def preprocess_report(root: Path) -> dict:
    """reports/preprocess.json as a dict."""
    path = Path(root) / layout.report("preprocess")
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is missing or unreadable ({err}); {REBUILD}") from None
    if not isinstance(report, dict):
        raise DataError(f"{path} is not a JSON object; {REBUILD}")
    return report


def label_names(root: Path) -> list[str]:
    """Ordered label names (class id = index) recorded by preprocess."""
    path = Path(root) / layout.report("preprocess")
    names = preprocess_report(root).get("label_names") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: label_names must be a list of strings, got {names!r}; {REBUILD}")
    return names
