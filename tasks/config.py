"""Typed, validated view of `params.yaml`.

Contract: `load_params(path)` reads a YAML file and returns a frozen `Params`, or raises
`ConfigError` whose message names the key path, the bad value and what is allowed. Nothing
else happens here: no folders are made, no URIs set, no network touched.

Each top-level section is named after the stage that reads it (`ingest:` -> tasks/ingest.py);
`model:` is shared by every stage that loads the base model. File locations are not params:
they are fixed by `tasks/layout.py` so that `dvc.yaml` can name them statically.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.errors import ConfigError

# A registered-model or experiment name: no path separators, no traversal, printable.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Section(BaseModel):
    """Base for every section: unknown keys fail, values are immutable after load."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    """The base model every stage builds on."""

    base: str = Field(
        "embedded:smollm2-135m-instruct",
        description="`embedded:smollm2-135m-instruct`, `embedded:minilm-l6`, `random:<tiny|llama-1b|llama-8b>`, "
        "a Hugging Face hub id, or a local folder with safetensors weights.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    trust_remote_code: bool = Field(
        False, description="Allow a hub model's own Python code to run. Off by default; turn on only for code you trust."
    )

    @field_validator("base")
    @classmethod
    def _base_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a model, e.g. embedded:smollm2-135m-instruct")
        return v


class IngestConfig(Section):
    """Where the raw data comes from."""

    source: str = Field(
        "embedded:rotten_tomatoes",
        description="`embedded:rotten_tomatoes`, `hf:<dataset id>`, or a local .csv/.jsonl/.parquet path "
        "(relative to the project root).",
    )
    split: str = Field("train", description="Split to read for `hf:` sources.")
    revision: str | None = Field(None, description="Dataset revision for `hf:` sources.")
    remote: str | None = Field(
        None, description="DVC remote to push to; null = the project's default remote (`dvc remote default`)."
    )


class SplitConfig(Section):
    """Deterministic train/validation/test split."""

    validation: float = Field(0.1, ge=0.0, le=0.5, description="Fraction of rows (or groups) for validation.")
    test: float = Field(0.1, gt=0.0, le=0.5, description="Fraction of rows (or groups) for test.")
    group_by: str | None = Field(
        "movie_name", description="Column whose values never straddle splits (null = split rows independently)."
    )
    seed: int = Field(42, ge=0, description="Seed of the split.")


ChatRole = Literal["system", "user", "assistant", "tool"]


class ChatConfig(Section):
    """`format: chat`: where conversations sit in the raw rows (tasks/chat.py). A row holds one
    conversation, a list of messages (Python lists/dicts or their JSON text). The defaults read
    OpenAI-style `messages: [{role, content, tool_calls?}]`; for ShareGPT rows set
    `messages_field: conversations`, `role_field: from`, `content_field: value` (the default `roles`
    already map ShareGPT's `human`/`gpt`)."""

    messages_field: str = Field("messages", description="Column holding each row's list of messages.")
    tools_field: str | None = Field(
        "tools", description="Column of tool schemas handed to the chat template (`tools=`); a missing column "
        "or an empty cell means no tools.",
    )
    role_field: str = Field("role", description="Key of a message's speaker (ShareGPT: `from`).")
    content_field: str = Field("content", description="Key of a message's text (ShareGPT: `value`).")
    roles: dict[str, ChatRole] = Field(
        {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool", "human": "user",
         "gpt": "assistant"},
        description="Raw speaker -> role (system, user, assistant, tool); a speaker not listed is a bad row "
        "(`unknown_role`).",
    )
    train_on: Literal["all", "last"] = Field(
        "all", description="Assistant turns the loss covers: every one (`all`) or only the final one (`last`).")
    bad_rows: Literal["error", "drop"] = Field(
        "error", description="Rows with an unknown role, no assistant turn, empty content or a malformed tool "
        "call or message list: fail naming the row (`error`), or drop and count them per reason (`drop`).",
    )


class PreprocessConfig(Section):
    """Column mapping, formatting and tokenisation."""

    format: Literal["instruction", "text", "classification", "chat"] = Field(
        "instruction",
        description="`instruction`: causal-LM SFT, loss only on the response; `text`: plain causal LM on the text; "
        "`classification`: a sequence-classification head over `labels`; `chat`: multi-turn conversations "
        "(see `preprocess.chat`), loss only on assistant turns.",
    )
    text_fields: list[str] = Field(
        ["text"], description="Columns used as input text (at least one; not used by `chat`).")
    label_field: str | None = Field(
        "category", description="Column holding the label (instruction/classification; not used by `chat`).")
    labels: dict[str, str] = Field(
        {"rotten": "negative", "fresh": "positive"},
        description="Raw label value -> label name; the name is the response text (verbalizer) for `instruction`. "
        "Raw values are compared as `str(value)`: integer keys are read as their digits (`0` -> \"0\") and "
        "boolean keys as Python writes them (`true` -> \"True\", matching a boolean column). Not used by `chat`.",
    )
    unknown_labels: Literal["error", "drop"] = Field(
        "error", description="What to do with rows whose label is not a key of `labels`."
    )
    response_field: str | None = Field(
        None, description="For `instruction` without labels: the column holding the response text."
    )
    prompt_template: str = Field(
        "Review: {text}\nIs this review positive or negative?",
        description="Python format string over `text_fields` building the prompt (instruction) or input text; "
        "not used by `chat`.",
    )
    chat_template: bool = Field(True, description="Wrap prompt/response in the tokenizer's chat template if it has one "
                                "(`chat` always uses it).")
    system_prompt: str | None = Field(
        None, description="Optional system message for the chat template (instruction; `chat` keeps the rows' own).")
    max_length: int = Field(256, ge=8, le=131072, description="Tokens per example; longer ones are truncated "
                            "(`chat`: whole earliest turns are dropped).")
    max_samples: int | None = Field(
        None, ge=1, description="Cap on rows read after filtering (null = all); for quick runs."
    )
    split: SplitConfig = SplitConfig()
    chat: ChatConfig = ChatConfig()

    @field_validator("labels", mode="before")
    @classmethod
    def _label_keys_as_text(cls, v: Any) -> Any:
        # YAML reads `0:` as an int and `true:` as a bool; preprocess compares str(raw cell), so str() them.
        if isinstance(v, dict):
            return {str(k) if isinstance(k, (bool, int, float)) else k: val for k, val in v.items()}
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PreprocessConfig:
        if self.format != "chat" and not self.text_fields:
            raise ValueError(f"format '{self.format}' needs at least one column in text_fields")
        if self.format == "classification" and (not self.label_field or len(self.labels) < 2):
            raise ValueError("format 'classification' needs label_field and at least two labels")
        if self.format == "instruction" and not self.label_field and not self.response_field:
            raise ValueError("format 'instruction' needs label_field (+ labels) or response_field")
        return self


class PeftConfig(Section):
    """Which PEFT method and its settings."""

    method: Literal[
        "lora", "adalora", "ia3", "loha", "lokr", "vera", "oft", "prompt_tuning", "prefix_tuning", "p_tuning"
    ] = Field("lora", description="PEFT method.")
    r: int = Field(16, ge=1, le=4096, description="Rank (LoRA, AdaLoRA initial rank, LoHa, LoKr, VeRA, OFT).")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator (LoRA family).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input (LoRA family).")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or `all-linear`."
    )
    last_layers: int | None = Field(
        None, ge=1, description="Adapt only the last N transformer layers (null = all). Backward then stops "
        "at layer L-N, which makes CPU steps much cheaper. Layer-adapting methods only.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    init: str = Field(
        "default",
        description="LoRA init: `default`, `gaussian`, `pissa`, `pissa_niter_<n>`, `olora`, `loftq`, `eva`, ...",
    )
    num_virtual_tokens: int = Field(16, ge=1, le=1024, description="Prompt/prefix/p-tuning virtual tokens.")
    quantize_4bit: bool = Field(False, description="QLoRA: load the base in 4-bit (bitsandbytes, CUDA only).")


