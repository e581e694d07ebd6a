"""The HF Trainer side of the train stage: the Trainer subclass, its callbacks, the loop, its log.

tasks/train.py imports this module lazily (it imports torch and transformers at the top), once
it knows there is something to train.

Contract:
- `PeftflowTrainer`: a `transformers.Trainer` that raises TrainingError at once on a non-finite
  loss (naming the step; no adapter is written) and adds `tokens_per_second` to each logged step.
- `ManifestOnSave`: seals each saved checkpoint with MANIFEST.json (rank 0, after every rank has
  written its part); `AdaLoraBudget`: AdaLoRA reallocates its ranks after each optimizer step.
- `save_initial_adapter(model, folder)`: PiSSA/OLoRA's adapter before training (for the conversion
  of the trained one to plain LoRA), once per folder, atomically.
- `collator(tokenizer, classification)`: pads a batch (labels with -100 for a causal LM).
- `training_args(kwargs, world=, device=) -> TrainingArguments`: from tasks.train.training_arguments.
- `make_trainer(...)`: a PeftflowTrainer with the callbacks above (resets CUDA peak memory); its
  progress bar without the per-step dicts unless PEFTFLOW_VERBOSE=1 (`BarOnly`).
- `train_or_restore(trainer, model, resume, max_steps) -> Trained`: the loop, resumed from the
  checkpoint `resume`; or, when that checkpoint holds the last step, its weights loaded instead.
- `peak_memory(device) -> (bytes, kind)`: CUDA max allocated, or the process's max RSS on CPU.
- `write_log(path, log_history, fields) -> rows`, `write_loss_curve(path, rows)`: the loop's log as
  reports/train_log.csv and reports/loss_curve.png (atomically).
"""

from __future__ import annotations

import csv
import io
import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback

from tasks import atomic, checkpoints, distributed
from tasks.errors import TrainingError


class PeftflowTrainer(Trainer):
    """Trainer that stops on a non-finite loss at once and logs tokens/s per logging step."""

    _mark: tuple[float, int] | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._mark is None:
            self._mark = (time.perf_counter(), self.state.num_input_tokens_seen)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise TrainingError(
                f"non-finite loss ({loss.float().item()}) at step {self.state.global_step + 1} of "
                f"{self.state.max_steps} (train.learning_rate = {self.args.learning_rate}); lower the learning "
                f"rate, or check the data (a batch whose labels are all -100, e.g. responses cut off by "
                f"preprocess.max_length, has no loss). No adapter was written."
            )
        return loss

    def log(self, logs, start_time=None):
        if "loss" in logs and self._mark is not None:
            now, tokens = time.perf_counter(), self.state.num_input_tokens_seen
            logs["tokens_per_second"] = (tokens - self._mark[1]) / max(now - self._mark[0], 1e-9)
            self._mark = (now, tokens)
        super().log(logs, start_time)


class ManifestOnSave(TrainerCallback):
    """on_save runs after the Trainer has written the whole checkpoint: seal it with a manifest."""

    def on_save(self, args, state, control, **kwargs):
        rank, world = distributed.worker()
        if world > 1:  # every rank writes its own RNG state into the checkpoint: seal after all did
            torch.distributed.barrier()
        if rank == 0:
            checkpoints.write_manifest(Path(args.output_dir) / f"checkpoint-{state.global_step}")


