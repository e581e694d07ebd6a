"""`reports/predictions.csv`: the per-row table of an evaluation, for people and for the gate.

Contract:
- `write(path, es, base, adapter)`: one line per scored test row: `row` (index in the test split),
  `prompt`, `reference`, `base_output`, `adapter_output` (generated text, "" where none), `base_label`,
  `adapter_label` (predicted label names, label formats), then every per-row column of both models as `base.<column>` / `adapter.<column>`
  (tasks/metrics.py), plus `label` and `majority`. Written atomically.
- `read(path) -> (rows, base_cols, adapter_cols)`: the per-row tables back, as numpy columns, so
  the gate compares the candidate with the champion on exactly these rows. DataError if the file
  is missing or malformed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from tasks import atomic
from tasks.errors import DataError

SHARED = ("label", "majority")
INT_COLUMNS = ("label", "majority", "pred", "pred_norm", "pred_cal", "n_tokens")


def _label_names_of(measured, names: list[str]) -> list[str]:
    return [names[int(p)] if p >= 0 else "" for p in measured.cols["pred"]]


def write(path: Path, es, base, adapter) -> None:
    import pandas as pd

    table = {"row": es.rows, "prompt": es.prompts, "reference": es.targets,
             "base_output": base.outputs, "adapter_output": adapter.outputs}
    if es.label_names and "pred" in base.cols:
        table["base_label"] = _label_names_of(base, es.label_names)
        table["adapter_label"] = _label_names_of(adapter, es.label_names)
    for name in SHARED:
        if name in base.cols:
            table[name] = base.cols[name]
    for which, measured in (("base", base), ("adapter", adapter)):
        for name, col in measured.cols.items():
            if name not in SHARED:
                table[f"{which}.{name}"] = col
    buf = io.StringIO()
    pd.DataFrame(table).to_csv(buf, index=False, lineterminator="\n", float_format="%.17g")
    atomic.write_text(path, buf.getvalue())


def read(path: Path) -> tuple[list[int], dict[str, np.ndarray], dict[str, np.ndarray]]:
    import pandas as pd

    try:
        df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is missing or unreadable ({err}); run `python -m tasks evaluate`") from None
    if "row" not in df.columns or "label" not in df.columns:
        raise DataError(f"{path} has no per-row columns (row, label); re-run `python -m tasks evaluate`")
    tables: dict[str, dict[str, np.ndarray]] = {"base": {}, "adapter": {}}
    for column in df.columns:
        which, _, name = column.partition(".")
        if column in SHARED:
            for t in tables.values():
                t[column] = df[column].to_numpy(dtype=np.int64)
        elif which in tables and name:
            dtype = np.int64 if name in INT_COLUMNS else np.float64
            tables[which][name] = df[column].to_numpy(dtype=dtype)
    return df["row"].astype(int).tolist(), tables["base"], tables["adapter"]
