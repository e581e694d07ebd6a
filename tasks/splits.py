"""The train/validation/test split of the preprocess stage (its rule 5), grouped and stratified.

Contract: `split_rows(rows, split, labelled) -> (parts, stratified)`: `parts` maps each of
train/validation/test to its rows (every row in exactly one, input order kept within a split);
`stratified` says whether label shares were balanced. Same rows + same `split.seed` = same split.
Rows of one group (`row["group"]`, preprocess gives an ungrouped row a group of its own) never
straddle splits. Raises DataError when a needed split would be empty.

How: with `split.stratify` and labelled rows (`labelled`: rows carry class ids in `row["label"]`,
and there are at least two) scikit-learn balances the labels: `train_test_split(stratify=)` on
rows without `group_by`, `StratifiedGroupKFold` (one fold for test, then one of the rest for
validation, the fold count from the fractions) with it. When the data is too small for that
(a label with one row, fewer groups than folds), or without labels, groups are shuffled with the
seed and test, then validation take groups until they hold their fraction of rows.
"""

from __future__ import annotations

import logging
import warnings

from tasks.config import SplitConfig
from tasks.errors import DataError

SPLITS = ("train", "validation", "test")
log = logging.getLogger(__name__)


def split_rows(rows: list[dict], split: SplitConfig, *, labelled: bool) -> tuple[dict[str, list[dict]], bool]:
    """See the module docstring."""
    where = None
    if split.stratify and labelled and len({r["label"] for r in rows}) > 1:
        where = _stratified(rows, split)
        if where is None:
            log.info("split: too few rows per label or groups to stratify; split without stratification")
    stratified = where is not None
    if where is None:
        where = _by_groups(rows, split)
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for i, r in enumerate(rows):
        out[where[i]].append(r)
    needed = [s for s in SPLITS if not out[s] and (s != "validation" or split.validation > 0)]
    if needed:
        raise DataError(
            f"{len(rows)} rows in {len({r['group'] for r in rows})} group(s) are too few to fill split(s) "
            f"{', '.join(needed)}; use more data (preprocess.max_samples), smaller preprocess.split fractions, "
            f"or preprocess.split.group_by: null"
        )
    return out, stratified


def _by_groups(rows: list[dict], split: SplitConfig) -> list[str]:
    """Split name per row: sorted distinct groups, shuffled with the seed, fill test then validation."""
    import numpy as np

    sizes: dict[str, int] = {}
    for r in rows:
        sizes[r["group"]] = sizes.get(r["group"], 0) + 1
    groups = sorted(sizes)
    order = np.random.default_rng(split.seed).permutation(len(groups))
    n = len(rows)
    targets = {"test": max(1, round(split.test * n)),
               "validation": max(1, round(split.validation * n)) if split.validation > 0 else 0}
    where: dict[str, str] = {}
    counts = {"test": 0, "validation": 0}
    for i in order:
        g = groups[i]
        name = next((s for s in ("test", "validation") if counts[s] < targets[s]), "train")
        where[g] = name
        if name != "train":
            counts[name] += sizes[g]
    return [where[r["group"]] for r in rows]


def _stratified(rows: list[dict], split: SplitConfig) -> list[str] | None:
    """Split name per row with label shares balanced, or None when scikit-learn cannot (too small)."""
    import numpy as np

    labels = np.array([r["label"] for r in rows])
    index = np.arange(len(rows))
    grouped = split.group_by is not None
    try:
        with warnings.catch_warnings():
            # a label with fewer rows than folds: sklearn warns and still balances what it can
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            rest, test = _take(index, labels, rows, split.test, 1.0, split.seed, grouped)
            validation = []
            if split.validation > 0:
                rest, validation = _take(rest, labels[rest], [rows[i] for i in rest], split.validation,
                                         len(rest) / len(rows), split.seed, grouped)
    except ValueError:  # sklearn's "too few members/groups for this split" (its message is for coders)
        return None
    where = ["train"] * len(rows)
    for name, part in (("test", test), ("validation", validation)):
        for i in part:
            where[int(i)] = name
    return where


def _take(index, labels, rows: list[dict], fraction: float, left: float, seed: int, grouped: bool):
    """(remaining indices, taken indices): `fraction` of all rows taken from the `left` share of
    them held by `index`, stratified by `labels`, by groups when `grouped`."""
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    if not grouped:
        count = max(1, round(fraction * len(index) / left))
        return train_test_split(index, test_size=count, stratify=labels, random_state=seed, shuffle=True)
    folds = max(2, round(left / fraction))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    remaining, taken = next(splitter.split(index, labels, groups=[r["group"] for r in rows]))
    return index[remaining], index[taken]
