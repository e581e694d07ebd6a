"""Preference objectives of the train stage (`train.objective: dpo`) through TRL, and `train.init_adapter`.

tasks/train.py plans, builds the PeftModel and writes the outputs as for SFT; this module adds:
- `resolve_init_adapter(params, base) -> InitAdapter | None`: `train.init_adapter` as a local
  folder with its digest: a folder of the project, or a `models:/` URI of this project's
  registry, downloaded and hash-checked (tasks/registry.py). ModelError when it does not fit the base.
- `attach_init_adapter(model, init) -> PeftModel`: the base with that adapter on it, trainable.
- `check_data(params, data, world)`: the processed split holds preference columns; one process.
- `make_trainer(params, plan, model, tokenizer) -> (trainer, model)`: a TRL `DPOTrainer` over the
  pre-tokenised pairs, with the SFT trainer's NaN check, tokens/s log and sealed checkpoints, so
  resume (tasks/trainers.train_or_restore) and the outputs are the same as for SFT.
- `report_fields(params, plan) -> dict`: what reports/train.json records (objective, beta, init adapter).

The reference model is the base with the adapter off: one model in memory. TRL (1.16,
trainer/dpo_trainer.py) handed a PeftModel and `ref_model=None` keeps `ref_model` None and adds a
frozen copy of the adapter named `ref`, which it uses for the reference pass when it exists
and otherwise disables the adapters (`use_adapter(model, None)` -> `model.disable_adapter()`).
The copy is removed here before training. A fresh LoRA has B = 0, so base and the copy agree;
with `init_adapter` the reference stays the base (not the starting adapter), the same reference
evaluate uses for the implied reward (tasks/preference_eval.py). The copy would also be saved
beside the adapter in every checkpoint.

Data: tasks/preference.py tokenised the pairs (chat template, truncation that never cuts a
response); TRL's own tokenisation is skipped (`_prepare_dataset`) and its collator does not
truncate (`max_length=None`), so training sees exactly the rows evaluate scores.
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
    """DataError when the processed split lacks the pair columns; ConfigError for several processes."""
    missing = [c for c in COLUMNS if c not in data.column_names]
    if missing:
        raise DataError(f"data/processed/train has no {missing} columns: train.objective "
                        f"{params.train.objective!r} needs preprocess.format: preference; {processed.REBUILD}")
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


def _trainer_class():
    from trl import DPOTrainer

    from tasks import trainers

    class PreferenceTrainer(trainers.PeftflowTrainer, DPOTrainer):
        """DPOTrainer with the SFT trainer's NaN stop and tokens/s (PeftflowTrainer comes first in the MRO)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # tokenised by preprocess (tasks/preference.py)

    return PreferenceTrainer


def dpo_config(kwargs: dict, params: Params, device: str):
    """`trl.DPOConfig` from tasks.train.training_arguments' keywords plus the DPO settings."""
    from trl import DPOConfig

    cfg = params.train
    args = DPOConfig(**kwargs, beta=cfg.beta, loss_type=["sigmoid"], max_length=None, pad_to_multiple_of=None,
                     gradient_checkpointing=cfg.gradient_checkpointing, precompute_ref_log_probs=False,
                     disable_dropout=True)
    if device == "cuda":  # one GPU even on a multi-GPU host (see tasks/trainers.training_args)
        _ = args.device
        args._n_gpu = 1
    return args


def make_trainer(params: Params, plan, model, tokenizer):
    """(PreferenceTrainer over the pairs, the PeftModel it trains); see the module docstring."""
    import os

    from transformers import PrinterCallback, ProgressCallback

    from tasks import trainers
    from tasks.train import training_arguments

    cfg = params.train
    kwargs = training_arguments(cfg, plan.run_dir, device=plan.device, dtype_name=plan.dtype_name, world=plan.world)
    for key in ("activation_checkpointing", "activation_checkpointing_kwargs"):  # DPOConfig's own name below
        kwargs.pop(key)
    if plan.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    trainer = _trainer_class()(model=model, ref_model=None, args=dpo_config(kwargs, params, plan.device),
                               train_dataset=plan.data.select_columns(list(COLUMNS)), processing_class=tokenizer,
                               callbacks=[trainers.ManifestOnSave()]
                               + ([trainers.AdaLoraBudget()] if cfg.peft.method == "adalora" else []))
    if "ref" in model.peft_config:  # TRL's frozen adapter copy: the reference is the base (docstring)
        model.delete_adapter("ref")
    model.set_adapter("default")
    if os.environ.get("PEFTFLOW_VERBOSE") != "1":  # as tasks/trainers.make_trainer
        for printer in (ProgressCallback, PrinterCallback):
            trainer.remove_callback(printer)
        trainer.add_callback(trainers.BarOnly)
    return trainer, model
