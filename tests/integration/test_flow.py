"""The finetune flow end to end under a real (temporary) Prefect server, on a tiny real project.

Two CLI runs at once (what `make run` starts) share one server, train and register once and
leave `dvc status` clean, each printing a short terminal output without library warnings or
per-step loss dicts, and tag the version with its device-hours and cost; a rerun skips every DVC
stage and registers nothing new; changed data under the same path reruns; a broken params file
fails at the first task and nothing runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from support.projects import dvc_status, registered_versions, small_project, write_reviews
from tasks import layout, tracking
from tasks.config import load_params
from tasks.errors import ConfigError

pytestmark = pytest.mark.integration

DVC_STAGES = ["preprocess", "train", "evaluate", "merge"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """Two `python -m flows.finetune` processes started at once on one fresh project (what
    `make run` runs), with no Prefect server up: they must share one temporary server."""
    project = small_project(tmp_path_factory.mktemp("flow") / "proj", register={"cost_per_device_hour": 2.5})
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home-cli"))
    cmd = [sys.executable, "-m", "flows.finetune", "--params", str(project / "params.yaml")]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    # bytes, decoded as is: text mode would turn a progress bar's \r redraws into newlines
    outputs = [p.communicate(timeout=1200)[0].decode(errors="replace") for p in procs]
    return project, [p.returncode for p in procs], outputs


def test_two_runs_at_once_share_a_server_register_once_and_leave_dvc_clean(first_run):
    project, codes, outputs = first_run
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    assert sum(o.count("Starting temporary server") for o in outputs) == 1, "the second run must join the first's server"
    for out in outputs:  # the summary table and what to do next
        assert "model version" in out and "make prefect-ui" in out and "dvc repro" in out
        # no library output that captures sys.stdout leaks into the log (dill's disassembly did)
        assert "LOAD_GLOBAL" not in out, out[-3000:]
        # quiet by default (issue N3): no library warnings, no per-step loss dicts, no row-by-row bars;
        # the whole run fits well inside two screens (~100 lines)
        lines = out.split("\n")  # terminal lines: a progress bar redraws itself with \r on one line
        assert len(lines) <= 80, f"{len(lines)} lines:\n{out}"
        assert not [line for line in lines if "Warning" in line or "{'loss'" in line or "Saving the dataset" in line
                    or "Loading weights" in line], out
        assert "device-hours, cost" in out
    # the warnings went to the project's log file instead of the terminal
    assert "FutureWarning" in (project / ".dvc" / "tmp" / "peftflow.log").read_text()
    for stage in ["ingest", *DVC_STAGES, "register"]:
        assert (project / layout.report(stage)).is_file(), stage
    assert (project / layout.PREDICTIONS).is_file() and (project / layout.TRAIN_LOG).is_file()
    assert (project / layout.ADAPTER / "adapter_config.json").is_file() and (project / layout.MERGED).is_dir()
    assert dvc_status(project) == {}, "dvc status must be clean after a flow run"
    assert sorted(yaml.safe_load((project / "dvc.lock").read_text())["stages"]) == sorted(DVC_STAGES)
    assert registered_versions(project) == ["1"]
    # Each run has its own MLflow run; both name the one version.
    params = load_params(project / "params.yaml")
    c = tracking.client(params)
    runs = c.search_runs([tracking.experiment_id(params, c)])
    assert len(runs) == 2 and {r.data.tags.get("registered.version") for r in runs} == {"1"}
    assert {r.info.status for r in runs} == {"FINISHED"}
    # device-hours (train wall time x devices) and their cost at register.cost_per_device_hour
    tags = c.get_model_version(params.register.model_name, "1").tags
    train = json.loads((project / layout.report("train")).read_text())
    assert float(tags["peftflow.device_hours"]) == pytest.approx(train["wall_seconds"] / 3600, rel=1e-4)
    assert float(tags["peftflow.cost"]) == pytest.approx(2.5 * float(tags["peftflow.device_hours"]), rel=1e-4)


def test_rerun_skips_every_stage_registers_nothing_new_and_publishes_artifacts(first_run, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.finetune import finetune

    project, _, _ = first_run
    lock_before = (project / "dvc.lock").read_bytes()
    again = finetune(params=str(project / "params.yaml"))
    assert set(again["stages"].values()) == {"skipped (up to date)"}
    assert again["version"] == "1" and again["registered_new"] is False
    assert registered_versions(project) == ["1"]
    assert (project / "dvc.lock").read_bytes() == lock_before
    assert dvc_status(project) == {}
    evaluation = json.loads((project / layout.report("evaluate")).read_text())
    assert again["adapter_metrics"] == evaluation["adapter"] and again["base_metrics"] == evaluation["base"]
    assert again["run_url"].startswith("http://127.0.0.1:5000/#/experiments/")

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["finetune-summary", "sample-predictions"])))
    by_key = {a.key: a for a in arts}
    assert "lift" in by_key["finetune-summary"].data and "version 1" in by_key["finetune-summary"].data
    assert len(json.loads(by_key["sample-predictions"].data)) >= 1


def test_changed_data_under_the_same_path_reruns(first_run, prefect_api):
    from flows.finetune import finetune

    project, _, _ = first_run
    write_reviews(project / "data" / "reviews.csv", 120, seed=1)  # same path, new content
    again = finetune(params=str(project / "params.yaml"))
    assert all(v.startswith("ran") for v in again["stages"].values()), again["stages"]
    assert again["registered_new"] is True and registered_versions(project) == ["1", "2"]
    assert dvc_status(project) == {}


def test_broken_params_fail_at_the_first_task_and_nothing_runs(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.finetune import finetune

    project = small_project(tmp_path / "proj")
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("  max_steps:", "  max_stepz:"))
    state = finetune(params=str(params), return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError, match=r"train\.max_stepz: unknown key"):
        state.result()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert [(r.name.split(" ")[0], r.state_type.value) for r in runs] == [("load-config", "FAILED")]
    assert not (project / layout.RAW_DATA).exists() and not (project / "mlflow.db").exists()
