"""Ingest sources: nested columns as canonical JSON, the embedded chat and generative data, folder sources."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks import ingest
from tasks.errors import DataError

CONVERSATIONS = [
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
         "name": "weather", "arguments": {"city": "Paris", "unit": "C"}}}]},
     {"role": "tool", "content": "18 C, sunny", "name": "weather"},
     {"role": "assistant", "content": "It is 18 °C and sunny."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
    [{"content": "Hi", "role": "user"}, {"role": "assistant", "content": "Hello!", "weight": 0.5}],
]


def is_text(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_nested_jsonl_columns_become_canonical_json_text(tmp_path):
    rows = [{"id": i, "messages": conv, "tags": ["a", "b"][: i + 1]} for i, conv in enumerate(CONVERSATIONS)]
    rows[2]["tools"] = {"weather": {"parameters": ["city"]}}  # a key only one row has
    write_jsonl(tmp_path / "chats.jsonl", rows)
    table = ingest.read_source("chats.jsonl", tmp_path)
    assert is_text(table.schema.field("messages").type)
    assert [json.loads(m) for m in table.column("messages").to_pylist()] == CONVERSATIONS  # keys kept exactly
    texts = table.column("messages").to_pylist()
    assert texts == [json.dumps(c, sort_keys=True, ensure_ascii=False) for c in CONVERSATIONS]
    assert "°C" in texts[0]  # not \u00b0 escapes
    assert table.column("tools").to_pylist() == [None, None, '{"weather": {"parameters": ["city"]}}']
    assert table.column("id").to_pylist() == [0, 1, 2]

    # Another key order in the file gives the same table: the text is canonical.
    shuffled = [{k: r[k] for k in reversed(list(r))} for r in rows]
    write_jsonl(tmp_path / "again.jsonl", shuffled)
    assert ingest.read_source("again.jsonl", tmp_path).select(table.column_names).equals(table)


def test_nested_parquet_and_hf_columns_become_json_text(tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"messages": [CONVERSATIONS[1], CONVERSATIONS[1][1:]], "n": [1, 2]}), tmp_path / "d.parquet")
    table = ingest.read_source("d.parquet", tmp_path)
    assert is_text(table.schema.field("messages").type)
    assert json.loads(table.column("messages")[1].as_py()) == CONVERSATIONS[1][1:]

    # hf: with a local folder id reads through `datasets` (offline), which unifies row keys into one struct.
    (tmp_path / "hfdata").mkdir()
    write_jsonl(tmp_path / "hfdata" / "train.jsonl", [{"messages": CONVERSATIONS[1]}, {"messages": CONVERSATIONS[1]}])
    hf = ingest.read_source(f"hf:{tmp_path / 'hfdata'}", tmp_path)
    assert is_text(hf.schema.field("messages").type)
    assert json.loads(hf.column("messages")[0].as_py()) == CONVERSATIONS[1]


def test_value_json_cannot_hold_is_a_data_error(tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"blob": [[b"\x00\x01"]]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match="column 'blob' holds a value JSON cannot represent"):
        ingest.read_source("d.parquet", tmp_path)


def test_chatterbot_rows_from_the_package(tmp_path):
    table = ingest.read_source(ingest.EMBEDDED_CHAT, tmp_path)
    assert table.column_names == ["messages", "category", "conversation_id", "opening"]
    assert table.num_rows == 898  # 2,026 entries less repeats, one malformed entry
    rows = table.to_pylist()
    categories = {r["category"] for r in rows}
    assert len(categories) == 21 and {"trivia", "science", "history", "conversations", "greetings"} <= categories
    assert len({r["conversation_id"] for r in rows}) == len(rows)
    assert len({r["messages"] for r in rows}) == len(rows)  # exact repeats dropped
    for r in rows:
        messages = json.loads(r["messages"])
        assert messages and len(messages) % 2 == 0, r["conversation_id"]  # ends on an assistant turn
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in messages)
        assert r["opening"] == messages[0]["content"].lower()
    multi_turn = [json.loads(r["messages"]) for r in rows if r["category"] == "conversations"]
    assert max(map(len, multi_turn)) >= 10
    # YAML scalars stay the text written: trivia's '1963' is a string answer, not the int 1963.
    kennedy = next(json.loads(r["messages"]) for r in rows if "Kennedy assassinated" in r["messages"])
    assert kennedy[1]["content"] == "1963"


def test_chatterbot_bytes_are_deterministic(tmp_path):
    first = ingest.parquet_bytes(ingest.read_source(ingest.EMBEDDED_CHAT, tmp_path))
    second = ingest.parquet_bytes(ingest.read_source(ingest.EMBEDDED_CHAT, tmp_path / "elsewhere"))
    assert first == second
    (tmp_path / "raw.parquet").write_bytes(first)
    assert pq.read_table(tmp_path / "raw.parquet").num_rows == 898


def test_wiki_descriptions_load_offline(tmp_path):
    table = ingest.read_source(ingest.EMBEDDED_WIKI, tmp_path)
    assert table.column_names == ["title", "extract", "description", "topic"]
    assert table.num_rows == 9862
    rows = table.to_pylist()
    assert len({r["title"] for r in rows}) == len(rows)
    assert all(r["description"] and r["extract"] for r in rows)
    assert len({r["topic"] for r in rows}) == 12
    by_title = {r["title"]: r for r in rows}
    assert by_title["Dysprosium"]["extract"].startswith("Dysprosium is a chemical element")
    assert ingest.read_source(ingest.EMBEDDED_WIKI, tmp_path).equals(table)


def test_a_folder_source_is_named_a_folder(tmp_path):
    folder = tmp_path / "data" / "reviews.csv"  # e.g. what Spark writes: a folder of part files
    folder.mkdir(parents=True)
    (folder / "part-00000.csv").write_text("text,category\nok,fresh\n")
    with pytest.raises(DataError, match=r"'data/reviews.csv' is a folder, not a file; .*data/reviews.csv/part-00000.csv"):
        ingest.read_source("data/reviews.csv", tmp_path)
    with pytest.raises(DataError, match="is a folder, not a file"):
        ingest.read_source("data", tmp_path)