class FastPathConfig(Section):
    """The CUDA fast training path (tasks/fastpath.py, figures in docs/benchmarks.md): each technique
    can be switched off alone; the defaults are what the benchmark showed to pay. Not used on CPU."""

    enabled: bool = Field(True, description="Use the fast path on CUDA (false = plain HF Trainer + peft).")
    packing: bool = Field(True, description="Padding-free batches with per-document varlen attention (causal LMs).")
    liger: bool = Field(True, description="Liger kernels: RMSNorm, RoPE, SwiGLU, fused linear cross-entropy.")
    adapter_input_cast: bool = Field(
        False, description="Keep peft's fp32 upcast of LoRA inputs (false = adapters run on bf16 activations).")
    fused_lora: bool = Field(True, description="LoRA update as one addmm into the base layer's output.")
    fused_adamw: bool = Field(True, description="Fused AdamW (`adamw_torch_fused`).")
    compile: bool = Field(False, description="torch.compile the model (slower here: see docs/benchmarks.md).")


class TrainConfig(Section):
    """Optimisation and checkpointing of the `train` stage."""

    peft: PeftConfig = PeftConfig()
    learning_rate: float = Field(2.0e-4, gt=0, le=100.0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Schedule after warm-up."
    )
    warmup_steps: float = Field(0.1, ge=0, description="Warm-up: steps, or a fraction of max_steps if < 1.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps to train.")
    global_batch_size: int = Field(16, ge=1, description="Examples per optimizer step (all devices).")
    micro_batch_size: int = Field(8, ge=1, description="Examples per forward pass; accumulation is derived.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    seed: int = Field(42, ge=0, description="Seed for init, dropout and data order.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    save_steps: int = Field(25, ge=1, description="Checkpoint every N optimizer steps (for resume).")
    logging_steps: int = Field(1, ge=1, description="Write the per-step log every N steps.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto` = CUDA if available, else CPU.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="`auto` = bf16 on CUDA, fp32 on CPU.")
    fast_path: FastPathConfig = Field(
        FastPathConfig(), description="CUDA speed-ups, each switchable; `fast_path: false` turns all off.")
    devices: int | Literal["auto"] = Field(
        1, description="Training processes on this host, one per device (DDP under torchrun); `auto` = every "
        "visible GPU (1 on CPU). CPU training with N > 1 runs N processes over gloo.",
    )

    @field_validator("fast_path", mode="before")
    @classmethod
    def _fast_path_switch(cls, v: Any) -> Any:
        return {"enabled": v} if isinstance(v, bool) else v  # `fast_path: true|false` is the short form

    @field_validator("devices")
    @classmethod
    def _devices_positive(cls, v: int | str) -> int | str:
        if v != "auto" and v < 1:
            raise ValueError("must be at least 1, or auto")
        return v

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        per_step = self.micro_batch_size * (self.devices if isinstance(self.devices, int) else 1)
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size}) x devices ({self.devices})"
            )
        return self

    def gradient_accumulation_steps(self, world: int = 1) -> int:
        """Micro-batches each of `world` processes accumulates per optimizer step; ConfigError if the
        global batch does not split evenly (checked here too because `devices: auto` resolves late)."""
        per_step = self.micro_batch_size * world
        if self.global_batch_size % per_step:
            raise ConfigError(f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                              f"train.micro_batch_size ({self.micro_batch_size}) x {world} devices")
        return self.global_batch_size // per_step


