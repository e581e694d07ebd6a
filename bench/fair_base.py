"""How fair is the zero-shot base? Label scoring variants of the base model on two labelled sets,
and the cost of scoring long multi-label rows before and after the one-cut-per-row change.

    .venv/bin/python bench/fair_base.py fairness      # base model, no adapter: which reference is fairest
    .venv/bin/python bench/fair_base.py truncation    # label scoring time, per-label cuts vs one cut per row

`fairness` scores the base (SmolLM2-135M-Instruct) on the test rows of
  - rotten_tomatoes: the embedded default (params.yaml as shipped), 2 labels;
  - chatterbot_topics: the first user turn of each chatterbot-corpus conversation, labelled with
    its category (the 8 largest: trivia, ai, coding, psychology, emotion, literature, humor,
    money), an imbalanced 8-label set whose label names differ in length,
through the pipeline's own code (tasks/preprocess.py, tasks/evalset.py), and prints for each
predictor (summed, length-normalised, calibrated log-likelihood; the majority label): accuracy,
macro-F1 and the share of rows given the most-predicted label. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks import devices, encoding, evalset, ingest, metrics, models, preprocess, scoring  # noqa: E402
from tasks.config import load_params  # noqa: E402

TOPICS = {"trivia": "trivia", "ai": "artificial intelligence", "coding": "programming", "psychology": "psychology",
          "emotion": "emotions", "literature": "literature", "humor": "humor", "money": "money"}


def project(root: Path, overrides: dict, raw) -> object:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section] = {**params[section], **values}
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "data/raw").mkdir(parents=True)
    raw.to_parquet(root / "data/raw/dataset.parquet")
    p = load_params(root / "params.yaml")
    preprocess.run(p)
    return p


def rotten_tomatoes(root: Path):
    table = ingest._read_source("embedded:rotten_tomatoes", "train", None, root)
    return project(root, {}, table.to_pandas())


def chatterbot_topics(root: Path):
    df = ingest._read_source("embedded:chatterbot", "train", None, root).to_pandas()
    df = df[df["category"].isin(TOPICS)]
    df = df.assign(text=[json.loads(m)[0]["content"] for m in df["messages"]])[["text", "category"]]
    return project(root, {"preprocess": {"labels": TOPICS, "label_field": "category",
                                         "system_prompt": "Which topic is this message about? Answer with the topic.",
                                         "split": {"validation": 0.1, "test": 0.3, "group_by": None, "seed": 42}}}, df)


def fairness() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in (("rotten_tomatoes", rotten_tomatoes), ("chatterbot_topics", chatterbot_topics)):
            params = make(Path(tmp) / name)
            base = models.resolve(params.model)
            tok = models.load_tokenizer(base)
            es = evalset.build(params, tok)
            device, dtype = devices.torch_placement(params.train)
            model = evalset.load_scoring_model(params, base, es.label_names, device, dtype)
            cols = evalset.measure(model, es, params, tok, device, "base").cols
            k = len(es.label_names)
            print(f"\n{name}: {len(es.rows)} test rows, {k} labels {es.label_names}")
            for column, label in (("pred", "summed log-likelihood"), ("pred_norm", "length-normalised"),
                                  ("pred_cal", "calibrated (content-free)"), ("majority", "majority label")):
                view = {**cols, "pred": cols[column]}
                share = np.bincount(cols[column], minlength=k).max() / len(cols[column])
                print(f"  {label:28s} accuracy {metrics.table_metric('accuracy', view, k):.4f}  "
                      f"macro-F1 {metrics.table_metric('f1_macro', view, k):.4f}  top-label share {share:.3f}")


def truncation(n_rows: int = 32, max_length: int = 128) -> None:
    """Label scoring of long texts (Wikipedia leads, 8 labels of 1-4 tokens): rows cut per label
    (the old encoding: prompts differ per label, so each row falls back to 8 full sequences) vs
    one cut per row to the longest label's budget (shared prompt cache)."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        table = ingest._read_source("embedded:wiki_descriptions", "train", None, Path(tmp)).to_pandas()
    texts = [t for t in table.iloc[:, 1].astype(str) if len(t) > 800][:n_rows]
    base = models.resolve(load_params(REPO / "params.yaml").model)
    tok, model = models.load_tokenizer(base), models.load_model(base).eval()
    names = list(TOPICS.values())
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Topic of: {t}"}], tokenize=False,
                                       add_generation_prompt=True) for t in texts]
    reserve = encoding.label_reserve(tok, names)
    kw = dict(batch_size=16, pad_id=tok.pad_token_id, device=torch.device("cpu"), desc="t")
    for label, res in (("per-label cuts (before)", 0), ("one cut per row (after)", reserve)):
        groups = [[encoding.encode_pair(tok, p, n, max_length, res) for n in names] for p in prompts]
        fallback = sum(scoring.split_prompt(g) is None for g in groups)
        start = time.perf_counter()
        scoring.label_nll(model, groups, **kw)
        print(f"{label}: {n_rows} rows x {len(names)} labels at max_length {max_length}: "
              f"{fallback} rows fall back to full sequences, {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    {"fairness": fairness, "truncation": truncation}[sys.argv[1] if len(sys.argv) > 1 else "fairness"]()
