"""Real adapters for tests.

- `make_trained_project(root)`: a real project whose train/evaluate outputs exist: a random:tiny
  LoRA adapter with non-zero lora_B (so it changes the logits) and small real reports (400-row
  per-row evaluation table). Used by the MLflow/registry/serving tests.
- `build_adapter(params, seed)`, `logits(model, tokenizer)`: that adapter in memory, and its logits.
- `make_adapter(params, method, scale, seed)`: a seeded random adapter (LoRA or prompt tuning) for
  the project's own base and task, saved at models/adapter (evaluate and merge tests).
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from support.projects import make_project
from tasks import atomic, layout, models
from tasks.adapters import adapter_sha256
from tasks.config import Params, load_params

PROMPTS = ["Review: a fine film\nIs this review positive or negative?", "Review: dull\nIs it good?", "hello world"]


def build_adapter(params, seed: int):
    """A LoRA PeftModel on the base of `params` with seeded random lora_B (fp32, eval mode)."""
    from peft import LoraConfig, get_peft_model

    base = models.resolve(params.model)
    model = models.load_model(base)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return peft_model.eval(), models.load_tokenizer(base)


def logits(model, tokenizer, prompts=PROMPTS) -> torch.Tensor:
    """Last-position-aligned logits of each prompt (one forward per prompt: no padding effects)."""
    with torch.no_grad():
        return torch.cat([model(**tokenizer(p, return_tensors="pt")).logits[0] for p in prompts])


N_ROWS = 400
LABELS = np.arange(N_ROWS) % 2  # balanced: the majority label scores 0.5, as the base does
ERROR_ORDER = np.random.default_rng(0).permutation(N_ROWS)  # errors fall on a fixed row order


def predicted(accuracy: float) -> np.ndarray:
    """Predictions right on all but the first (1 - accuracy) * N rows of ERROR_ORDER: a more
    accurate table is right wherever a less accurate one is (so paired differences are clear)."""
    pred = LABELS.copy()
    wrong = ERROR_ORDER[: round((1 - accuracy) * N_ROWS)]
    pred[wrong] = 1 - pred[wrong]
    return pred


def write_evaluation(root: Path, accuracy: float) -> None:
    """reports/evaluate.json + a per-row reports/predictions.csv (tasks/predictions.py) for 400
    test rows: base 50% accurate, the adapter `accuracy`. The fingerprint is
    the same for every fixture project, as for evaluations of the same rows."""
    from tasks import metrics

    base, adapter = predicted(0.5), predicted(accuracy)
    rows = {"row": range(N_ROWS), "prompt": [f"review {k}" for k in range(N_ROWS)],
            "reference": ["positive" if y else "negative" for y in LABELS], "base_output": "", "adapter_output": "",
            "label": LABELS, "majority": np.ones(N_ROWS, dtype=np.int64), "base.pred": base, "adapter.pred": adapter}
    pd.DataFrame(rows).to_csv(root / layout.PREDICTIONS, index=False)
    scores = {w: {"accuracy": metrics.accuracy(LABELS, p), "f1_macro": metrics.f1_macro(LABELS, p, 2)}
              for w, p in (("base", base), ("adapter", adapter))}
    atomic.write_json(root / layout.report("evaluate"), {
        **scores, "lift": {k: scores["adapter"][k] - scores["base"][k] for k in scores["base"]},
        "fingerprint": "fixture-evaluation", "n_samples": N_ROWS})


def make_trained_project(root: Path, *, seed: int = 1, accuracy: float = 0.7,
                         overrides: dict | None = None):
    """Project at `root` with models/adapter/ and reports/{ingest,preprocess,train,evaluate}.json,
    train_log.csv, predictions.csv. Returns (params, peft_model, tokenizer)."""
    make_project(root, overrides)
    params = load_params(root / "params.yaml")
    model, tok = build_adapter(params, seed)
    adapter = root / layout.ADAPTER
    with atomic.directory(adapter) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    raw = root / layout.RAW_DATA
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_bytes(b"text,category\nfine,fresh\ndull,rotten\n")
    md5 = hashlib.md5(raw.read_bytes()).hexdigest()
    reports = root / layout.REPORTS
    atomic.write_json(reports / "ingest.json", {"source": "embedded:rotten_tomatoes", "md5": md5, "rows": 2})
    atomic.write_json(reports / "preprocess.json", {"label_names": ["negative", "positive"]})
    atomic.write_json(reports / "train.json", {
        "adapter_sha256": adapter_sha256(adapter), "fingerprint": f"fp-{seed}", "tokens_trained": 4096,
        "wall_seconds": 12.5, "device": "cpu", "final_loss": 2.25, "steps": 4})
    with open(root / layout.TRAIN_LOG, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "learning_rate", "grad_norm", "tokens_per_second"])
        for step in range(1, 5):
            w.writerow([step, 3.0 - 0.2 * step, 1e-3, 0.5, 1000.0 + step])
    write_evaluation(root, accuracy)
    return params, model, tok


def make_adapter(params: Params, method: str = "lora", scale: float = 0.5, seed: int = 1,
                 target: Path | None = None) -> Path:
    """Save a real adapter for the project's base model at models/adapter (or `target`)."""
    from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model

    base = models.resolve(params.model)
    classification = params.preprocess.format == "classification"
    labels = len(json.loads((params.root / layout.report("preprocess")).read_text())["label_names"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = models.load_model(base, classification_labels=labels if classification else None)
        task = TaskType.SEQ_CLS if classification else TaskType.CAUSAL_LM
        if method == "lora":
            config = LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules="all-linear")
        else:
            config = PromptTuningConfig(task_type=task, num_virtual_tokens=4)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * scale)
    target = target or params.root / layout.ADAPTER
    peft_model.save_pretrained(str(target), safe_serialization=True)
    models.load_tokenizer(base).save_pretrained(str(target))
    return target
