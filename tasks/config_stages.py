"""The sections of params.yaml read by the data and training stages (`preprocess:`, `train:`), and
`Section`, the base of every section.

Contract: each class is a frozen pydantic model whose fields are the keys of its section, typed,
bounded and described (docs/params.md is generated from these descriptions); cross-field rules
are model validators whose message names the keys. `tasks/config.py` assembles them into
`Params` and re-exports them, so stage code imports every section from `tasks.config`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.errors import ConfigError

class Section(BaseModel):
    """Base for every section: unknown keys fail, values are immutable after load."""

    model_config = ConfigDict(extra="forbid", frozen=True)



class SplitConfig(Section):
    """Deterministic train/validation/test split."""

    validation: float = Field(0.1, ge=0.0, le=0.5, description="Fraction of rows (or groups) for validation.")
    test: float = Field(0.1, gt=0.0, le=0.5, description="Fraction of rows (or groups) for test.")
    group_by: str | None = Field(
        "movie_name", description="Column whose values never straddle splits (null = split rows independently)."
    )
    seed: int = Field(42, ge=0, description="Seed of the split.")
    stratify: bool = Field(
        True, description="Keep each label's share of rows alike across splits (rows with labels: classification, "
        "instruction with `labels`; others split as if false); by groups when group_by is set.")


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


class PreferenceConfig(Section):
    """`format: preference`: preference pairs, or KTO's unpaired rows (tasks/preference.py). `prompt`
    is text or a list of messages (read like `preprocess.chat`: role/content keys and `roles`); a
    response (`chosen`, `rejected`, `completion`) is text or a list holding one assistant message."""

    rows: Literal["pairs", "unpaired"] = Field(
        "pairs", description="`pairs`: prompt + chosen/rejected (every preference objective); `unpaired`: prompt + "
        "one completion + a boolean label, desirable or not (`train.objective: kto` only).")
    prompt_field: str = Field("prompt", description="Column holding the prompt (text, or messages / their JSON).")
    chosen_field: str = Field("chosen", description="Column holding the preferred response (`pairs`).")
    rejected_field: str = Field("rejected", description="Column holding the dispreferred response (`pairs`).")
    completion_field: str = Field("completion", description="Column holding the response (`unpaired`).")
    label_field: str = Field(
        "label", description="Column saying whether the completion is desirable (`unpaired`): a boolean, 0/1, or "
        "the text true/false.")
    bad_rows: Literal["error", "drop"] = Field(
        "error", description="Rows with an empty or malformed prompt/response, chosen equal to rejected, or a label "
        "that is not a boolean: fail naming the row and column (`error`), or drop and count them per reason (`drop`).")


class PreprocessConfig(Section):
    """Column mapping, formatting and tokenisation."""

    format: Literal["instruction", "text", "classification", "chat", "preference"] = Field(
        "instruction",
        description="`instruction`: causal-LM SFT, loss only on the response; `text`: plain causal LM on the text; "
        "`classification`: a sequence-classification head over `labels`; `chat`: multi-turn conversations "
        "(see `preprocess.chat`), loss only on assistant turns; `preference`: prompt + chosen/rejected pairs (see "
        "`preprocess.preference`) for `train.objective: dpo` (`sft` trains on prompt + chosen).",
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
    preference: PreferenceConfig = PreferenceConfig()

    @field_validator("labels", mode="before")
    @classmethod
    def _label_keys_as_text(cls, v: Any) -> Any:
        # YAML reads `0:` as an int and `true:` as a bool; preprocess compares str(raw cell), so str() them.
        if isinstance(v, dict):
            return {str(k) if isinstance(k, (bool, int, float)) else k: val for k, val in v.items()}
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PreprocessConfig:
        if self.format not in ("chat", "preference") and not self.text_fields:
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
    compile: bool = Field(True, description="torch.compile each decoder layer (regional: two graphs, reused); "
                          "inductor then fuses RMSNorm/RoPE/SwiGLU, and Liger keeps only the loss. Not applied "
                          "with `train.sharding: fsdp` (untested there).")


class TrainConfig(Section):
    """Optimisation and checkpointing of the `train` stage."""

    peft: PeftConfig = PeftConfig()
    learning_rate: float = Field(2.0e-4, gt=0, le=100.0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Schedule after warm-up."
    )
    warmup_steps: float = Field(0.1, ge=0, description="Warm-up: steps, or a fraction of the training steps if < 1.")
    max_steps: int | None = Field(100, ge=1, description="Optimizer steps to train (null: train `epochs` instead).")
    epochs: float | None = Field(
        None, gt=0, le=10000, description="Passes over the train split (HF `num_train_epochs`); exclusive with "
        "max_steps: set max_steps to null to use it.")
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
    sharding: Literal["none", "fsdp"] = Field(
        "none", description="With devices > 1: `none` = data-parallel (DDP, a whole model per device); `fsdp` = "
        "FSDP2 through accelerate: the frozen base is sharded over the devices (one shard per decoder layer), so a "
        "model that does not fit one device trains on several (tasks/fsdp.py). LoRA and `objective: sft` only.",
    )
    objective: Literal["sft", "dpo", "orpo", "kto"] = Field(
        "sft", description="`sft`: supervised loss on the responses; on `preprocess.format: preference` rows, through "
        "TRL (tasks/preference_trl.py): `dpo` (pairs; reference = the base with the adapter off), `orpo` (pairs; no "
        "reference model), `kto` (pairs, or `preference.rows: unpaired` completion + label rows; reference = the base). Which to use: "
        "docs/architecture.md, \"Preference tuning\".")
    beta: float = Field(0.1, gt=0, le=100.0, description="DPO/KTO beta: strength of the pull towards the reference; "
                        "ORPO: the weight (lambda) of its odds-ratio term. Also scales the implied reward evaluate "
                        "reports (`reward_margin`).")
    init_adapter: str | None = Field(
        None, description="Start from this adapter instead of a fresh one: a folder (relative to the project) or "
        "`models:/<name>@<alias>` / `models:/<name>/<version>` of this project's registry (hash-checked); its own "
        "adapter config replaces `train.peft`. Recorded in the train report and lineage tags.")

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
    def _objective_supported(self) -> TrainConfig:
        if self.objective == "kto" and self.micro_batch_size < 2:  # TRL's KTOTrainer refuses it too
            raise ValueError("train.objective 'kto' estimates its KL term from the other rows of a micro-batch; set "
                             f"train.micro_batch_size >= 2 (it is {self.micro_batch_size})")
        if self.objective != "sft" and self.fast_path.enabled:
            raise ValueError(f"train.objective {self.objective!r} does not run on the CUDA fast path (packing and "
                             "fused kernels are SFT-only here); set train.fast_path: false")
        if self.objective != "sft" and isinstance(self.devices, int) and self.devices > 1:
            raise ValueError(f"train.objective {self.objective!r} trains on one device here (DDP is not tested "
                             "with TRL's preference trainers); set train.devices: 1")
        return self

    @model_validator(mode="after")
    def _sharding_supported(self) -> TrainConfig:
        """`sharding: fsdp` only where it is tested (tasks/fsdp.py): say which key to change otherwise."""
        if self.sharding == "none":
            return self
        if self.devices == 1:
            raise ValueError("train.sharding 'fsdp' shards over several processes; set train.devices > 1 (or auto), "
                             "or train.sharding: none")
        peft = self.peft
        refused = {  # key: (value, refused?)
            # 4-bit weights stay unsharded under accelerate's FSDP2; QLoRA + FSDP is untested here
            "train.peft.quantize_4bit": (peft.quantize_4bit, peft.quantize_4bit),
            "train.objective": (self.objective, self.objective != "sft"),  # TRL's trainers: untested under FSDP
            "train.peft.method": (peft.method, peft.method != "lora"),  # the tested one (adapter = trainable params)
            "train.peft.init": (peft.init, peft.init != "default"),  # PiSSA/OLoRA convert against the whole base
            "train.peft.use_dora": (peft.use_dora, peft.use_dora),  # untested under FSDP
        }
        for key, (value, bad) in refused.items():
            if bad:
                raise ValueError(f"train.sharding 'fsdp' does not support {key} = {value!r}; change {key}, or set "
                                 "train.sharding: none")
        return self

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError(f"train.epochs ({self.epochs:g}) and train.max_steps ({self.max_steps}) are both set; "
                             "keep one and set the other to null")
        if self.epochs is None and self.max_steps is None:
            raise ValueError("train.epochs and train.max_steps are both null; set one of them")
        return self

    @property
    def length(self) -> str:
        """How long training runs, for people: "100 steps" or "3 epochs"."""
        return f"{self.max_steps} steps" if self.max_steps is not None else f"{self.epochs:g} epochs"

    def optimizer_steps(self, rows: int, world: int = 1) -> int:
        """Optimizer steps training takes over `rows` train rows on `world` processes: max_steps, or
        what the HF Trainer derives from `epochs` (each rank's share of the rows in micro-batches,
        grouped by gradient accumulation, the last group possibly short)."""
        if self.max_steps is not None:
            return self.max_steps
        batches = math.ceil(math.ceil(rows / world) / self.micro_batch_size)
        accumulation = self.gradient_accumulation_steps(world)
        return math.ceil(self.epochs * max(1, math.ceil(batches / accumulation)))

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
