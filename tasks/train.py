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
(tasks/distributed.py); each trains one share of every global batch (DDP) and rank 0 alone
writes the outputs above.
"""

from __future__ import annotations

import csv
import io
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

from tasks import atomic, checkpoints, distributed, layout, models, peft_methods
from tasks.adapters import adapter_sha256
from tasks.config import Params, TrainConfig
from tasks.errors import ConfigError, DataError, ModelError, TrainingError

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


def resolve_device(cfg: TrainConfig) -> str:
    """`train.device` -> "cpu" or "cuda"; ConfigError if CUDA is asked for but absent."""
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA GPU is visible; set train.device: auto or cpu")
    return cfg.device


def resolve_dtype(cfg: TrainConfig, device: str) -> str:
    """`train.precision` -> "bf16" or "fp32" (auto: bf16 on CUDA, fp32 on CPU)."""
    if cfg.precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return cfg.precision


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
    """The processed DatasetDict and, for classification, its label names."""
    from datasets import load_from_disk

    folder = params.root / layout.PROCESSED
    if not folder.is_dir():
        raise DataError(f"{layout.PROCESSED} is missing; run `python -m tasks preprocess` first")
    data = load_from_disk(str(folder))
    if "train" not in data or len(data["train"]) == 0:
        raise DataError(f"{layout.PROCESSED} has no (or an empty) 'train' split; rerun preprocess")
    classification = params.preprocess.format == "classification"
    needed = {"input_ids", "label"} if classification else {"input_ids", "labels"}
    missing = needed - set(data["train"].column_names)
    if missing:
        raise DataError(f"{layout.PROCESSED}/train lacks column(s) {sorted(missing)} needed for "
                        f"preprocess.format '{params.preprocess.format}'; rerun preprocess")
    label_names = None
    if classification:
        report = params.root / layout.report("preprocess")
        try:
            label_names = json.loads(report.read_text())["label_names"]
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"{report} with 'label_names' is needed for classification ({err}); rerun preprocess") \
                from None
    return data, label_names


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


def _trainer_class():
    import torch
    from transformers import Trainer, TrainerCallback

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
                    f"{self.args.max_steps} (train.learning_rate = {self.args.learning_rate}); lower the learning "
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

    return PeftflowTrainer, ManifestOnSave, AdaLoraBudget


def _collator(tokenizer, classification: bool):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if classification:  # renames `label` -> `labels` and pads input_ids/attention_mask
        return DataCollatorWithPadding(tokenizer)
    # pads input_ids and attention_mask with the pad token, labels with -100
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)


def _save_initial_adapter(model, folder: Path) -> None:
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


def _write_log(path: Path, log_history: list[dict]) -> list[dict]:
    rows = [
        {k: entry.get(k, "") for k in LOG_FIELDS}
        for entry in log_history if "loss" in entry and "step" in entry
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(path, buf.getvalue())
    return rows


def _write_loss_curve(path: Path, rows: list[dict]) -> None:
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


def _peak_memory(device: str) -> tuple[int, str]:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_max_rss"


def run(params: Params) -> TrainResult | None:
    """Train (or resume, or skip) the adapter; see the module docstring for reads/writes/raises.

    With `train.devices` > 1 this process launches the workers (tasks/distributed.py) and returns
    what rank 0 reported; inside a worker, ranks other than 0 return None (rank 0 writes the outputs).
    """
    world = distributed.world_size(params.train, resolve_device(params.train))
    if world > 1 and distributed.worker()[1] == 1:
        report_path = params.root / layout.report("train")
        before = report_path.read_bytes() if report_path.is_file() else None
        distributed.launch(params, world)
        raw = report_path.read_bytes()
        done = json.loads(raw)
        return TrainResult(str(params.root / layout.ADAPTER), done["fingerprint"], done["steps"], done["final_loss"],
                           done["tokens_trained"], done["wall_seconds"], done["adapter_sha256"],
                           done["resumed_from_step"], skipped=raw == before)
    from tasks import fastpath

    try:
        return fit(params)[0]
    finally:
        fastpath.undo_process_patches()  # the flow runs evaluate and merge next, in this process


def fit(params: Params):
    """`run`, also returning the trained PeftModel in memory (None when skipped), for checks."""
    cfg, root = params.train, params.root
    device = resolve_device(cfg)
    check_quantization(cfg, device)  # before any model or data is touched
    dtype_name = resolve_dtype(cfg, device)
    data, label_names = load_processed(params)
    classification = label_names is not None
    base = models.resolve(params.model)

    rank, world = distributed.worker()
    fp = checkpoints.fingerprint({
        "world_size": world,  # summation order across processes shapes the last bits of the weights
        "model": params.model.model_dump(mode="json"),
        "preprocess": params.preprocess.model_dump(mode="json"),
        "train": cfg.model_dump(mode="json"),
        "base_weights": base.weights_sha256,
        "data": data_sha256(root / layout.PROCESSED),
        "device": device,
        "dtype": dtype_name,
    })
    done = _finished(params, fp)
    if done is not None:
        return TrainResult(str(root / layout.ADAPTER), fp, done["steps"], done["final_loss"], done["tokens_trained"],
                           0.0, done["adapter_sha256"], None, skipped=True), None

    import peft
    import torch
    from transformers import TrainingArguments, set_seed

    started = time.perf_counter()
    run_dir = root / layout.CHECKPOINTS / fp
    with distributed.exclusive(root / layout.CHECKPOINTS):  # several ranks: the first one deletes
        atomic.clean_stale((root / layout.ADAPTER).parent)
        checkpoints.prune_other_runs(root / layout.CHECKPOINTS, keep=fp)
        resume = checkpoints.latest_valid(run_dir)

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    load_kwargs = {}
    if cfg.peft.quantize_4bit:
        from transformers import BitsAndBytesConfig

        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    tokenizer = models.load_tokenizer(base, params.model.trust_remote_code)
    set_seed(cfg.seed)  # adapter init is random: same seed, same initial adapter
    model = models.load_model(base, classification_labels=len(label_names) if classification else None, dtype=dtype,
                              trust_remote_code=params.model.trust_remote_code, **load_kwargs)
    if classification:
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {n: i for i, n in enumerate(label_names)}
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.peft.quantize_4bit:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    peft_config = peft_methods.build(cfg.peft, task_type="SEQ_CLS" if classification else "CAUSAL_LM",
                                     max_steps=cfg.max_steps,
                                     num_layers=getattr(model.config, "num_hidden_layers", None))
    try:
        model = peft.get_peft_model(model, peft_config)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(f"train.peft (method {cfg.peft.method!r}) does not fit {base.spec}: {err}") from None
    for config in model.peft_config.values():
        # all-linear expands to a set, which adapter_config.json would list in per-process hash order
        for key in ("target_modules", "feedforward_modules"):
            if isinstance(getattr(config, key, None), set):
                setattr(config, key, sorted(getattr(config, key)))
    initial = None
    if peft_methods.needs_weight_conversion(cfg.peft):
        initial = run_dir / INITIAL_ADAPTER
        with distributed.exclusive(root / layout.CHECKPOINTS):
            _save_initial_adapter(model, initial)

    keep = ["input_ids", "label"] if classification else ["input_ids", "labels"]
    train_set = data["train"].select_columns(keep)
    collator = _collator(tokenizer, classification)
    extra_args: dict = {}
    if device == "cuda" and cfg.fast_path.enabled:
        from tasks import fastpath  # GPU-only speed-ups (packing, fused kernels); never taken on CPU

        model, collator, extra_args = fastpath.prepare(model, collator, cfg.fast_path)

    warmup = cfg.warmup_steps if cfg.warmup_steps < 1 else int(cfg.warmup_steps)
    own_args = dict(
        output_dir=str(run_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps(world),
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=warmup,
        max_grad_norm=cfg.max_grad_norm,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        data_seed=cfg.seed,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,  # rotation happens before the newest manifest exists: keep one sealed fallback
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN must reach our check, not be averaged away
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,  # columns were selected above; `label` must never reach a causal LM
        eval_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        bf16=dtype_name == "bf16",
        dataloader_num_workers=0,
        **({"ddp_backend": "gloo"} if world > 1 and device == "cpu" else {}),
        # Every trainable (adapter) parameter gets a gradient each step; the Trainer's default
        # (True for models without gradient checkpointing) walks the autograd graph again per step.
        **({"ddp_find_unused_parameters": False} if world > 1 else {}),
    )
    args = TrainingArguments(**{**extra_args, **own_args})  # the fast path adds options; it never overrides ours
    if world == 1 and device == "cuda":
        # `devices: 1` means one GPU. On a host with several, the Trainer would otherwise wrap the
        # model in nn.DataParallel over all of them (its replica threads run outside bf16 autocast
        # and fail). The Trainer forces n_gpu the same way for model parallelism.
        _ = args.device  # settle the device set-up first: it assigns n_gpu
        args._n_gpu = 1
    trainer_cls, manifest_cb, adalora_cb = _trainer_class()
    callbacks = [manifest_cb()] + ([adalora_cb()] if cfg.peft.method == "adalora" else [])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = trainer_cls(model=model, args=args, train_dataset=train_set, data_collator=collator,
                          processing_class=tokenizer, callbacks=callbacks)
    tokens_before = 0
    if resume is not None:
        tokens_before = json.loads((resume / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0)
    if resume is not None and checkpoints.step_of(resume) >= cfg.max_steps:
        # Killed after its last checkpoint was sealed: nothing is left to train, and Trainer
        # resumed at max_steps would take one step too many. The sealed checkpoint is the result.
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        from transformers import TrainerState

        set_peft_model_state_dict(model, load_file(str(resume / "adapter_model.safetensors")))
        state = TrainerState.load_from_json(str(resume / "trainer_state.json"))
        loop_seconds = 0.0
    else:
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        state = trainer.state
        loop_seconds = output.metrics["train_runtime"]
    if rank != 0:  # the trained weights are identical on every rank; rank 0 writes them
        return None, model

    adapter = root / layout.ADAPTER
    save_kwargs = {"path_initial_model_for_weight_conversion": str(initial)} if initial else {}
    with atomic.directory(adapter) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **save_kwargs)
        tokenizer.save_pretrained(tmp)
    rows = _write_log(root / layout.TRAIN_LOG, state.log_history)
    if rows:
        _write_loss_curve(root / layout.LOSS_CURVE, rows)

    wall = time.perf_counter() - started
    trainable, total = model.get_nb_trainable_parameters()
    peak, peak_kind = _peak_memory(device)
    tokens = int(state.num_input_tokens_seen)
    final_loss = float(rows[-1]["loss"]) if rows else None
    digest = adapter_sha256(adapter)
    report = {
        "fingerprint": fp,
        "base_model": base.spec,
        "base_weights_sha256": base.weights_sha256,
        "method": cfg.peft.method,
        "task_type": "SEQ_CLS" if classification else "CAUSAL_LM",
        "steps": int(state.global_step),
        "final_loss": final_loss,
        "tokens_trained": tokens,
        "tokens_per_second": (tokens - tokens_before) / wall if wall > 0 else None,
        "trainable_params": int(trainable),
        "total_params": int(total),
        "wall_seconds": wall,
        # training loop only (no model load), over the steps this process ran
        "seconds_per_step": loop_seconds / max(
            1, state.global_step - (checkpoints.step_of(resume) if resume else 0)),
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "device": device,
        "dtype": dtype_name,
        "resumed_from_step": checkpoints.step_of(resume) if resume else None,
        "adapter_sha256": digest,
    }
    atomic.write_json(root / layout.report("train"), report)  # last: it marks the run as finished
    return TrainResult(str(adapter), fp, report["steps"], final_loss, tokens, wall, digest,
                       report["resumed_from_step"], skipped=False), model
