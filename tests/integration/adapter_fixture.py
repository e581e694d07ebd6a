"""A real project whose train/evaluate outputs exist: a random:tiny LoRA adapter with non-zero
lora_B (so it changes the logits) and small real reports. Used by the MLflow/registry tests."""

from __future__ import annotations

import csv
import hashlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_project  # noqa: E402

from tasks import atomic, layout, models  # noqa: E402
from tasks.config import load_params  # noqa: E402
from tasks.adapters import adapter_sha256  # noqa: E402

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


def make_trained_project(root: Path, *, seed: int = 1, accuracy: float = 0.7, f1: float = 0.65,
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
    base_metrics = {"accuracy": 0.5, "f1_macro": 0.4}
    adapter_metrics = {"accuracy": accuracy, "f1_macro": f1}
    atomic.write_json(reports / "evaluate.json", {
        "base": base_metrics, "adapter": adapter_metrics,
        "lift": {k: adapter_metrics[k] - base_metrics[k] for k in base_metrics}})
    with open(root / layout.TRAIN_LOG, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "learning_rate", "grad_norm", "tokens_per_second"])
        for step in range(1, 5):
            w.writerow([step, 3.0 - 0.2 * step, 1e-3, 0.5, 1000.0 + step])
    (root / layout.PREDICTIONS).write_text("prompt,target,prediction\nfine,positive,positive\n")
    return params, model, tok
