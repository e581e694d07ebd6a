"""Typed, validated view of `params.yaml`.

Contract: `load_params(path)` reads a YAML file and returns a frozen `Params`, or raises
`ConfigError` whose message names the key path, the bad value and what is allowed. Nothing
else happens here: no folders are made, no URIs set, no network touched.

Each top-level section is named after the stage that reads it (`ingest:` -> tasks/ingest.py);
`model:` is shared by every stage that loads the base model. File locations are not params:
they are fixed by `tasks/layout.py` so that `dvc.yaml` can name them statically.

Modules: the `preprocess:` and `train:` sections (and `Section`) live in tasks/config_stages.py and
are re-exported here; the dotted view for MLflow and the generated reference (`flatten`,
`params_reference`) in tasks/params_doc.py.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from tasks.config_stages import (  # noqa: F401  (re-exported: every section is imported from tasks.config)
    ChatConfig,
    ChatRole,
    FastPathConfig,
    PeftConfig,
    PreferenceConfig,
    PreprocessConfig,
    Section,
    SplitConfig,
    TrainConfig,
)
from tasks.config_sweep import SweepConfig  # the sweep: section, in its own module
from tasks.errors import ConfigError

# A registered-model or experiment name: no path separators, no traversal, printable.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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
    tolerance: float = Field(1.0e-4, gt=0, description=(
        "Max |logit diff| of the merged model vs base + adapter, end to end, for an fp32 merge; a bf16/fp16 "
        "merge scales it by eps(dtype)/eps(fp32). Each adapted layer is also checked on its own in float64."))
    parity_samples: int = Field(8, ge=1, description="Held-out rows used for the parity check.")


# Every metric the evaluate stage can report, in report order (tasks/metrics.py computes them);
# here so that params naming a metric are checked at load time.
METRIC_NAMES = ("accuracy", "accuracy_norm", "accuracy_calibrated", "majority_rate", "f1_macro", "loss", "perplexity",
                "exact_match", "token_f1", "rouge_l", "chrf", "embedding_similarity", "length", "length_ratio",
                # preference pairs (tasks/preference_eval.py)
                "preference_accuracy", "logp_accuracy", "reward_margin")


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
    approval: Literal["gate", "manual"] = Field(
        "gate", description="Who moves `champion`: `gate` (the gate, when it passes) or `manual` (the gate only "
        "records its decision and sets `challenger`; a person moves `champion` in the MLflow UI, which deploys it).")
    server_wait_s: float = Field(
        300.0, ge=0, le=86400,
        description="How long register waits for an unreachable tracking server to come back before failing "
        "(the trained outputs stay on disk either way).",
    )
    cost_per_device_hour: float | None = Field(
        None, ge=0, description="Price of one device-hour (any currency): each version gets the tag "
        "`peftflow.cost` = train device-hours x this (null = no cost recorded; device-hours are always).")

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

    def cost(self, device_hours: float | None) -> float | None:
        """What `device_hours` of training cost at `cost_per_device_hour` (None when either is unknown)."""
        if device_hours is None or self.cost_per_device_hour is None:
            return None
        return device_hours * self.cost_per_device_hour


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
    sweep: SweepConfig = SweepConfig()  # tasks/config_sweep.py: the search `python -m flows.sweep` runs

    root: Path = Field(Path("."), exclude=True, description="Project root (folder of the params file).")
    sha256: str = Field("", exclude=True, description="sha256 of the params file bytes.")
    path: Path | None = Field(None, exclude=True, description="The params file (None if not read from one).")

    @model_validator(mode="after")
    def _objective_fits_format(self) -> Params:
        if self.train.objective != "sft" and self.preprocess.format != "preference":
            raise ValueError(f"train.objective {self.train.objective!r} trains on preference pairs: set "
                             f"preprocess.format: preference (it is {self.preprocess.format!r}), or "
                             "train.objective: sft")
        pre = self.preprocess
        if pre.format == "preference" and pre.preference.rows == "unpaired" and self.train.objective != "kto":
            raise ValueError(f"preprocess.preference.rows 'unpaired' (completion + label, no pairs) trains with "
                             f"train.objective: kto only (it is {self.train.objective!r}); set it, or give pairs")
        return self


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
