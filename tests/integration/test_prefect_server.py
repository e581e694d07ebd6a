"""Deployments against a real `prefect server start` on 127.0.0.1, as an operator would run them.

`prefect deploy --all` from prefect.yaml, a process worker on `peftflow-pool`, a finetune run
triggered through the API that completes and registers a model version in MLflow; the retrain
schedule exists with its cron and the scheduler creates its next runs; an emitted
`peftflow.data.changed` event starts retrain through the deployment trigger.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from support.projects import registered_versions, small_project
from support.services import free_port, wait_for
from tasks import promote, tracking
from tasks.config import load_params

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` (scheduler polling every 2 s) with its own PREFECT_HOME; yields its env."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2", PREFECT_WORKER_QUERY_SECONDS="2",
               PREFECT_WORKER_PREFETCH_SECONDS="5")
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        import httpx

        def healthy():
            assert proc.poll() is None, (home / "server.log").read_text()
            try:
                return httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 180, "prefect server /health", interval=1)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def prefect_cli(env: dict, *args: str, timeout: float = 180) -> str:
    proc = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def deployed(server, tmp_path_factory):
    """Both deployments from prefect.yaml, a process worker, and a tiny project to run them on."""
    prefect_cli(server, "work-pool", "create", "peftflow-pool", "--type", "process")
    prefect_cli(server, "work-pool", "create", "peftflow-serving", "--type", "process")  # deploy, deploy-poll
    prefect_cli(server, "deploy", "--all")
    log = open(tmp_path_factory.mktemp("worker") / "worker.log", "w")
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "peftflow-pool", "--type", "process"],
                              cwd=REPO, env=server, stdout=log, stderr=subprocess.STDOUT)
    project = small_project(tmp_path_factory.mktemp("deployed") / "proj")
    try:
        yield server, project
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log.close()


@contextlib.contextmanager
def api(env: dict):
    """A sync Prefect client on the test server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        yield client


def wait_final(env: dict, flow_run_id, timeout: float):
    def final():
        with api(env) as c:
            run = c.read_flow_run(flow_run_id)
        return run if run.state.is_final() else None

    return wait_for(final, timeout, f"flow run {flow_run_id} to finish", interval=2)


def test_finetune_deployment_run_completes_and_registers(deployed):
    env, project = deployed
    with api(env) as c:
        deployment = c.read_deployment_by_name("finetune/finetune")
        run = c.create_flow_run_from_deployment(deployment.id, parameters={"params": str(project / "params.yaml")})
    done = wait_final(env, run.id, timeout=900)
    assert done.state.is_completed(), done.state
    assert registered_versions(project) == ["1"]


def test_retrain_schedule_has_its_cron_and_next_runs(deployed):
    env, _ = deployed
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState
    from prefect.client.schemas.filters import FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    with api(env) as c:
        deployment = c.read_deployment_by_name("retrain/retrain")
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert all(s.active for s in deployment.schedules)

    def scheduled():
        with api(env) as c:
            return c.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))

    runs = wait_for(scheduled, 120, "the scheduler to create retrain's next runs", interval=2)
    times = sorted(r.next_scheduled_start_time for r in runs)
    assert all((t.hour, t.minute) == (3, 0) for t in times), times


def test_data_changed_event_starts_retrain_which_skips_for_the_champion_data(deployed):
    env, project = deployed
    params = load_params(project / "params.yaml")
    # The champion must have been trained on the current data for retrain to skip.
    if promote.alias_version(tracking.client(params), params.register.model_name, promote.CHAMPION) is None:
        promote.promote(params.register.model_name, "1", params)
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with api(env) as c:
        deployment = c.read_deployment_by_name("retrain/retrain")
    emitted = subprocess.run([sys.executable, "-m", "flows.retrain", "--emit-event", "--params",
                              str(project / "params.yaml")], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=120)
    assert emitted.returncode == 0, emitted.stderr

    def triggered():
        with api(env) as c:
            runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
        return [r for r in runs if r.parameters.get("params") == str(project / "params.yaml")]

    run = wait_for(triggered, 120, "the event trigger to create a retrain run", interval=2)[0]
    done = wait_final(env, run.id, timeout=600)
    assert done.state.is_completed(), done.state
    c = tracking.client(params)
    skipped = c.search_runs([tracking.experiment_id(params, c)], filter_string="tags.`peftflow.skipped` = 'true'")
    assert len(skipped) == 1 and "equals the data.md5 tag of champion" in skipped[0].data.tags["peftflow.skip_reason"]
    assert registered_versions(project) == ["1"]
