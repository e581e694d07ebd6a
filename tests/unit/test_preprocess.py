"""Preprocessing invariants with the real byte-level tokenizer (no model download, no DVC).

Loss mask = exactly the response; splits disjoint, complete and reproducible; groups never
straddle splits; bad inputs fail with clear errors; a failed stage leaves no half-written output.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from datasets import load_from_disk

from tasks import encoding, ingest, layout, models, preprocess, splits
from tasks.config import parse_params
from tasks.errors import ConfigError, DataError

IGNORE = encoding.IGNORE


@pytest.fixture(scope="module")
def tok():
    return models.byte_tokenizer()


def params(root=None, **pre):
    data = {"model": {"base": "random:tiny"}, "preprocess": {"max_length": 256, **pre}}
    return parse_params(data, root=root) if root else parse_params(data)


def reviews(n=60, movies=12) -> pd.DataFrame:
    return pd.DataFrame({
        "category": ["fresh" if i % 3 else "rotten" for i in range(n)],
        "text": [f"review number {i} of movie {i % movies}" for i in range(n)],
        "movie_name": [f"movie {i % movies}" for i in range(n)],
    })


def write_raw(root, df):
    (root / layout.RAW_DATA).parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(root / layout.RAW_DATA, index=False)


# --- loss mask ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("chat", [True, False])
def test_loss_mask_covers_exactly_the_response_and_end_of_turn(tok, chat):
    cfg = params(chat_template=chat, system_prompt="Be brief.").preprocess
    prompt = preprocess.render_prompt(tok, cfg, {"text": "a fine film"})
    assert ("<|im_start|>assistant\n" in prompt) == chat and ("Be brief." in prompt) == chat
    ids, labels = encoding.encode_pair(tok, prompt, "positive", cfg.max_length)
    assert len(ids) == len(labels)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[n_prompt:]) == "positive<|im_end|>"
    assert tok.decode(ids[:n_prompt]) == prompt


def test_truncation_keeps_response_and_cuts_prompt_middle(tok):
    prompt = "HEAD " + "x" * 500 + " TAIL"
    ids, labels = encoding.encode_pair(tok, prompt, "negative", 64)
    assert len(ids) == 64
    kept = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    assert tok.decode(kept) == "negative<|im_end|>"
    text = tok.decode(ids)
    assert text.startswith("HEAD ") and text.endswith(" TAILnegative<|im_end|>")


def test_processed_rows_have_the_documented_columns(tok):
    cfg = params(max_length=48).preprocess  # some rows truncated
    rows, names, _ = preprocess.prepare_rows(reviews(), cfg)
    cols = preprocess.encode_rows(tok, cfg, rows)
    assert names == ["negative", "positive"] and any(cols["truncated"])
    for ids, labels, label, prompt, target in zip(cols["input_ids"], cols["labels"], cols["label"], cols["prompt"],
                                                  cols["target"]):
        assert target == names[label]
        assert (ids, labels) == encoding.encode_pair(tok, prompt, target, cfg.max_length)  # evaluation reuses it
        response = [i for i, lab in zip(ids, labels) if lab != IGNORE]
        assert tok.decode(response) == target + "<|im_end|>"


def test_text_format_trains_on_every_token(tok):
    cfg = params(format="text", prompt_template="{text}").preprocess
    rows, names, _ = preprocess.prepare_rows(reviews(6), cfg)
    cols = preprocess.encode_rows(tok, cfg, rows)
    assert names == [] and set(cols["label"]) == {-1} and set(cols["target"]) == {""}
    assert cols["labels"] == cols["input_ids"]
    assert tok.decode(cols["input_ids"][0]) == rows[0]["fields"]["text"] + "<|im_end|>"


def test_classification_has_class_ids_and_no_lm_labels(tok):
    cfg = params(format="classification", prompt_template="{text}", max_length=16).preprocess
    rows, names, _ = preprocess.prepare_rows(reviews(6), cfg)
    cols = preprocess.encode_rows(tok, cfg, rows)
    assert "labels" not in cols and cols["label"] == [names.index(r["target"]) for r in rows]
    assert all(len(ids) <= 16 for ids in cols["input_ids"]) and all(cols["truncated"])


# --- split --------------------------------------------------------------------------------------------

def split_texts(df, **split):
    cfg = params(split={"validation": 0.2, "test": 0.2, **split}).preprocess
    rows, _, _ = preprocess.prepare_rows(df, cfg)
    parts, _ = splits.split_rows(rows, cfg.split, labelled=True)
    return {name: [r["fields"]["text"] for r in part] for name, part in parts.items()}


def test_splits_are_disjoint_complete_and_reproducible():
    df = reviews(200, movies=40)
    a = split_texts(df)
    sets = [set(v) for v in a.values()]
    assert sum(map(len, sets)) == 200 and set.union(*sets) == set(df.text)
    assert all(len(sets[i] & sets[j]) == 0 for i in range(3) for j in range(i + 1, 3))
    assert a == split_texts(df)
    shuffled = split_texts(df.sample(frac=1.0, random_state=1))
    assert {k: set(v) for k, v in shuffled.items()} == {k: set(v) for k, v in a.items()}
    assert split_texts(df, seed=7) != a
    assert 20 <= len(a["test"]) <= 60 and 20 <= len(a["validation"]) <= 60


def test_groups_never_straddle_splits():
    df = reviews(300, movies=25)
    parts = split_texts(df)
    movie_of = dict(zip(df.text, df.movie_name))
    movies = [{movie_of[t] for t in texts} for texts in parts.values()]
    assert all(len(movies[i] & movies[j]) == 0 for i in range(3) for j in range(i + 1, 3))


def test_no_group_by_splits_rows():
    df = reviews(50, movies=1)  # one movie: grouped, it could not be split at all
    with pytest.raises(DataError, match="too few to fill"):
        split_texts(df)
    parts = split_texts(df, group_by=None)
    assert all(parts.values())


def imbalanced(group_size=None) -> pd.DataFrame:
    """600 rows over 8 labels of very different sizes (200 down to 10), the issue's case; with
    `group_size`, runs of that many rows of one label share a movie."""
    counts = [200, 150, 100, 60, 40, 25, 15, 10]
    cats = [f"c{k}" for k, c in enumerate(counts) for _ in range(c)]
    movies = [f"m{i // group_size}" for i in range(len(cats))] if group_size else [None] * len(cats)
    return pd.DataFrame({"category": cats, "text": [f"row {i}" for i in range(len(cats))], "movie_name": movies})


@pytest.mark.parametrize("group_size", [None, 2])
def test_stratified_split_keeps_each_label_share_in_every_split(group_size):
    df = imbalanced(group_size)
    cfg = params(labels={f"c{k}": f"label{k}" for k in range(8)},
                 split={"validation": 0.1, "test": 0.1, "group_by": "movie_name" if group_size else None}).preprocess
    rows, _, _ = preprocess.prepare_rows(df, cfg)
    parts, stratified = splits.split_rows(rows, cfg.split, labelled=True)
    assert stratified
    share = df.category.value_counts(normalize=True)
    for name in ("validation", "test"):
        part = pd.Series([r["label"] for r in parts[name]])
        # whole groups of 2 rows: the rarest label (5 groups) cannot be in all three splits
        assert part.nunique() >= (7 if group_size else 8), f"{name} holds {part.nunique()} of the 8 labels"
        got = part.value_counts(normalize=True)
        big = [k for k in range(8) if share[f"c{k}"] >= (0.08 if group_size else 0)]
        assert all(abs(got[k] - share[f"c{k}"]) < 0.03 for k in big), (name, got.to_dict())
        assert abs(len(parts[name]) - 60) <= 5
    groups = [{r["group"] for r in part} for part in parts.values()]
    assert all(len(groups[i] & groups[j]) == 0 for i in range(3) for j in range(i + 1, 3))  # still group-aware
    assert splits.split_rows(rows, cfg.split, labelled=True) == (parts, True)
    other, _ = splits.split_rows(rows, cfg.split.model_copy(update={"seed": 7}), labelled=True)
    assert other["test"] != parts["test"]


def test_stratify_off_or_too_small_falls_back_to_the_group_split():
    df = imbalanced()
    cfg = params(labels={f"c{k}": f"label{k}" for k in range(8)},
                 split={"group_by": None, "stratify": False}).preprocess
    rows, _, _ = preprocess.prepare_rows(df, cfg)
    assert splits.split_rows(rows, cfg.split, labelled=True)[1] is False
    tiny = [{**r, "label": i % 5} for i, r in enumerate(rows[:7])]  # five labels, test of one row: cannot stratify
    parts, stratified = splits.split_rows(tiny, cfg.split.model_copy(update={"stratify": True}), labelled=True)
    assert not stratified and sum(map(len, parts.values())) == 7


# --- bad input ------------------------------------------------------------------------------------------

def test_missing_column_lists_existing_columns():
    cfg = params(text_fields=["review"]).preprocess
    with pytest.raises(DataError, match=r"preprocess.text_fields\[0\] = 'review'.*Columns that exist: category, text, movie_name"):
        preprocess.prepare_rows(reviews(), cfg)


def test_labels_outside_names_are_an_error_or_dropped():
    df = reviews(30)
    df.loc[[4, 7], "category"] = "plot"
    with pytest.raises(DataError, match=r"'plot' \(2 rows, e.g. row 4\).*unknown_labels: drop"):
        preprocess.prepare_rows(df, params().preprocess)
    rows, _, dropped = preprocess.prepare_rows(df, params(unknown_labels="drop").preprocess)
    assert len(rows) == 28 and dropped["unknown_label"] == 2


def test_empty_and_duplicate_texts_are_dropped_and_counted():
    df = reviews(30)
    df.loc[3, "text"] = "   "
    df.loc[5, "text"] = None
    df.loc[8, "text"] = df.loc[9, "text"] + "  "  # a duplicate after stripping
    df.loc[12, "text"] = df.loc[20, "text"]
    rows, _, dropped = preprocess.prepare_rows(df, params().preprocess)
    assert dropped == {"empty_text": 2, "empty_response": 0, "unknown_label": 0, "duplicate_text": 2}
    assert len(rows) == 26 and len({r["fields"]["text"].strip() for r in rows}) == 26


def test_response_field_gives_the_target_and_empty_responses_are_dropped(tok):
    df = pd.DataFrame({"question": ["2+2?", "capital of France?", "empty?"], "answer": ["4", "Paris", " "]})
    cfg = params(text_fields=["question"], prompt_template="Q: {question}", response_field="answer",
                 split={"group_by": None}).preprocess
    rows, names, dropped = preprocess.prepare_rows(df, cfg)
    assert names == [] and [r["target"] for r in rows] == ["4", "Paris"] and dropped["empty_response"] == 1
    cols = preprocess.encode_rows(tok, cfg, rows)
    assert cols["label"] == [-1, -1]
    assert tok.decode([i for i, lab in zip(cols["input_ids"][1], cols["labels"][1]) if lab != IGNORE]) == "Paris<|im_end|>"


def test_empty_after_filtering_is_an_error():
    df = reviews(5)
    df["text"] = ""
    with pytest.raises(DataError, match=r"no rows left after filtering 5 raw rows.*'empty_text': 5"):
        preprocess.prepare_rows(df, params().preprocess)


def test_template_naming_an_unknown_field_is_a_config_error():
    with pytest.raises(ConfigError, match=r"prompt_template uses field\(s\) \['title'\]"):
        preprocess.prepare_rows(reviews(), params(prompt_template="{title}: {text}").preprocess)


def test_max_samples_caps_rows_deterministically():
    cfg = params(max_samples=25).preprocess
    a, _, _ = preprocess.prepare_rows(reviews(100), cfg)
    b, _, _ = preprocess.prepare_rows(reviews(100), cfg)
    assert len(a) == 25 and a == b


# --- the stage --------------------------------------------------------------------------------------------

def test_run_writes_dataset_and_report(tmp_path):
    write_raw(tmp_path, reviews(120, movies=30))
    result = preprocess.run(params(tmp_path))
    ds = load_from_disk(str(tmp_path / layout.PROCESSED))
    assert set(ds) == {"train", "validation", "test"}
    assert ds["train"].column_names == ["input_ids", "labels", "label", "prompt", "target"]
    assert {k: len(v) for k, v in ds.items()} == result.rows and sum(result.rows.values()) == 120
    report = json.loads((tmp_path / layout.report("preprocess")).read_text())
    assert report["label_names"] == ["negative", "positive"]
    assert set(report["tokens"]) == {"mean", "p50", "p95", "max", "truncated_fraction"}
    assert report["rows_per_label"]["train"]["positive"] > 0


def test_rerun_reproduces_identical_bytes(tmp_path):
    import hashlib

    def digests():
        return {p.relative_to(tmp_path): hashlib.md5(p.read_bytes()).hexdigest()
                for p in sorted((tmp_path / layout.PROCESSED).rglob("*")) if p.is_file()}

    write_raw(tmp_path, reviews(60, movies=20))
    preprocess.run(params(tmp_path))
    first = digests()
    preprocess.run(params(tmp_path))
    assert digests() == first  # so DVC sees an unchanged output and downstream stages stay cached


def test_empty_raw_data_is_an_error(tmp_path):
    write_raw(tmp_path, reviews(0))
    with pytest.raises(DataError, match="has no rows"):
        preprocess.run(params(tmp_path))


def test_missing_raw_data_says_run_ingest(tmp_path):
    with pytest.raises(DataError, match="run the ingest stage first"):
        preprocess.run(params(tmp_path))


def test_failed_run_leaves_previous_output_whole(tmp_path):
    write_raw(tmp_path, reviews(120, movies=30))
    preprocess.run(params(tmp_path))
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*"))
    with pytest.raises(DataError):
        preprocess.run(params(tmp_path, label_field="missing_column"))
    with pytest.raises(DataError):
        preprocess.run(params(tmp_path, max_length=8, split={"group_by": "category", "test": 0.5}))
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*")) == before
    assert len(load_from_disk(str(tmp_path / layout.PROCESSED))["train"]) > 0


# --- ingest reading (before any DVC call) ------------------------------------------------------------------

def ingest_params(root, source):
    return parse_params({"ingest": {"source": source}}, root=root)


def test_non_utf8_csv_is_rejected_with_line_numbers(tmp_path):
    (tmp_path / "d.csv").write_bytes(b"text,category\nfine,fresh\ncaf\xe9 au lait,rotten\nok,fresh\nbad\xff,fresh\n")
    with pytest.raises(DataError, match=r"not UTF-8 on 2 line\(s\): 3, 5 \(line 1 is the header\)"):
        ingest.run(ingest_params(tmp_path, "d.csv"))


def test_nul_bytes_are_rejected_with_line_numbers(tmp_path):
    (tmp_path / "d.csv").write_bytes(b"text,category\nfine,fresh\nnul\x00here,rotten\n")
    with pytest.raises(DataError, match=r"NUL bytes on 1 line\(s\): 3"):
        ingest.run(ingest_params(tmp_path, "d.csv"))


@pytest.mark.parametrize("source, fragment", [
    ("missing.csv", "file not found"),
    ("data.xlsx", "unknown source"),
    ("embedded:imdb", "unknown embedded data set"),
])
def test_bad_sources_fail_clearly(tmp_path, source, fragment):
    with pytest.raises(DataError, match=fragment):
        ingest.run(ingest_params(tmp_path, source))


def test_empty_csv_is_an_error(tmp_path):
    (tmp_path / "d.csv").write_text("text,category\n")
    with pytest.raises(DataError, match="has no rows"):
        ingest.run(ingest_params(tmp_path, "d.csv"))


def test_hf_source_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="could not be loaded"):
        ingest.run(ingest_params(tmp_path, "hf:no-such-user/no-such-dataset"))
