"""Preference pairs in tests: a real project (tiny model) whose raw rows are prompt/chosen/rejected.

- `PAIR_OVERRIDES`: params for `preprocess.format: preference` + `train.objective: dpo` (tiny, CPU).
- `pair_rows(n)`: raw rows; the chosen reply names the review's sentiment, the rejected one the other.
- `preference_project(root, overrides, rows)`: make_project + data/raw/dataset.parquet + the real
  preprocess stage; returns the loaded Params.
- `assert_one_model_copy(params)`: the trainer of `train.objective` holds the base weights once plus
  the adapter (no reference copy, no `ref` adapter), and the reference pass TRL runs is the base.
"""

from __future__ import annotations

from pathlib import Path

from support.projects import NEGATIVE, POSITIVE, deep_merge, make_project
from tasks import layout
from tasks.config import Params, load_params

PAIR_OVERRIDES = {
    "preprocess": {"format": "preference", "text_fields": [], "label_field": None, "labels": {},
                   "max_length": 128, "split": {"group_by": None, "validation": 0.1, "test": 0.25}},
    "train": {"objective": "dpo", "fast_path": False, "beta": 0.5, "warmup_steps": 0, "lr_scheduler": "constant",
              "learning_rate": 5.0e-3},
    "evaluate": {"bootstrap": {"resamples": 200}, "generation_samples": 1},
    "register": {"primary_metric": "preference_accuracy", "guards": {}},  # no labels: f1_macro cannot guard
}


def pair_rows(n: int = 40) -> list[dict]:
    rows = []
    for k in range(n):
        good = k % 2 == 0
        text = (POSITIVE if good else NEGATIVE)[k // 2 % 5]
        right, wrong = ("positive", "negative") if good else ("negative", "positive")
        rows.append({"prompt": f"Review: {text} #{k}\nSentiment?", "chosen": f"It is {right}.",
                     "rejected": f"It is {wrong}."})
    return rows


def preference_project(root: Path, overrides: dict | None = None, rows: list[dict] | None = None) -> Params:
    import pandas as pd

    from tasks import preprocess

    make_project(root, deep_merge(PAIR_OVERRIDES, overrides or {}))
    (root / layout.RAW_DATA).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows if rows is not None else pair_rows()).to_parquet(root / layout.RAW_DATA)
    params = load_params(root / "params.yaml")
    preprocess.run(params)
    return params


def pair_source_project(root: Path, overrides: dict | None = None, rows: int = 40) -> Path:
    """make_project with PAIR_OVERRIDES and a local CSV of `pair_rows(rows)` as the ingest source."""
    import pandas as pd

    project = make_project(root, deep_merge(deep_merge(PAIR_OVERRIDES, {"ingest": {"source": "data/pairs.csv"}}),
                                            overrides or {}))
    (project / "data").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(pair_rows(rows)).to_csv(project / "data" / "pairs.csv", index=False)
    return project


def assert_one_model_copy(params: Params) -> None:
    import torch
    from trl.trainer.utils import use_adapter

    from tasks import models, train

    plan = train.make_plan(params)
    model, tokenizer, _ = train.build_model(params, plan)
    trainer, model = train.make_trainer(params, plan, model, tokenizer)
    assert getattr(trainer, "ref_model", None) is None and list(model.peft_config) == ["default"]  # `ref` removed
    base = models.load_model(plan.base)
    n_base = sum(p.numel() for p in base.parameters())
    trainable, total = model.get_nb_trainable_parameters()
    assert total == n_base + trainable  # base weights once, plus the adapter: no second model in memory
    assert sum(p.numel() for p in trainer.model.parameters()) == total
    with torch.no_grad():  # make the adapter non-trivial, then the reference pass must still be the base
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
        ids = torch.tensor([plan.data[0]["input_ids"]])
        with use_adapter(model, "ref" if "ref" in model.peft_config else None):  # as TRL's reference pass
            ref = model(input_ids=ids).logits
        assert torch.allclose(ref, base(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(model(input_ids=ids).logits, ref, atol=1e-3)
