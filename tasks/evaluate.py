"""Stage `evaluate`: score the base model and base + adapter on the test split, the same way.

Reads: `data/processed/` (split `test`), `reports/preprocess.json` (`label_names`, train label
counts), `models/adapter/`, the base model (`model:`), `evaluate:` params, and `train.device` /
`train.precision` (evaluation runs where training ran: CUDA in bf16, or CPU in fp32).
Writes (atomically): `reports/evaluate.json`, `reports/predictions.csv` (tasks/predictions.py: the
per-row table), `reports/confusion_matrix.png`.
Raises: DataError (processed data or label names missing/bad), ModelError (adapter missing, for a
different base, or unloadable), ConfigError (CUDA asked for but absent).

One code path scores both models (tasks/evalset.py): the base is loaded and scored, then the
adapter is loaded on top of that same model object and scored again on the same rows. Every
figure carries a seeded 95% bootstrap interval over the test rows; `lift = adapter - base` is
a paired difference (both resampled on the same rows), so its interval reflects the noise of
the comparison, not of each figure alone (tasks/figures.py).

Metrics (those that apply to the format; see tasks/metrics.py):
- label formats: `accuracy` and `f1_macro` of the summed label log-likelihood (what training
  optimises), `accuracy_norm` (length-normalised), `accuracy_calibrated` (content-free
  calibration), `majority_rate` (the train split's most frequent label on the test rows);
- causal LMs: `loss` / `perplexity` over the supervised tokens;
- generation: `exact_match` (normalised) on `generation_samples` rows for label and text
  formats; for generative formats (chat, instruction with `response_field`) on every row, with
  `token_f1`, `rouge_l`, `chrf`, `embedding_similarity`, `length` and `length_ratio`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks import atomic, devices, evalset, figures, layout, metrics, models, predictions
from tasks.adapters import attach_adapter, check_adapter
from tasks.config import Params
from tasks.errors import DataError

ALWAYS = ("accuracy", "f1_macro", "loss", "perplexity", "exact_match")  # keys every report has (null if n/a)


@dataclass(frozen=True)
class EvaluateResult:
    base: dict
    adapter: dict
    lift: dict
    n_samples: int
    label_names: tuple[str, ...]
    report: str


def summarise(base: dict, adapter: dict, n_classes: int, params: Params) -> dict:
    """`base`, `adapter`, `lift` values and their `intervals` (lists [low, high]) for the report."""
    boot = params.evaluate.bootstrap
    fig = {"base": figures.model_figures(base, n_classes, boot), "adapter": figures.model_figures(adapter, n_classes, boot)}
    fig["lift"] = {m: d for m in fig["adapter"] if m in fig["base"]
                   if (d := figures.difference(adapter, base, m, n_classes, boot)) is not None}
    out: dict = {}
    for which, values in fig.items():
        names = list(dict.fromkeys([*ALWAYS, *values]))
        out[which] = {m: _json_number(values[m].value) if m in values else None for m in names}
        out.setdefault("intervals", {})[which] = {m: [_json_number(f.low), _json_number(f.high)]
                                                  for m, f in values.items() if f.low is not None}
    return out


def _json_number(v):
    # JSON has no NaN/inf; record them as strings so the report stays valid JSON.
    return v if v is None or math.isfinite(v) else str(v)


def _confusion_png(path: Path, es: evalset.EvalSet, predicted, label_names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labeled = es.labels >= 0
    size = max(3.0, 0.6 * len(label_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    if predicted is not None and labeled.any():
        cm = metrics.confusion_matrix(es.labels[labeled], predicted[labeled], len(label_names))
        ax.imshow(cm, cmap="Blues")
        ticks = range(len(label_names))
        ax.set_xticks(ticks, label_names, rotation=45, ha="right")
        ax.set_yticks(ticks, label_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        ax.set_title(f"adapter, {int(labeled.sum())} test rows")
    else:
        # dvc.yaml names this file as an output, so it exists even when it cannot say anything.
        ax.axis("off")
        ax.text(0.5, 0.5, "no class labels:\nno confusion matrix", ha="center", va="center")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: stable bytes
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())


def _base_scores(model, es: evalset.EvalSet, params: Params, tokenizer, device, key: str,
                 cache: Path | None) -> evalset.Measured:
    """The base model's per-row table. With `cache` (a folder; a sweep's trials share one) it is
    kept there under `key` (the fingerprint: base weights, rows, scoring settings) plus every
    `evaluate:` setting, so the same base on the same rows is scored once, not once per trial."""
    if cache is None:
        return evalset.measure(model, es, params, tokenizer, device, "base")
    digest = hashlib.sha256(json.dumps([key, params.evaluate.model_dump(mode="json")], sort_keys=True).encode())
    path = cache / f"base-scores-{digest.hexdigest()[:20]}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            cols = {k.removeprefix("col."): z[k] for k in z.files if k.startswith("col.")}
            return evalset.Measured(cols, [str(o) for o in z["outputs"]])
    scores = evalset.measure(model, es, params, tokenizer, device, "base")
    buf = io.BytesIO()
    np.savez(buf, outputs=np.array(scores.outputs, dtype=str), **{f"col.{k}": v for k, v in scores.cols.items()})
    atomic.write_bytes(path, buf.getvalue())
    return scores


def run(params: Params, split: str = "test", base_cache: Path | None = None) -> EvaluateResult:
    """Evaluate base and base + adapter on the test split (a sweep trial: `split="validation"`, so
    selection never sees the test rows); write the report, table and plot. `base_cache`: a folder
    where the base model's per-row table is reused (`_base_scores`; sweep trials), None = score it."""
    root = params.root
    adapter_dir = root / layout.ADAPTER
    base = models.resolve(params.model)
    peft_config = check_adapter(adapter_dir, base)  # fail before any scoring
    tokenizer = models.load_tokenizer(base, trust_remote_code=params.model.trust_remote_code)
    es = evalset.build(params, tokenizer, split)
    if params.preprocess.format == "classification" and len(es.label_names) < 2:
        raise DataError(f"{root / layout.report('preprocess')} lists {len(es.label_names)} label names; "
                        "classification needs at least two; re-run preprocess")
    device, dtype = devices.torch_placement(params.train)
    model = evalset.load_scoring_model(params, base, es.label_names, device, dtype)
    fingerprint = evalset.fingerprint(es, params, base.weights_sha256)
    base_scores = _base_scores(model, es, params, tokenizer, device, fingerprint, base_cache)
    model = attach_adapter(model, adapter_dir, base).to(device)
    adapter_scores = evalset.measure(model, es, params, tokenizer, device, "adapter")

    n_classes = max(len(es.label_names), 1)
    report = {
        "format": params.preprocess.format,
        "adapter_method": str(getattr(peft_config.peft_type, "value", peft_config.peft_type)),
        "base_model": base.spec,
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "split": split,
        "n_samples": len(es.rows),
        "fingerprint": fingerprint,
        "n_labeled": int((es.labels >= 0).sum()),
        "n_generated": len(es.gen_rows),
        "label_names": es.label_names,
        **summarise(base_scores.cols, adapter_scores.cols, n_classes, params),
        "bootstrap": params.evaluate.bootstrap.model_dump(),
    }
    predictions.write(root / layout.PREDICTIONS, es, base_scores, adapter_scores)
    _confusion_png(root / layout.CONFUSION_MATRIX, es, adapter_scores.cols.get("pred"), es.label_names)
    report_path = root / layout.report("evaluate")
    atomic.write_json(report_path, report)
    return EvaluateResult(base=report["base"], adapter=report["adapter"], lift=report["lift"],
                          n_samples=len(es.rows), label_names=tuple(es.label_names), report=str(report_path))