class BootstrapConfig(Section):
    """The paired bootstrap over test rows that gives every metric its interval (tasks/intervals.py)."""

    resamples: int = Field(1000, ge=100, le=100000, description="Bootstrap resamples of the test rows.")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Coverage of the reported intervals.")
    seed: int = Field(0, ge=0, description="Seed of the resampling: the same run gives the same interval.")


class EvaluateConfig(Section):
    """Evaluation of base and adapter on the test split."""

    max_samples: int | None = Field(400, ge=1, description="Test rows scored (null = all).")
    batch_size: int = Field(16, ge=1, description="Rows per forward pass.")
    generation_samples: int = Field(
        16, ge=0, description="Label and text formats: rows whose greedy generation is scored (exact match). "
        "Generative formats (chat, instruction with response_field) generate on every scored row.")
    max_new_tokens: int = Field(8, ge=1, le=4096, description="Generation length (stops earlier at end of turn).")
    sample_predictions: int = Field(20, ge=0, description="Rows shown in the Prefect sample-predictions table.")
    bootstrap: BootstrapConfig = BootstrapConfig()


class MergeConfig(Section):
    """Merging the adapter into the base weights."""

    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Saved dtype of the merged model; `auto` = the base model's dtype."
    )
    tolerance: float = Field(1.0e-4, gt=0, description="Max |logit diff| merged vs base+adapter, in fp32.")
    parity_samples: int = Field(8, ge=1, description="Held-out rows used for the parity check.")


# Every metric the evaluate stage can report, in report order (tasks/metrics.py computes them);
# here so that params naming a metric are checked at load time.
METRIC_NAMES = ("accuracy", "accuracy_norm", "accuracy_calibrated", "majority_rate", "f1_macro", "loss", "perplexity",
                "exact_match", "token_f1", "rouge_l", "chrf", "embedding_similarity", "length", "length_ratio")


