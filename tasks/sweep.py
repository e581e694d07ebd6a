"""Hyperparameter sweeps: an Optuna study whose trials train and evaluate on the validation split.

Contract (no Prefect here; flows/sweep.py drives these, one Prefect task per trial):
- `check_space(params) -> dict`: the raw params mapping, after checking that every value each
  `sweep.space` dimension can take (every choice, both bounds) passes the same schema as the
  params file (`tasks.config.parse_params`). ConfigError naming `sweep.space.<key>` otherwise, or
  when the space is empty. Nothing is trained or written.
- `open_study(params) -> optuna.Study`: the study `sweep.study` in `sweep.storage` (default: the
  SQLite file `sweeps/optuna.db` of the project), created or loaded, TPE sampler seeded.
- `recover(study) -> list[int]`: RUNNING trials whose process is gone (a killed sweep) are marked
  FAIL; their slots are asked again, since only COMPLETE and PRUNED trials count (`finished`).
- `ask(study, params) -> optuna.Trial`: the next trial with every dimension sampled (trial 0 is
  the params file's own values when `sweep.include_default`), tagged with this process.
- `run_trial(params, trial) -> TrialResult`: train (tasks/sweep_trial.py: the validation loss is
  reported during training for the median pruner) + evaluate(split="validation") in
  `sweeps/<study>/trial-<number>/`, a project folder of its own whose `data/processed` shows the
  main project's train and validation splits only (symlinks, read only), so a trial cannot read
  the test split. The main project's models/, reports/ and dvc.lock are never written.
- `write_best(params, study) -> Path`: `sweeps/<study>/best-params.yaml`, the best trial's full
  params (valid: parsed by the schema before it is written). `apply_best(params, values)` writes
  the best values into the project's params.yaml (comments kept) for the finetune flow.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tasks import atomic, layout
from tasks.config import Params, parse_params
from tasks.config_sweep import Dimension
from tasks.errors import ConfigError, PeftflowError

SWEEPS = Path("sweeps")  # under the project root; ignored by git (its own .gitignore)
TRIAL_SPLITS = ("train", "validation")  # what a trial may read: never the test split
ATTR_PID, ATTR_PID_START = "peftflow.pid", "peftflow.pid_start"


@dataclass(frozen=True)
class TrialResult:
    number: int
    folder: str
    state: str  # "COMPLETE" or "PRUNED" (stopped during training by the median pruner)
    value: float | None  # the objective: sweep.objective.metric of the adapter on the validation split
    metrics: dict  # every adapter metric of the validation evaluation
    base_metrics: dict  # the base model's, on the same rows
    train: dict  # reports/train.json of the trial
    seconds: dict  # {"train": s, "evaluate": s, "total": s}
    curve: dict  # {step: validation loss} reported to the pruner during training


def study_name(params: Params) -> str:
    return params.sweep.study or f"{params.register.experiment}-sweep"


def storage_url(params: Params) -> str:
    return params.sweep.storage or f"sqlite:///{(Path(params.root).resolve() / SWEEPS / 'optuna.db')}"


def sweep_dir(params: Params) -> Path:
    return Path(params.root) / SWEEPS / study_name(params)


def raw_params(params: Params) -> dict:
    """The params file as written (the mapping trials are derived from)."""
    if params.path is None:
        raise ConfigError("a sweep needs params read from a file (pass --params PATH)")
    return yaml.safe_load(Path(params.path).read_text()) or {}


def with_values(data: dict, values: dict[str, Any]) -> dict:
    """A deep copy of `data` with each dotted key of `values` set (sections created as needed)."""
    out = json.loads(json.dumps(data))
    for key, value in values.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return out


def check_space(params: Params) -> dict:
    """See the module docstring. Returns the raw params mapping."""
    space = params.sweep.space
    if not space:
        raise ConfigError(f"{params.path}: sweep.space is empty: add the keys to search, e.g. "
                          "sweep: {space: {train.learning_rate: {loguniform: [1.0e-4, 3.0e-3]}}}")
    data = raw_params(params)
    for key, dim in space.items():
        for value in dim.values_to_check():
            try:
                parse_params(with_values(data, {key: value}), root=params.root, source=f"sweep.space.{key} = {value!r}")
            except ConfigError as err:
                raise ConfigError(f"sweep.space.{key}: the value {value!r} is not valid for {key}:\n{err}") from None
    if params.sweep.include_default:
        for key, value in _current_values(params, list(space)).items():
            if not _inside(space[key], value):
                raise ConfigError(f"sweep.space.{key}: the params file's own value {value!r} (the default trial) is "
                                  "outside the space; widen it or set sweep.include_default: false")
    return data


def _inside(dim: Dimension, value: Any) -> bool:
    if dim.choice is not None:
        return value in dim.choice
    low, high = dim.values_to_check()
    return isinstance(value, (int, float)) and low <= value <= high


def distribution(dim: Dimension):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if dim.choice is not None:
        return CategoricalDistribution(dim.choice)
    if dim.loguniform is not None:
        return FloatDistribution(*dim.loguniform, log=True)
    if dim.uniform is not None:
        return FloatDistribution(*dim.uniform)
    if dim.int_range is not None:
        return IntDistribution(*dim.int_range)
    return IntDistribution(*dim.logint, log=True)


def open_study(params: Params):
    """The sweep's study, created if missing (see the module docstring)."""
    import optuna
    from optuna.storages import RDBStorage

    cfg = params.sweep
    url = storage_url(params)
    if url.startswith("sqlite:///"):
        folder = Path(params.root) / SWEEPS
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / ".gitignore").exists():  # outputs of runs, not sources: never committed
            atomic.write_text(folder / ".gitignore", "*\n")
    # SQLite: wait for a concurrent writer (another trial's tell) instead of failing at once.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    sampler = optuna.samplers.TPESampler(seed=cfg.sampler.seed, n_startup_trials=cfg.sampler.n_startup_trials,
                                         constant_liar=cfg.concurrency > 1)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner.n_startup_trials,
                                          n_warmup_steps=cfg.pruner.n_warmup_steps)
              if cfg.pruner.enabled else optuna.pruners.NopPruner())
    try:
        return optuna.create_study(storage=RDBStorage(url, engine_kwargs=engine), study_name=study_name(params),
                                   sampler=sampler, pruner=pruner, direction=cfg.objective.direction,
                                   load_if_exists=True)
    except ValueError as err:  # e.g. an existing study with the other direction
        raise ConfigError(f"sweep study '{study_name(params)}' in {url}: {err}; set sweep.study to a new name") from None


