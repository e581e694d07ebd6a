"""The sweep's params handling without training: the space is checked by the params schema, the
best values go into params.yaml with its comments kept, the study resumes from its storage."""

from __future__ import annotations

import os

import pytest
import yaml

from tasks import sweep
from tasks.config import load_params
from tasks.errors import ConfigError

PARAMS = """# my project
train:
  learning_rate: 1.0e-3   # keep this comment
  peft:
    r: 16
sweep:
  space:
    train.learning_rate: {loguniform: [1.0e-4, 3.0e-3]}
    train.peft.r: {choice: [8, 16]}
  n_trials: 2
"""


def _project(tmp_path, text=PARAMS):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return load_params(path)


def test_every_value_of_the_space_is_checked_by_the_params_schema(tmp_path):
    assert sweep.check_space(_project(tmp_path))["train"]["peft"]["r"] == 16
    bad = _project(tmp_path, PARAMS.replace("{choice: [8, 16]}", "{choice: [16, -4]}"))
    with pytest.raises(ConfigError, match=r"sweep\.space\.train\.peft\.r: the value -4 is not valid"):
        sweep.check_space(bad)
    outside = _project(tmp_path, PARAMS.replace("{choice: [8, 16]}", "{choice: [8, 32]}"))
    with pytest.raises(ConfigError, match="own value 16 .* outside the space"):
        sweep.check_space(outside)
    with pytest.raises(ConfigError, match="sweep.space is empty"):
        sweep.check_space(_project(tmp_path, "train: {max_steps: 4}\n"))


def test_apply_best_writes_the_values_and_keeps_comments(tmp_path):
    params = _project(tmp_path)
    sweep.apply_best(params, {"train.learning_rate": 5.0e-4, "train.peft.r": 8})
    text = (tmp_path / "params.yaml").read_text()
    assert "# keep this comment" in text and "# my project" in text
    again = load_params(tmp_path / "params.yaml")
    assert again.train.learning_rate == 5.0e-4 and again.train.peft.r == 8
    assert yaml.safe_load(text)["sweep"]["n_trials"] == 2


def test_a_trial_left_running_by_a_dead_process_is_failed_and_not_counted(tmp_path):
    import optuna

    params = _project(tmp_path)
    study = sweep.open_study(params)
    done = sweep.ask(study, params)
    assert done.params == {"train.learning_rate": 1.0e-3, "train.peft.r": 16}  # trial 0: the file's own values
    study.tell(done, 0.5)
    lost = sweep.ask(study, params)
    lost.set_user_attr(sweep.ATTR_PID, 2 ** 22 + 12345)  # a pid no process has here
    live = sweep.ask(study, params)  # this process's: left alone
    again = sweep.open_study(params)  # a new process opening the same storage
    assert sweep.recover(again) == [lost.number]
    states = {t.number: t.state for t in again.get_trials()}
    assert states[lost.number] == optuna.trial.TrialState.FAIL
    assert states[live.number] == optuna.trial.TrialState.RUNNING and sweep.finished(again) == 1
    assert (tmp_path / "sweeps" / ".gitignore").read_text() == "*\n" and os.getpid() == live.user_attrs[sweep.ATTR_PID]
