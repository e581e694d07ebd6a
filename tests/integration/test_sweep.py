"""The sweep flow on a tiny real project: Optuna study in SQLite, trials as Prefect tasks and nested
MLflow runs, resumed after a SIGKILL with no trial lost or counted twice, selection never on the test
split, an invalid space failing before any trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO
from support.projects import small_project
from tasks import layout, register, sweep, sweep_tracking, tracking
from tasks.config import load_params
from tasks.errors import ConfigError

pytestmark = pytest.mark.integration

SPACE = {"train.learning_rate": {"loguniform": [1.0e-4, 3.0e-3]}, "train.peft.r": {"choice": [4, 16]}}
N_TRIALS = 3


def _cmd(project):
    return [sys.executable, "-m", "flows.sweep", "--params", str(project / "params.yaml")]


def _env(home):
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env["PREFECT_HOME"] = str(home)
    return env


def _trials(params):
    import optuna

    try:
        return optuna.load_study(study_name=sweep.study_name(params), storage=sweep.storage_url(params)).get_trials()
    except (KeyError, ValueError, Exception):  # no study (or storage) yet
        return []


def _states_read_only(db):
    """{trial number: state} read from the study's SQLite file without creating anything in it: a
    poller opening the storage through Optuna would create its tables beside the sweep's own."""
    import sqlite3

    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return dict(con.execute("SELECT number, state FROM trials").fetchall())
    except sqlite3.OperationalError:  # tables not created yet, or locked for a moment
        return {}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A sweep SIGKILLed while its second trial runs, then the same command run again."""
    base = tmp_path_factory.mktemp("sweep")
    project = small_project(base / "proj", sweep={"space": SPACE, "n_trials": N_TRIALS,
                                                  "pruner": {"interval_steps": 2, "max_samples": 8}})
    params = load_params(project / "params.yaml")
    env = _env(base / "prefect-home")
    first = subprocess.Popen(_cmd(project), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    deadline, killed_trial = time.monotonic() + 300, None
    while time.monotonic() < deadline and first.poll() is None:
        states = _states_read_only(project / "sweeps" / "optuna.db")
        # running, with its nested MLflow run made (the trial folder is made after it)
        running = [n for n, s in states.items() if s == "RUNNING"
                   and (sweep.sweep_dir(params) / f"trial-{n:04d}" / "params.yaml").is_file()]
        if "COMPLETE" in states.values() and running:
            killed_trial = running[0]
            os.killpg(first.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    out1 = first.communicate(timeout=60)[0]
    assert killed_trial is not None, f"the sweep never had a running trial after a complete one:\n{out1[-3000:]}"
    second = subprocess.run(_cmd(project), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return project, params, killed_trial, second


def test_killed_sweep_resumes_with_no_trial_lost_or_counted_twice(resumed):
    project, params, killed, second = resumed
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    trials = _trials(params)
    states = {t.number: t.state.name for t in trials}
    assert states[killed] == "FAIL", states  # the interrupted one: marked failed, its slot asked again
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == N_TRIALS and "RUNNING" not in states.values(), states
    for t in finished:  # the validation loss reached the pruner during training, every 2 steps
        assert sorted(t.intermediate_values) == [2, 4] or t.state.name == "PRUNED", t.intermediate_values
    assert complete[0].user_attrs.get("peftflow.default") and complete[0].number == 0
    assert complete[0].params == {"train.learning_rate": 1.0e-3, "train.peft.r": 16}  # the file's own values
    # each complete trial has its own folder with a validation evaluation
    for t in complete:
        folder = sweep.sweep_dir(params) / f"trial-{t.number:04d}"
        report = yaml.safe_load((folder / layout.report("evaluate")).read_text())
        assert report["split"] == "validation" and report["adapter"]["accuracy"] == pytest.approx(t.value)
    # the base model was scored once for the whole sweep: one per-row table, the same base figures in every trial
    assert len(list(sweep.sweep_dir(params).glob("base-scores-*.npz"))) == 1
    assert len({yaml.safe_dump(yaml.safe_load((sweep.sweep_dir(params) / f"trial-{t.number:04d}" / layout.report(
        "evaluate")).read_text())["base"]) for t in complete}) == 1
    # the main project trained and evaluated nothing; dvc.lock records preprocess only
    assert not (project / layout.ADAPTER).exists() and not (project / layout.report("evaluate")).exists()
    assert sorted(yaml.safe_load((project / "dvc.lock").read_text())["stages"]) == ["preprocess"]
    best = load_params(sweep.sweep_dir(params) / "best-params.yaml")  # a valid params file
    best_trial = max(complete, key=lambda t: t.value)
    assert best.train.learning_rate == pytest.approx(best_trial.params["train.learning_rate"])


def test_parent_run_holds_one_nested_run_per_trial_and_the_study_artifacts(resumed):
    _, params, killed, _ = resumed
    c = tracking.client(params)
    exp = tracking.experiment_id(params, c)
    parents = c.search_runs([exp], filter_string=f"tags.`{sweep_tracking.TAG_STUDY}` = '{sweep.study_name(params)}'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    children = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    by_state = {}
    for run in children:
        by_state.setdefault(run.data.tags[sweep_tracking.TAG_STATE], []).append(run)
    finished = by_state.get("COMPLETE", []) + by_state.get("PRUNED", [])
    assert len(finished) == N_TRIALS and {r.info.status for r in finished} == {"FINISHED"}
    assert all(r.data.tags.get("git.state_ref", "").startswith("refs/exps/") for r in finished)
    assert [r.data.tags[sweep_tracking.TAG_TRIAL] for r in by_state["FAIL"]] == [str(killed)]
    assert by_state["FAIL"][0].info.status == "KILLED"
    done = by_state["COMPLETE"][0]
    assert {"train.learning_rate", "train.peft.r"} <= set(done.data.params)
    assert "objective" in done.data.metrics and len(c.get_metric_history(done.info.run_id, "train.loss")) > 1
    assert [m.step for m in c.get_metric_history(done.info.run_id, "validation.loss_during_training")] == [2, 4]
    names = {f.path for f in c.list_artifacts(parent, "sweep")}
    assert {"sweep/study.json", "sweep/trials.csv", "sweep/optimization_history.png",
            "sweep/param_importances.png"} <= names


def test_trials_never_read_the_test_split(resumed):
    from datasets import load_from_disk

    project, params, _, _ = resumed
    data = load_from_disk(str(project / layout.PROCESSED))
    validation, test = set(data["validation"]["prompt"]), set(data["test"]["prompt"])
    assert validation and test and not validation & test
    import pandas as pd

    folders = sorted(sweep.sweep_dir(params).glob("trial-*"))
    scored = [f for f in folders if (f / layout.PREDICTIONS).is_file()]
    assert len(scored) >= sum(t.state.name == "COMPLETE" for t in _trials(params)) >= 2
    for folder in folders:  # the test split is not even visible to a trial
        assert sorted(p.name for p in (folder / layout.PROCESSED).iterdir()) == ["dataset_dict.json", "train",
                                                                                 "validation"]
    for folder in scored:
        prompts = set(pd.read_csv(folder / layout.PREDICTIONS)["prompt"])
        assert prompts <= validation and not prompts & test


def test_promote_best_registers_a_version_trained_with_the_best_values(resumed):
    """The finished sweep again with --promote-best: no new trial, the best values written into
    params.yaml, the finetune flow (test split, registry, gate) registers a version trained with them.
    After the tests above: it writes the main project's models/ and reports/, which they check are untouched."""
    project, params, _, _ = resumed
    before = len(_trials(params))
    run = subprocess.run([*_cmd(project), "--promote-best"], cwd=REPO, env=_env(project.parent / "prefect-home"),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert len(_trials(params)) == before  # n_trials were finished: nothing asked again
    best = max((t for t in _trials(params) if t.state.name == "COMPLETE"), key=lambda t: t.value)
    promoted = load_params(project / "params.yaml")
    assert (promoted.train.learning_rate, promoted.train.peft.r) == (best.params["train.learning_rate"],
                                                                     best.params["train.peft.r"])
    c = tracking.client(params)
    (version,) = c.search_model_versions(f"name='{params.register.model_name}'")
    logged = c.get_run(version.run_id).data.params
    assert float(logged["train.learning_rate"]) == pytest.approx(best.params["train.learning_rate"])
    assert int(logged["train.peft.r"]) == best.params["train.peft.r"]
    assert version.tags.get(register.TAG_GATE) in ("true", "false")  # the gate decided on it
    assert yaml.safe_load((project / layout.report("evaluate")).read_text())["split"] == "test"


def test_invalid_space_fails_before_any_trial_naming_the_key(tmp_path):
    project = small_project(tmp_path / "proj", sweep={"space": {"train.learning_rate": {"choice": ["fast"]}}})
    run = subprocess.run(_cmd(project), cwd=REPO, env=_env(tmp_path / "prefect-home"), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "sweep.space.train.learning_rate" in run.stderr and "'fast'" in run.stderr
    assert not (project / "sweeps").exists() and not (project / layout.RAW_DATA).exists()
    # an unknown key or a wrong distribution fails at load, naming the key
    with pytest.raises(ConfigError, match=r"sweep\.space\.train\.peft\.rank: unknown key 'rank'"):
        load_params(_write(tmp_path, {"sweep": {"space": {"train.peft.rank": {"choice": [8]}}}}))
    with pytest.raises(ConfigError, match="low must be below high"):
        load_params(_write(tmp_path, {"sweep": {"space": {"train.learning_rate": {"loguniform": [1.0e-2, 1.0e-3]}}}}))


def _write(tmp_path, data):
    path = tmp_path / "bad" / "params.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_dvc_exp_run_with_a_param_override_shows_in_dvc_exp_show(tmp_path):
    """DVC users' habit on a project: `dvc exp run -S key=value <stage>` and `dvc exp show`."""
    import json

    from support.projects import git

    project = small_project(tmp_path / "proj")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([sys.executable, "-m", "tasks", "ingest", "--params", "params.yaml"], cwd=project, check=True,
                   capture_output=True)
    git(project, "add", "-A")
    git(project, "commit", "-qm", "data")
    run = subprocess.run([*dvc, "exp", "run", "-S", "train.learning_rate=2.0e-3", "train"], cwd=project,
                         capture_output=True, text=True)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    shown = json.loads(subprocess.run([*dvc, "exp", "show", "--json"], cwd=project, check=True,
                                      capture_output=True, text=True).stdout)
    rates = [rev["data"]["params"]["params.yaml"]["data"]["train"]["learning_rate"]
             for commit in shown for exp in commit.get("experiments") or [] for rev in exp["revs"]]
    assert 2.0e-3 in rates, rates
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["learning_rate"] == 2.0e-3  # applied
    assert (project / layout.report("train")).is_file()