def finished(study) -> int:
    """Trials that count towards sweep.n_trials: COMPLETE and PRUNED."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def recover(study) -> list[int]:
    """Mark RUNNING trials whose process is gone FAIL; return their numbers. A trial another live
    process is running (same host, pid alive, same start time) is left alone."""
    from optuna.trial import TrialState

    from tasks.tracking import process_alive

    lost = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get(ATTR_PID)
        if isinstance(pid, int) and process_alive(pid, t.user_attrs.get(ATTR_PID_START)):
            continue
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        lost.append(t.number)
    return lost


def ask(study, params: Params):
    """The next trial, every dimension sampled now (so its values are known before it runs)."""
    from tasks.tracking import process_tags

    space = params.sweep.space
    if params.sweep.include_default and not study.get_trials(deepcopy=False):
        defaults = _current_values(params, list(space))
        study.enqueue_trial(defaults, user_attrs={"peftflow.default": True}, skip_if_exists=True)
    trial = study.ask({key: distribution(dim) for key, dim in space.items()})
    tags = process_tags()
    trial.set_user_attr(ATTR_PID, int(tags["peftflow.pid"]))
    trial.set_user_attr(ATTR_PID_START, tags["peftflow.pid_start"])
    return trial


def reopen_trial(params: Params, trial_id: int):
    """The running trial `trial_id` of the sweep's study, opened from the storage (in any process)."""
    import optuna

    return optuna.trial.Trial(open_study(params), trial_id)


def _current_values(params: Params, keys: list[str]) -> dict[str, Any]:
    out = {}
    for key in keys:
        node: Any = params
        for part in key.split("."):
            node = getattr(node, part)
        out[key] = node
    return out


def trial_params(params: Params, values: dict[str, Any], folder: Path) -> Params:
    """The trial's params (the file's, with `values` set), validated by the schema; root = `folder`."""
    data = with_values(raw_params(params), values)
    return parse_params(data, root=folder, source=f"trial params {values}")


