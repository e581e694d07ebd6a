"""Chaos for the whole pipeline: the `finetune` flow process SIGKILLed at every stage boundary.

One project runs `python -m flows.finetune` and is killed right after each stage's report lands
(ingest, preprocess, train, evaluate, merge, register: the stage's outputs exist, dvc.lock or the
MLflow run do not record it yet); each rerun picks up from there. After the last, uninterrupted
rerun the registry must hold exactly what an uninterrupted run registers (one version with this
pipeline run's token and trained adapter, challenger, champion as the gate decides). All flows share one Prefect
server (PREFECT_API_URL), so the invariants also cover Prefect flow runs left RUNNING by the kills.
A rerun with the same inputs (no training, no new version) is tests/integration/test_flow.py's
`test_rerun_skips_every_stage_registers_nothing_new_and_publishes_artifacts`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from support import invariants
from support.projects import dvc_status, small_project
from tasks import gate, judge, layout, predictions, processed, register, tracking
from tasks.config import load_params

pytestmark = pytest.mark.integration
BOUNDARIES = ["ingest", "preprocess", "train", "evaluate", "merge", "register"]


def launch(project: Path, api_url: str) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": api_url}
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own sqlite store
    log = open(project.parent / "flow.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "flows.finetune", "--params", str(project / "params.yaml")],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(project: Path, api_url: str) -> None:
    proc = launch(project, api_url)
    assert proc.wait(timeout=900) == 0, (project.parent / "flow.log").read_text()[-4000:]


def kill_after_report(proc: subprocess.Popen, project: Path, stage: str) -> bool:
    """SIGKILL as soon as reports/<stage>.json is (re)written. True if the flow was still running."""
    report = project / layout.report(stage)
    before = report.stat().st_mtime_ns if report.exists() else 0
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if report.exists() and report.stat().st_mtime_ns != before:
            break
        time.sleep(0.005)
    alive = proc.poll() is None
    proc.kill()
    proc.wait()
    return alive


def registry_state(project: Path) -> dict:
    params = load_params(project / "params.yaml")
    c = tracking.client(params)
    name = params.register.model_name
    versions = c.search_model_versions(f"name='{name}'")
    return {
        "versions": sorted((str(v.version), v.tags.get("peftflow.run_token"), v.tags.get("adapter.sha256"),
                            v.tags.get("peftflow.gate.promote")) for v in versions),
        "aliases": {k: str(v) for k, v in c.get_registered_model(name).aliases.items()},
    }


@pytest.fixture(scope="module")
def api_url(prefect_api) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def test_flow_killed_at_every_stage_boundary_ends_like_an_uninterrupted_run(tmp_path, api_url):
    project = small_project(tmp_path / "chaos" / "proj")
    kills = 0
    for stage in BOUNDARIES:
        kills += kill_after_report(launch(project, api_url), project, stage)
    finish(project, api_url)

    # What an uninterrupted run registers (tests/integration/test_flow.py): version 1 holding this
    # pipeline run's token and the (deterministic, tests/unit/test_train.py) trained adapter,
    # challenger, and champion when the gate passes.
    params = load_params(project / "params.yaml")
    adapter_sha = tracking.read_report(params, "train")["adapter_sha256"]
    token = register.pipeline_token(params.sha256, tracking.read_report(params, "ingest")["md5"], adapter_sha)
    cfg = params.register
    _, base, candidate = predictions.read(project / layout.PREDICTIONS)  # the first gate decision: no champion
    primary, guards, reference = judge.comparisons(params, candidate, base, None, max(len(processed.label_names(project)), 1))
    promoted = gate.decide(primary, guards, reference, cfg.min_delta, dict(cfg.guards)).promote
    assert registry_state(project) == {
        "versions": [("1", token, adapter_sha, str(promoted).lower())],
        "aliases": {"challenger": "1", **({"champion": "1"} if promoted else {})}}
    assert dvc_status(project) == {}
    subprocess.run([sys.executable, "-m", "dvc", "push", "-q"], cwd=project, check=True)  # what a user does next
    report = invariants.check(root=project, tracking_uri=tracking.tracking_uri(params), prefect_api=api_url).assert_ok()
    print(f"FIGURE flow killed at {kills}/{len(BOUNDARIES)} stage boundaries: registry equal to an uninterrupted "
          f"run ({len(report.versions)} version, duplicates {report.duplicates}); Prefect runs left RUNNING 0")
    assert kills == len(BOUNDARIES)
