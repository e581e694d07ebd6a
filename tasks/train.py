"""Stage `train`: fit a PEFT adapter on data/processed/ with the HF Trainer; resumable, deterministic.

Reads:  params `model`, `preprocess`, `train`; data/processed/ (splits, columns: see
        docs/architecture.md); reports/preprocess.json (`label_names`, classification only).
Writes: checkpoints/<fingerprint>/checkpoint-<step>/ (+ MANIFEST.json, written last),
        models/adapter/ (adapter safetensors + adapter_config.json + tokenizer, atomically),
        reports/train_log.csv, reports/loss_curve.png, and reports/train.json last.
Raises: ConfigError (a setting that cannot work here, e.g. device: cuda without a GPU),
        ModelError (QLoRA without CUDA or bitsandbytes, raised before any model is loaded),
        DataError (processed data missing or without the needed columns),
        TrainingError (a non-finite loss; names the step; no adapter is written).

Resume: a rerun after a crash continues from the newest checkpoint of the same fingerprint whose
manifest verifies (Trainer restores optimizer, scheduler, RNG and data position). A run whose
adapter and report already match the fingerprint is not retrained.

Several devices (`train.devices` > 1): `run` launches one process per device under torchrun
(tasks/distributed.py); each trains one share of every global batch (DDP; with `train.sharding:
fsdp` each also holds only a shard of the model, tasks/fsdp.py) and rank 0 alone writes the outputs
above.

Code: this module plans, keeps the books and writes the outputs (`fit` lists the steps);
tasks/trainers.py, imported lazily, holds the Trainer subclass, its callbacks and the loop.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks import atomic, checkpoints, devices, distributed, fsdp, layout, models, peft_methods, preference_train, processed
from tasks.adapters import adapter_sha256
from tasks.config import Params, TrainConfig
from tasks.errors import ConfigError, DataError, ModelError

LOG_FIELDS = ("step", "loss", "learning_rate", "grad_norm", "tokens_per_second")
INITIAL_ADAPTER = "initial-adapter"  # PiSSA/OLoRA: the adapter before training, for weight conversion


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: str
    fingerprint: str
    steps: int
    final_loss: float | None
    tokens_trained: int
    wall_seconds: float
    adapter_sha256: str
    resumed_from_step: int | None  # None: trained from scratch (or skipped)
    skipped: bool  # True: an up-to-date adapter existed, nothing was trained


def check_quantization(cfg: TrainConfig, device: str) -> None:
    """QLoRA needs CUDA and bitsandbytes; say so before any model is loaded."""
    if not cfg.peft.quantize_4bit:
        return
    if device != "cuda":
        raise ModelError("train.peft.quantize_4bit (QLoRA) needs a CUDA GPU and bitsandbytes; this run is on "
                         f"{device}. Set train.peft.quantize_4bit: false to train in full precision here.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError("train.peft.quantize_4bit (QLoRA) needs the bitsandbytes package: "
                         "`pip install bitsandbytes`, or set train.peft.quantize_4bit: false") from None


def load_processed(params: Params):
    """The processed train split and, for classification, its label names (None for a causal LM).

    Read through tasks/processed.py, the one reader of preprocess outputs (same errors everywhere)."""
    classification = params.preprocess.format == "classification"
    train_set = processed.read_split(params.root, "train", {"input_ids", "label" if classification else "labels"})
    if not classification:
        return train_set, None
    names = processed.label_names(params.root)
    if len(names) < 2:
        raise DataError(f"{layout.report('preprocess')} lists {len(names)} label name(s); classification needs "
                        f"at least two; {processed.REBUILD}")
    return train_set, names


def data_sha256(folder: Path) -> str:
    """Content hash of the processed data (arrow files + split/feature metadata)."""
    return checkpoints.combined_sha256(
        {k: v for k, v in checkpoints.tree_sha256(folder).items() if not k.endswith("state.json")}
    )


def _finished(params: Params, fp: str) -> dict | None:
    """The train report if models/adapter already holds the adapter for this fingerprint."""
    report, adapter = params.root / layout.report("train"), params.root / layout.ADAPTER
    try:
        done = json.loads(report.read_text())
    except (OSError, ValueError):
        return None
    if done.get("fingerprint") != fp or not adapter.is_dir():
        return None
    return done if adapter_sha256(adapter) == done.get("adapter_sha256") else None


@dataclass(frozen=True)
class Plan:
    """What this process trains, settled before any model is loaded (`plan`)."""

    device: str  # "cpu" | "cuda"
    dtype_name: str  # "fp32" | "bf16"
    base: models.BaseModel
    data: Any  # the processed train split (datasets.Dataset)
    label_names: list[str] | None  # None: causal LM; else the classification labels
    rank: int
    world: int
    fingerprint: str  # hash of every input of training: names checkpoints/<fingerprint>/
    run_dir: Path  # checkpoints/<fingerprint>/
    steps: int  # optimizer steps: train.max_steps, or what train.epochs come to over `data`
    init_adapter: Any = None  # preference_train.InitAdapter: `train.init_adapter` resolved, or None

    @property
    def classification(self) -> bool:
        return self.label_names is not None

    @property
    def task_type(self) -> str:
        return "SEQ_CLS" if self.classification else "CAUSAL_LM"


def run(params: Params) -> TrainResult | None:
    """Train (or resume, or skip) the adapter; see the module docstring for reads/writes/raises.

    With `train.devices` > 1 this process launches the workers (tasks/distributed.py) and returns
    what rank 0 reported; inside a worker, ranks other than 0 return None (rank 0 writes the outputs).
    """
    world = distributed.world_size(params.train, devices.resolve_device(params.train))
    if world > 1 and distributed.worker()[1] == 1:
        return _launch(params, world)
    from tasks import fastpath

    try:
        return fit(params)[0]
    finally:
        fastpath.undo_process_patches()  # the flow runs evaluate and merge next, in this process


def fit(params: Params):
    """`run` in this process, also returning the trained PeftModel (None when skipped), for checks.

    The steps, each a function below: plan -> already finished? -> housekeeping -> build model
    -> training arguments -> train or restore -> write outputs.
    """
    plan = make_plan(params)
    done = _finished(params, plan.fingerprint)
    if done is not None:
        return _result(params, done, skipped=True), None
    from tasks import trainers  # torch and transformers: only once there is something to train

    started = time.perf_counter()
    resume = housekeeping(params, plan)
    model, tokenizer, initial = build_model(params, plan)
    trainer, model = make_trainer(params, plan, model, tokenizer)  # its arguments: training_arguments()
    trained = trainers.train_or_restore(trainer, model, resume, plan.steps)
    weights = fsdp.full_adapter_state(model)  # sharded: every rank takes part in gathering the adapter
    if plan.rank != 0:  # the trained weights are identical on every rank; rank 0 writes them
        return None, model
    report = write_outputs(params, plan, model, tokenizer, initial, trained, started, weights=weights)
    return _result(params, report, skipped=False), model


def _result(params: Params, report: dict, *, skipped: bool) -> TrainResult:
    """The one way to build a TrainResult: from the fields of reports/train.json. A skipped run
    trained nothing here, so it took no time and resumed from nothing."""
    return TrainResult(str(params.root / layout.ADAPTER), report["fingerprint"], report["steps"],
                       report["final_loss"], report["tokens_trained"], 0.0 if skipped else report["wall_seconds"],
                       report["adapter_sha256"], None if skipped else report["resumed_from_step"], skipped=skipped)


def _launch(params: Params, world: int) -> TrainResult:
    """Train with `world` worker processes; the result is what rank 0 wrote (skipped when it left
    reports/train.json byte-identical)."""
    report_path = params.root / layout.report("train")
    before = report_path.read_bytes() if report_path.is_file() else None
    distributed.launch(params, world)
    raw = report_path.read_bytes()
    return _result(params, json.loads(raw), skipped=raw == before)


def make_plan(params: Params) -> Plan:
    """Device, precision, data, base model and fingerprint; raises ConfigError/ModelError/DataError
    before any model is loaded."""
    cfg = params.train
    device = devices.resolve_device(cfg)
    check_quantization(cfg, device)  # before any model or data is touched
    dtype_name = devices.resolve_precision(cfg, device)
    data, label_names = load_processed(params)
    base = models.resolve(params.model)
    rank, world = distributed.worker()
    if cfg.objective != "sft":
        preference_train.check_data(params, data, world)
    init = preference_train.resolve_init_adapter(params, base)
    fp = checkpoints.fingerprint({
        "init_adapter_sha256": init.sha256 if init else None,
        "world_size": world,  # summation order across processes shapes the last bits of the weights
        "model": params.model.model_dump(mode="json"),
        "preprocess": params.preprocess.model_dump(mode="json"),
        "train": cfg.model_dump(mode="json"),
        "base_weights": base.weights_sha256,
        "data": data_sha256(params.root / layout.PROCESSED),
        "device": device,
        "dtype": dtype_name,
    })
    return Plan(device, dtype_name, base, data, label_names, rank, world, fp,
                params.root / layout.CHECKPOINTS / fp, cfg.optimizer_steps(len(data), world), init)


def housekeeping(params: Params, plan: Plan) -> Path | None:
    """Delete stale temp folders and other fingerprints' checkpoints; return the checkpoint to
    resume from (the newest whose manifest verifies), if any."""
    root = params.root
    with distributed.exclusive(root / layout.CHECKPOINTS):  # several ranks: the first one deletes
        atomic.clean_stale((root / layout.ADAPTER).parent)
        checkpoints.prune_other_runs(root / layout.CHECKPOINTS, keep=plan.fingerprint)
        return checkpoints.latest_valid(plan.run_dir)


def build_model(params: Params, plan: Plan):
    """(PeftModel, tokenizer, initial adapter folder or None): the base model with the adapter of
    `train.peft` on it, seeded; ConfigError if the PEFT method does not fit the model."""
    import peft
    import torch
    from transformers import set_seed

    cfg = params.train
    load_kwargs = {}
    if cfg.peft.quantize_4bit:
        from transformers import BitsAndBytesConfig

        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    tokenizer = models.load_tokenizer(plan.base, params.model.trust_remote_code)
    set_seed(cfg.seed)  # adapter init is random: same seed, same initial adapter
    labels = plan.label_names
    model = models.load_model(plan.base, classification_labels=len(labels) if labels else None,
                              dtype=torch.bfloat16 if plan.dtype_name == "bf16" else torch.float32,
                              trust_remote_code=params.model.trust_remote_code, **load_kwargs)
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {n: i for i, n in enumerate(labels)}
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.peft.quantize_4bit:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    peft_config = peft_methods.build(cfg.peft, task_type=plan.task_type, max_steps=plan.steps,
                                     num_layers=getattr(model.config, "num_hidden_layers", None))
    try:
        model = (preference_train.attach_init_adapter(model, plan.init_adapter) if plan.init_adapter
                 else peft.get_peft_model(model, peft_config))
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(f"train.peft (method {cfg.peft.method!r}) does not fit {plan.base.spec}: {err}") from None
    for config in model.peft_config.values():
        # all-linear expands to a set, which adapter_config.json would list in per-process hash order
        for key in ("target_modules", "feedforward_modules"):
            if isinstance(getattr(config, key, None), set):
                setattr(config, key, sorted(getattr(config, key)))
    initial = None
    if peft_methods.needs_weight_conversion(cfg.peft):
        initial = plan.run_dir / INITIAL_ADAPTER
        from tasks import trainers

        with distributed.exclusive(params.root / layout.CHECKPOINTS):
            trainers.save_initial_adapter(model, initial)
    return model, tokenizer, initial


def training_arguments(cfg: TrainConfig, output_dir: Path, *, device: str, dtype_name: str, world: int,
                       extra: dict | None = None) -> dict:
    """The keyword arguments of `transformers.TrainingArguments` for `train:` (pure: no model, no
    torch). `extra` (the fast path's options) may add keywords but never overrides these.
    Raises ConfigError when the global batch does not split over `world` processes."""
    own = dict(
        output_dir=str(output_dir),
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,  # -1: num_train_epochs decides
        num_train_epochs=cfg.epochs if cfg.epochs is not None else 1.0,  # ignored when max_steps is set
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps(world),
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps < 1 else int(cfg.warmup_steps),
        max_grad_norm=cfg.max_grad_norm,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # transformers 5 renamed gradient_checkpointing* (the old names warn on every run); sharded,
        # FSDP checkpoints the layers itself (tasks/fsdp.py)
        activation_checkpointing=cfg.gradient_checkpointing and cfg.sharding == "none",
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,  # rotation happens before the newest manifest exists: keep one sealed fallback
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN must reach our check, not be averaged away
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,  # columns are selected before; `label` must never reach a causal LM
        eval_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        bf16=dtype_name == "bf16",
        dataloader_num_workers=0,
        **({"ddp_backend": "gloo"} if world > 1 and device == "cpu" else {}),
        # Every trainable (adapter) parameter gets a gradient each step; the Trainer's default
        # (True for models without gradient checkpointing) walks the autograd graph again per step.
        **({"ddp_find_unused_parameters": False} if world > 1 else {}),
        **fsdp.training_arguments(cfg, world),  # `train.sharding: fsdp`: FSDP2 instead of DDP
    )
    return {**(extra or {}), **own}


def make_trainer(params: Params, plan: Plan, model, tokenizer):
    """(PeftflowTrainer over the train split's model columns, model): the GPU-only fast path
    applied (packing, fused kernels; CUDA with `train.fast_path` on, never on CPU)."""
    from tasks import trainers

    cfg = params.train
    if cfg.objective != "sft":  # DPO through TRL: tasks/preference_train.py
        return preference_train.make_trainer(params, plan, model, tokenizer)
    collator, extra = trainers.collator(tokenizer, plan.classification), {}
    if plan.device == "cuda" and cfg.fast_path.enabled:
        from tasks import fastpath

        # compiled layers wrapped by fully_shard afterwards are untested: FSDP runs them eager
        options = cfg.fast_path.model_copy(update={"compile": False}) if cfg.sharding == "fsdp" else cfg.fast_path
        model, collator, extra = fastpath.prepare(model, collator, options)
    args = trainers.training_args(training_arguments(cfg, plan.run_dir, device=plan.device, dtype_name=plan.dtype_name,
                                                     world=plan.world, extra=extra), world=plan.world, device=plan.device)
    train_set = plan.data.select_columns(["input_ids", "label" if plan.classification else "labels"])
    with fsdp.trainer_construction(args):
        return trainers.make_trainer(model, tokenizer, collator, args, train_set, adalora=cfg.peft.method == "adalora",
                                     device=plan.device), model


def write_outputs(params: Params, plan: Plan, model, tokenizer, initial: Path | None, trained,
                  started: float, *, weights: dict | None = None) -> dict:
    """models/adapter/, reports/train_log.csv and loss_curve.png, then reports/train.json (last:
    it marks the run as finished); returns that report. `started`: perf_counter() at the start;
    `weights`: the adapter gathered from a sharded model (fsdp.full_adapter_state), else None."""
    from tasks import trainers

    root, state = params.root, trained.state
    adapter = root / layout.ADAPTER
    save_kwargs = {"path_initial_model_for_weight_conversion": str(initial)} if initial else {}
    with atomic.directory(adapter) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=weights, **save_kwargs)
        tokenizer.save_pretrained(tmp)
    rows = trainers.write_log(root / layout.TRAIN_LOG, state.log_history, LOG_FIELDS)
    if rows:
        trainers.write_loss_curve(root / layout.LOSS_CURVE, rows)
    wall = time.perf_counter() - started
    trainable, total = model.get_nb_trainable_parameters()
    peak, peak_kind = trainers.peak_memory(plan.device)
    tokens = int(state.num_input_tokens_seen)
    report = {
        "fingerprint": plan.fingerprint,
        "base_model": plan.base.spec,
        "base_weights_sha256": plan.base.weights_sha256,
        "method": params.train.peft.method,
        "task_type": plan.task_type,
        "steps": int(state.global_step),
        "final_loss": float(rows[-1]["loss"]) if rows else None,
        "tokens_trained": tokens,
        "tokens_per_second": (tokens - trained.tokens_before) / wall if wall > 0 else None,
        "trainable_params": int(trainable),
        "total_params": int(total),
        "wall_seconds": wall,
        "devices": plan.world,
        "device_hours": wall * plan.world / 3600,  # what a cost per device-hour is charged on
        # training loop only (no model load), over the steps this process ran
        "seconds_per_step": trained.loop_seconds / max(1, state.global_step - (trained.resumed_from_step or 0)),
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "device": plan.device,
        "dtype": plan.dtype_name,
        "resumed_from_step": trained.resumed_from_step,
        **preference_train.report_fields(params, plan),  # objective, init adapter
        "adapter_sha256": adapter_sha256(adapter),
    }
    atomic.write_json(root / layout.report("train"), report)
    return report