def prepare_folder(params: Params, folder: Path) -> None:
    """`folder` as a project: data/processed = the main project's train and validation splits
    (symlinks: shared, never copied; the test split is not there), reports/preprocess.json."""
    src = (Path(params.root) / layout.PROCESSED).resolve()
    splits = json.loads((src / "dataset_dict.json").read_text()).get("splits", [])
    missing = [s for s in TRIAL_SPLITS if s not in splits]
    if missing:
        raise PeftflowError(f"{src} has no {missing} split(s); a sweep selects on the validation split: "
                            "raise preprocess.split.validation above 0 and re-run preprocess")
    view = folder / layout.PROCESSED
    view.mkdir(parents=True, exist_ok=True)
    atomic.write_text(view / "dataset_dict.json", json.dumps({"splits": list(TRIAL_SPLITS)}))
    for split in TRIAL_SPLITS:
        link = view / split
        if not link.is_symlink():
            link.symlink_to(src / split, target_is_directory=True)
    report = folder / layout.report("preprocess")
    report.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(params.root) / layout.report("preprocess"), report)


def run_trial(params: Params, trial) -> TrialResult:
    """Train and evaluate the optuna `trial` (values sampled by `ask`) in its own folder; see the
    module docstring. Pruned during training: state PRUNED, no evaluation."""
    import time

    import optuna

    from tasks import evaluate, sweep_trial

    number, folder = trial.number, sweep_dir(params) / f"trial-{trial.number:04d}"
    tp = trial_params(params, dict(trial.params), folder)  # the schema's verdict before anything runs
    started = time.perf_counter()
    prepare_folder(params, folder)
    atomic.write_text(folder / "params.yaml", yaml.safe_dump(_dump(tp), sort_keys=False))
    try:
        sweep_trial.train(tp, trial)
    except optuna.TrialPruned:
        shutil.rmtree(folder / layout.CHECKPOINTS, ignore_errors=True)
        took = time.perf_counter() - started
        return TrialResult(number, str(folder), "PRUNED", None, {}, {}, {},
                           {"train": took, "evaluate": 0.0, "total": took}, _curve(params, trial))
    trained = time.perf_counter()
    result = evaluate.run(tp, split="validation", base_cache=sweep_dir(params))  # the base: scored once per sweep
    done = time.perf_counter()
    metric = params.sweep.objective.metric
    value = result.adapter.get(metric)
    if not isinstance(value, (int, float)):
        known = sorted(k for k, v in result.adapter.items() if isinstance(v, (int, float)))
        raise ConfigError(f"sweep.objective.metric = {metric!r}: evaluate reports no value for it on this data "
                          f"(has: {', '.join(known)}); pick one of those")
    shutil.rmtree(folder / layout.CHECKPOINTS, ignore_errors=True)  # resumable state: done with it
    train_report = json.loads((folder / layout.report("train")).read_text())
    return TrialResult(number, str(folder), "COMPLETE", float(value), dict(result.adapter), dict(result.base), train_report,
                       {"train": trained - started, "evaluate": done - trained, "total": done - started},
                       _curve(params, trial))


def _curve(params: Params, trial) -> dict[int, float]:
    """The validation losses the trial reported (their sign undone: tasks/sweep_trial.py)."""
    sign = 1.0 if params.sweep.objective.direction == "minimize" else -1.0
    mine = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    return {int(step): sign * v for step, v in sorted(mine.intermediate_values.items())}


def _dump(p: Params) -> dict:
    return p.model_dump(mode="json", by_alias=True)


def best_values(study) -> dict[str, Any]:
    try:
        return dict(study.best_trial.params)
    except ValueError:
        raise PeftflowError(f"sweep study '{study.study_name}' has no complete trial yet; run the sweep") from None


def write_best(params: Params, study) -> Path:
    """sweeps/<study>/best-params.yaml: the params file with the best trial's values (schema-checked)."""
    data = with_values(raw_params(params), best_values(study))
    parse_params(data, root=params.root, source="best params")
    path = sweep_dir(params) / "best-params.yaml"
    head = (f"# Best trial {study.best_trial.number} of sweep '{study.study_name}': "
            f"{params.sweep.objective.metric} = {study.best_value:.6g} on the validation split.\n")
    atomic.write_text(path, head + yaml.safe_dump(data, sort_keys=False))
    return path


def apply_best(params: Params, values: dict[str, Any]) -> Path:
    """Write `values` into the project's params.yaml in place (ruamel round trip: comments and
    order kept); the result is checked by the schema before the file is replaced."""
    from io import StringIO

    from ruamel.yaml import YAML

    path = Path(params.path)
    rt = YAML()
    doc = rt.load(path.read_text())
    for key, value in values.items():
        node = doc
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    buf = StringIO()
    rt.dump(doc, buf)
    parse_params(yaml.safe_load(buf.getvalue()), root=params.root, source=str(path))
    atomic.write_text(path, buf.getvalue())
    return path

