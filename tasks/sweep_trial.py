"""Training inside a sweep trial: the train stage's own steps, plus the validation loss reported to
Optuna during training so its median pruner can stop a hopeless trial early.

Contract:
- `train(params, trial)`: what `tasks.train.fit` does for one process (plan, housekeeping, model,
  Trainer, train, outputs; the same functions of tasks/train.py, so a trial trains exactly as the
  stage does), with one extra Trainer callback when `sweep.pruner.enabled`: every
  `sweep.pruner.interval_steps` optimizer steps it computes the loss of the adapter on the first
  `sweep.pruner.max_samples` rows of the validation split and calls `trial.report(value, step)`;
  when `trial.should_prune()` it raises `optuna.TrialPruned` (no adapter is written).
  `value` is the validation loss for a `minimize` study and minus the loss for a `maximize` one,
  so "worse" means "higher loss" for Optuna's median pruner either way.
  With `train.devices` > 1 the trial runs `tasks.train.run` (several processes) without pruning.
- `validation_loss(model, batches) -> float`: mean loss per supervised token (per row for a
  classification head), in eval mode, no gradient; the model's mode is restored.
The evaluation draws no random numbers, so the trained weights equal those of an unpruned run.
"""

from __future__ import annotations

import time

from tasks import devices, distributed, processed, train as stage
from tasks.config import Params


def validation_loss(model, batches) -> float:
    import torch

    was_training = model.training
    model.eval()
    total, weight = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(model.device) for k, v in batch.items()}
                loss = float(model(**batch).loss)
                labels = batch["labels"]
                n = int((labels[:, 1:] != -100).sum()) if labels.dim() > 1 else int(labels.shape[0])
                total, weight = total + loss * n, weight + n
    finally:
        model.train(was_training)
    return total / max(weight, 1)


def _batches(params: Params, tokenizer, classification: bool) -> list:
    from tasks import trainers

    cfg = params.sweep.pruner
    column = "label" if classification else "labels"
    rows = processed.read_split(params.root, "validation", {"input_ids", column})
    rows = rows.select(range(min(len(rows), cfg.max_samples))).select_columns(["input_ids", column])
    collate = trainers.collator(tokenizer, classification)
    size = params.train.micro_batch_size
    items = list(rows)
    return [collate(items[i:i + size]) for i in range(0, len(items), size)]


def _callback(params: Params, trial, batches):
    import optuna
    from transformers import TrainerCallback

    every, sign = params.sweep.pruner.interval_steps, 1.0 if params.sweep.objective.direction == "minimize" else -1.0

    class ReportValidationLoss(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every:
                return
            trial.report(sign * validation_loss(model, batches), state.global_step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation loss at step {state.global_step} is worse than the median")

    return ReportValidationLoss()


def train(params: Params, trial) -> None:
    """See the module docstring."""
    world = distributed.world_size(params.train, devices.resolve_device(params.train))
    if world > 1 or not params.sweep.pruner.enabled:
        stage.run(params)
        return
    from tasks import fastpath, trainers

    started = time.perf_counter()
    plan = stage.make_plan(params)
    resume = stage.housekeeping(params, plan)
    model, tokenizer, initial = stage.build_model(params, plan)
    trainer, model = stage.make_trainer(params, plan, model, tokenizer)
    trainer.add_callback(_callback(params, trial, _batches(params, tokenizer, plan.classification)))
    try:
        trained = trainers.train_or_restore(trainer, model, resume, plan.steps)
        stage.write_outputs(params, plan, model, tokenizer, initial, trained, started)
    finally:
        fastpath.undo_process_patches()  # as the stage does: the next trial runs in this process