def _check_metric(name: str) -> str:
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric '{name}'; evaluate reports: {', '.join(METRIC_NAMES)}")
    return name


class RegisterConfig(Section):
    """MLflow tracking, registration and the promotion gate."""

    experiment: str = Field("peftflow", description="MLflow experiment name.")
    model_name: str = Field("peftflow-adapter", description="Registered model name.")
    primary_metric: str = Field(
        "accuracy", description="Evaluation metric the gate compares (candidate vs champion, or vs the strongest "
        "base reference), on this run's test rows.")
    min_delta: float = Field(
        0.0, ge=0, description="The lower bound of the 95% interval of the improvement in primary_metric must be "
        "above this (0: above zero, i.e. a lift beyond the noise of the test rows).")
    guards: dict[str, float] = Field(
        {"f1_macro": 0.02}, description="Metric -> largest allowed regression vs the champion."
    )
    promote: bool = Field(True, description="Run the gate after registration (moves `champion` when it passes).")
    server_wait_s: float = Field(
        300.0, ge=0, le=86400,
        description="How long register waits for an unreachable tracking server to come back before failing "
        "(the trained outputs stay on disk either way).",
    )

    @field_validator("primary_metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        return _check_metric(v)

    @field_validator("guards")
    @classmethod
    def _known_guards(cls, v: dict[str, float]) -> dict[str, float]:
        for name in v:
            _check_metric(name)
        return v

    @field_validator("experiment", "model_name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(
                "must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return v


# `register` is a stage name; pydantic warns that it shadows ABCMeta.register, which instances never use.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Params(Section):
    """All of params.yaml. `root` is the project folder every relative path is resolved against."""

    model: ModelConfig = ModelConfig()
    ingest: IngestConfig = IngestConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    merge: MergeConfig = MergeConfig()
    register: RegisterConfig = RegisterConfig()

    root: Path = Field(Path("."), exclude=True, description="Project root (folder of the params file).")
    sha256: str = Field("", exclude=True, description="sha256 of the params file bytes.")
    path: Path | None = Field(None, exclude=True, description="The params file (None if not read from one).")


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} invalid setting(s)"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {path}: unknown key (check the spelling; see docs/params.md for every key)")
            continue
        value = e.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  - {path} = {shown}: {msg}")
    return "\n".join(lines)


def parse_params(data: Any, *, root: Path = Path("."), source: str = "params", sha256: str = "",
                 path: Path | None = None) -> Params:
    """Validate an already-parsed mapping. Raises ConfigError naming each bad key path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate({**data, "root": root, "sha256": sha256, "path": path})
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; the project root is the file's folder.

    Raises ConfigError for a missing file, invalid YAML (with line and column) or invalid values.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path} (pass --params PATH, or run from the project root)")
    raw = path.read_bytes()
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    return parse_params(data, root=path.resolve().parent, source=str(path), sha256=hashlib.sha256(raw).hexdigest(),
                        path=path.resolve())


def flatten(params: Params) -> dict[str, Any]:
    """Dotted-key view of every param (for MLflow), e.g. {"train.peft.r": 16}."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    walk("", params.model_dump(mode="json"))
    return out


def params_reference() -> str:
    """Markdown reference of every key, generated from the schema (docs/params.md is this text)."""
    lines = [
        "# params.yaml reference",
        "",
        "Generated from `tasks/config.py` by `python -m tasks params-doc > docs/params.md`;",
        "a unit test fails when this file is out of date. Unknown keys are errors.",
        "",
    ]

    def section(prefix: str, model: type[BaseModel]) -> None:
        rows = []
        nested = []
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, Section):
                nested.append((f"{prefix}.{name}" if prefix else name, ann))
                continue
            default = field.get_default(call_default_factory=True)
            symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "min length"}
            limits = [f"{sym} {getattr(m, attr)}" for m in field.metadata for attr, sym in symbols.items()
                      if hasattr(m, attr)]
            type_name = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
            meaning = (field.description or "") + (f" ({', '.join(limits)})" if limits else "")
            cells = [f"`{prefix}.{name}`", f"`{type_name}`", f"`{default!r}`", meaning]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        if rows:
            lines.extend([f"## `{prefix}`", "", (model.__doc__ or "").strip(), "",
                          "| key | type | default | meaning |", "|---|---|---|---|", *rows, ""])
        for p, m in nested:
            section(p, m)

    for name, field in Params.model_fields.items():
        if not field.exclude:
            section(name, field.annotation)
    return "\n".join(lines)
