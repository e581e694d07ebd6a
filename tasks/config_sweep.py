"""The `sweep:` section of params.yaml: a hyperparameter search over other params keys.

Contract: `SweepConfig` is typed like every section (unknown keys fail, values frozen). Checked
at load: each `space` key is the dotted path of a params key (`train.learning_rate`,
`train.peft.r`), not of a section and not of `sweep` itself; each dimension has exactly one
distribution with sane bounds; the objective names a metric evaluate reports. Whether every
value a dimension can take is valid for its key is checked by the same schema
(`tasks.config.parse_params`) before any trial runs (`tasks.sweep.check_space`), because that
needs the whole params file. An empty `space` (the default) means no sweep is configured.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.config_stages import Section

Scalar = bool | int | float | str | None


class Dimension(Section):
    """One searched key: exactly one of `loguniform`, `uniform`, `int`, `logint` (bounds [low, high],
    inclusive) or `choice` (a list of values)."""

    loguniform: tuple[float, float] | None = Field(None, description="Float drawn log-uniformly in [low, high] (low > 0).")
    uniform: tuple[float, float] | None = Field(None, description="Float drawn uniformly in [low, high].")
    int_range: tuple[int, int] | None = Field(None, alias="int", description="Integer drawn uniformly in [low, high].")
    logint: tuple[int, int] | None = Field(None, description="Integer drawn log-uniformly in [low, high] (low >= 1).")
    choice: list[Scalar] | None = Field(None, min_length=1, description="One of these values.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Dimension:
        given = [k for k in ("loguniform", "uniform", "int_range", "logint", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of loguniform, uniform, int, logint, choice "
                             f"(got {', '.join(given) or 'none'})")
        bounds = getattr(self, given[0])
        if given[0] != "choice":
            low, high = bounds
            if not low < high:
                raise ValueError(f"bounds [{low}, {high}]: low must be below high")
            if given[0] == "loguniform" and low <= 0 or given[0] == "logint" and low < 1:
                raise ValueError(f"bounds [{low}, {high}]: a log scale needs low > 0 (logint: >= 1)")
        return self

    def values_to_check(self) -> list[Scalar]:
        """The values whose validity stands for the whole dimension: every choice, or both bounds."""
        if self.choice is not None:
            return list(self.choice)
        return list(next(b for b in (self.loguniform, self.uniform, self.int_range, self.logint) if b is not None))


class ObjectiveConfig(Section):
    """What a trial is scored by: an adapter metric of evaluate on the validation split."""

    metric: str = Field("accuracy", description="Adapter metric of the evaluate report on the validation split.")
    direction: Literal["maximize", "minimize"] = Field("maximize", description="`maximize` or `minimize` the metric.")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        from tasks.config import METRIC_NAMES  # the one metric vocabulary (config imports this module)

        if v not in METRIC_NAMES:
            raise ValueError(f"unknown metric '{v}'; evaluate reports: {', '.join(METRIC_NAMES)}")
        return v


class SamplerConfig(Section):
    """Optuna's TPE sampler, seeded: the same study asks the same first trials."""

    seed: int = Field(0, ge=0, description="Seed of the sampler.")
    n_startup_trials: int = Field(4, ge=1, description="Random trials before TPE models the results.")


class PrunerConfig(Section):
    """Optuna's median pruner over the validation loss reported during training (tasks/sweep_trial.py)."""

    enabled: bool = Field(True, description="Stop a trial whose validation loss at a step is worse than the median "
                          "of earlier trials at that step (no adapter is written; the trial counts as PRUNED).")
    n_startup_trials: int = Field(2, ge=0, description="Trials that finish before any is pruned.")
    n_warmup_steps: int = Field(0, ge=0, description="Training steps of a trial before it can be pruned.")
    interval_steps: int = Field(10, ge=1, description="Optimizer steps between two validation-loss reports.")
    max_samples: int = Field(64, ge=1, description="Validation rows the loss during training is computed on.")


class SweepConfig(Section):
    """Hyperparameter search (`python -m flows.sweep`): an Optuna study; a trial trains and evaluates on the validation split in `sweeps/<study>/trial-<n>/`. A dimension is one of `loguniform`, `uniform`, `int`, `logint` ([low, high]) or `choice` (a list)."""

    space: dict[str, Dimension] = Field(
        {}, description="Dotted params key -> distribution, e.g. `train.learning_rate: {loguniform: [1.0e-4, 3.0e-3]}`, "
        "`train.peft.r: {choice: [8, 16, 32]}`, `train.peft.r: {int: [4, 64]}`. Empty = no sweep configured.")
    n_trials: int = Field(8, ge=1, le=10000, description="Finished trials (complete or pruned) the study needs.")
    concurrency: int = Field(1, ge=1, le=64, description="Trials run at once: Prefect tasks, in this process when 1, else in worker "
                             "processes (one per trial slot).")
    include_default: bool = Field(
        True, description="Trial 0 runs the params file's own values of the searched keys (the baseline the best "
        "trial is compared with).")
    study: str | None = Field(None, description="Optuna study name; null = `<register.experiment>-sweep`.")
    storage: str | None = Field(
        None, description="Optuna storage URL (e.g. `postgresql://...` for a team database); null = "
        "`sqlite:///<project>/sweeps/optuna.db`.")
    objective: ObjectiveConfig = ObjectiveConfig()
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()

    @field_validator("space")
    @classmethod
    def _keys_are_params(cls, v: dict[str, Dimension]) -> dict[str, Dimension]:
        from tasks.config import Params  # config imports this module; by validation time it is loaded

        for key in v:
            problem = _path_problem(Params, key)
            if problem:
                raise ValueError(f"sweep.space.{key}: {problem}")
        return v


def _path_problem(model: type[Section], key: str) -> str | None:
    """Why `key` is not the dotted path of a params leaf key (None when it is)."""
    parts = key.split(".")
    if parts[0] == "sweep":
        return "the sweep cannot search its own settings"
    for i, part in enumerate(parts):
        fields = {n: f for n, f in model.model_fields.items() if not f.exclude}
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            return f"unknown key '{part}' under {where} (has: {', '.join(fields)})"
        ann = fields[part].annotation
        is_section = isinstance(ann, type) and issubclass(ann, Section)
        if i == len(parts) - 1:
            return f"'{key}' is a section; name one of its keys" if is_section else None
        if not is_section:
            return f"'{'.'.join(parts[:i + 1])}' is a value, not a section"
        model = ann
    return None