class AdaLoraBudget(TrainerCallback):
    """AdaLoRA reallocates ranks from the gradients, between optimizer.step() and zero_grad()."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)


def save_initial_adapter(model, folder: Path) -> None:
    """PiSSA/OLoRA: keep the pre-training adapter so the final one can be converted to plain LoRA."""
    if folder.is_dir():
        return
    cfg = model.peft_config["default"]
    init = cfg.init_lora_weights
    cfg.init_lora_weights = True  # peft requires this marker on the initial adapter it converts against
    try:
        with atomic.directory(folder) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
    finally:
        cfg.init_lora_weights = init


def collator(tokenizer, classification: bool):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if classification:  # renames `label` -> `labels` and pads input_ids/attention_mask
        return DataCollatorWithPadding(tokenizer)
    # pads input_ids and attention_mask with the pad token, labels with -100
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)


def training_args(kwargs: dict, *, world: int, device: str):
    """`TrainingArguments(**kwargs)`, pinned to one GPU when `devices: 1` on a multi-GPU host."""
    from transformers import TrainingArguments

    args = TrainingArguments(**kwargs)
    if world == 1 and device == "cuda":
        # `devices: 1` means one GPU. On a host with several, the Trainer would otherwise wrap the
        # model in nn.DataParallel over all of them (its replica threads run outside bf16 autocast
        # and fail). The Trainer forces n_gpu the same way for model parallelism.
        _ = args.device  # settle the device set-up first: it assigns n_gpu
        args._n_gpu = 1
    return args


class BarOnly(ProgressCallback):
    """The Trainer's progress bar without the dict it prints at every logging step (those figures
    are in reports/train_log.csv and MLflow); PEFTFLOW_VERBOSE=1 keeps the dicts."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def make_trainer(model, tokenizer, data_collator, args, train_set, *, adalora: bool, device: str) -> PeftflowTrainer:
    """A PeftflowTrainer sealing its checkpoints (and updating AdaLoRA's budget when `adalora`)."""
    callbacks = [ManifestOnSave()] + ([AdaLoraBudget()] if adalora else [])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = PeftflowTrainer(model=model, args=args, train_dataset=train_set, data_collator=data_collator,
                              processing_class=tokenizer, callbacks=callbacks)
    if os.environ.get("PEFTFLOW_VERBOSE") != "1":
        for printer in (ProgressCallback, PrinterCallback):
            trainer.remove_callback(printer)
        trainer.add_callback(BarOnly)
    return trainer


@dataclass(frozen=True)
class Trained:
    """What the training loop (or the restore of a finished checkpoint) left."""

    state: Any  # transformers.TrainerState
    loop_seconds: float  # the loop alone, over the steps this process ran
    resumed_from_step: int | None
    tokens_before: int  # tokens seen before the resumed checkpoint (0 from scratch)


def train_or_restore(trainer: Trainer, model, resume: Path | None, max_steps: int) -> Trained:
    """Run the training loop (resuming from `resume`), or, when `resume` already holds the last
    step, load its adapter weights into `model` instead."""
    tokens_before, step = 0, None
    if resume is not None:  # read now: checkpoint rotation may delete `resume` during training
        tokens_before = json.loads((resume / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0)
        step = checkpoints.step_of(resume)
    if step is not None and step >= max_steps:
        # Killed after its last checkpoint was sealed: nothing is left to train, and Trainer
        # resumed at max_steps would take one step too many. The sealed checkpoint is the result.
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        from transformers import TrainerState

        set_peft_model_state_dict(model, load_file(str(resume / "adapter_model.safetensors")))
        return Trained(TrainerState.load_from_json(str(resume / "trainer_state.json")), 0.0, step, tokens_before)
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return Trained(trainer.state, output.metrics["train_runtime"], step, tokens_before)


def peak_memory(device: str) -> tuple[int, str]:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_max_rss"


def write_log(path: Path, log_history: list[dict], fields: tuple[str, ...]) -> list[dict]:
    """The logged steps of `log_history` as CSV rows of `fields` (written atomically to `path`)."""
    rows = [
        {k: entry.get(k, "") for k in fields}
        for entry in log_history if "loss" in entry and "step" in entry
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(path, buf.getvalue())
    return rows


def write_loss_curve(path: Path, rows: list[dict]) -> None:
    """A PNG plot of the rows' loss per step (atomically to `path`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set(xlabel="optimizer step", ylabel="training loss", title="Training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())
