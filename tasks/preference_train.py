"""Preference objectives of the train stage (`train.objective: dpo | orpo | kto`) through TRL, and
`train.init_adapter`.

tasks/train.py plans, builds the PeftModel and writes the outputs as for SFT; this module adds:
- `resolve_init_adapter(params, base) -> InitAdapter | None`: `train.init_adapter` as a local
  folder with its digest: a folder of the project, or a `models:/` URI of this project's
  registry, downloaded and hash-checked (tasks/registry.py). ModelError when it does not fit the base.
- `attach_init_adapter(model, init) -> PeftModel`: the base with that adapter on it, trainable.
- `check_data(params, data, world)`: the processed split holds the columns the objective trains
  on (pairs; KTO also unpaired rows); one process.
- `make_trainer(params, plan, model, tokenizer) -> (trainer, model)`: the objective's TRL trainer
  (tasks/preference_trl.py) over the pre-tokenised rows, with the SFT trainer's NaN check,
  tokens/s log and sealed checkpoints, so resume (tasks/trainers.train_or_restore) and the
  outputs are the same as for SFT.
- `report_fields(params, plan) -> dict`: what reports/train.json records (objective, beta, init adapter).

DPO and KTO: the reference model is the base with the adapter off: one model in memory. TRL
(1.16, trainer/dpo_trainer.py and trainer/kto_trainer.py) handed a PeftModel and
`ref_model=None` keeps `ref_model` None and adds a frozen copy of the adapter named `ref`, which
it uses for the reference pass when it exists and otherwise disables the adapters
(`use_adapter(model, None)` -> `model.disable_adapter()`). The copy is removed here before
training. A fresh LoRA has B = 0, so base and the copy agree; with `init_adapter` the reference
stays the base (not the starting adapter), the same reference evaluate uses for the implied
reward (tasks/preference_eval.py). The copy would also be saved beside the adapter in every
checkpoint. ORPO has no reference model at all (its loss is reference-free): no reference pass.

Data: tasks/preference.py tokenised the rows (chat template, truncation that never cuts a
response); TRL's own tokenisation is skipped and nothing truncates again (tasks/preference_trl.py),
so training sees exactly the rows evaluate scores.
"""

from __future__ import annotations

import importlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tasks import models, processed
from tasks.adapters import adapter_sha256, check_adapter
from tasks.config import Params
from tasks.errors import ConfigError, DataError

COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


@dataclass(frozen=True)
class InitAdapter:
    spec: str  # train.init_adapter as written
    folder: Path
    sha256: str


def resolve_init_adapter(params: Params, base: models.BaseModel) -> InitAdapter | None:
    spec = params.train.init_adapter
    if spec is None:
        return None
    if spec.startswith("models:/"):
        # Imported by name, so the registry (MLflow client, `register:` params) is not a DVC code
        # dep of train: what trains is the downloaded adapter's bytes, hash-checked and in the
        # fingerprint; a registry-code or gate-settings change must not rerun training.
        registry = importlib.import_module("tasks.registry")
        registry.parse_model_uri(spec)  # ConfigError for a malformed URI, before any download
        folder, _ = registry.download_adapter(spec, params, Path(tempfile.mkdtemp(prefix="peftflow-init-")))
    else:
        folder = (params.root / spec).resolve()
        if not folder.is_dir():
            raise ConfigError(f"train.init_adapter = {spec!r}: no such folder ({folder}); give an adapter folder "
                              "or models:/<name>@<alias>")
    check_adapter(folder, base)  # ModelError: no adapter there, or one trained on another base
    return InitAdapter(spec, folder, adapter_sha256(folder))


def attach_init_adapter(model, init: InitAdapter):
    """The base `model` with the adapter of `init` on it, its weights trainable (name `default`)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(init.folder), is_trainable=True)


def check_data(params: Params, data, world: int) -> None:
    """DataError when the processed split lacks the columns of the objective (pairs; for KTO pairs or
    unpaired completion + label rows); ConfigError for several processes."""
    objective, names = params.train.objective, set(data.column_names)
    if objective == "kto" and {"prompt_ids", "completion_ids", "kto_label"} <= names:
        missing = []
    elif "completion_ids" in names:
        raise DataError(f"data/processed/train holds unpaired rows (completion + label): train.objective "
                        f"{objective!r} needs chosen/rejected pairs; set train.objective: kto, or give pairs")
    else:
        missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise DataError(f"data/processed/train has no {missing} columns: train.objective "
                        f"{objective!r} needs preprocess.format: preference; {processed.REBUILD}")
    if world > 1:
        raise ConfigError(f"train.objective {params.train.objective!r} trains on one device here; set "
                          f"train.devices: 1 (it resolved to {world})")


def report_fields(params: Params, plan) -> dict:
    init = getattr(plan, "init_adapter", None)
    fields = {"objective": params.train.objective, "init_adapter": init.spec if init else None,
              "init_adapter_sha256": init.sha256 if init else None}
    if params.train.objective != "sft":
        fields["beta"] = params.train.beta
    return fields


def make_trainer(params: Params, plan, model, tokenizer):
    """(PreferenceTrainer over the pairs, the PeftModel it trains); see the module docstring."""
    import os

    from transformers import PrinterCallback, ProgressCallback

    from tasks import preference_trl, trainers
    from tasks.train import training_arguments

    cfg = params.train
    kwargs = training_arguments(cfg, plan.run_dir, device=plan.device, dtype_name=plan.dtype_name, world=plan.world)
    for key in ("activation_checkpointing", "activation_checkpointing_kwargs"):  # TRL configs' own name instead
        kwargs.pop(key)
    if plan.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    cls, args = preference_trl.trainer_and_args(cfg.objective, kwargs, params, plan.device)
    columns = preference_trl.UNPAIRED_COLUMNS if "completion_ids" in plan.data.column_names else COLUMNS
    rows = plan.data.select_columns(list(columns))
    rows = preference_trl.in_memory(rows) if cfg.objective == "orpo" else rows  # ORPO maps it: no cache files
    trainer = cls(model=model, args=args, train_dataset=rows,
                  processing_class=tokenizer, callbacks=[trainers.ManifestOnSave()]
                  + ([trainers.AdaLoraBudget()] if cfg.peft.method == "adalora" else []),
                  **({} if cfg.objective == "orpo" else {"ref_model": None}))  # ORPO has no reference model
    if "ref" in model.peft_config:  # DPO/KTO: TRL's frozen adapter copy; the reference is the base (docstring)
        model.delete_adapter("ref")
    model.set_adapter("default")
    if os.environ.get("PEFTFLOW_VERBOSE") != "1":  # as tasks/trainers.make_trainer
        for printer in (ProgressCallback, PrinterCallback):
            trainer.remove_callback(printer)
        trainer.add_callback(trainers.BarOnly)
    return trainer, model
