"""Chaos around the registry, against one real `mlflow server` on 127.0.0.1 (sqlite + local artifacts):

- 8 registration processes at once (4 pipeline runs x 2 processes, different metrics): one
  version per pipeline run, none lost, and the champion is the best metric whatever the order;
- a proxy that drops ~20% of the server's responses (the request was served, the client never
  hears): MLflow's own retries plus register's retries leave 0 duplicates, 0 lost versions, 0
  lost or doubled metric points;
- the tracking server SIGKILLed for 10 s (and 60 s, `slow`) between the start of the pipeline's
  MLflow run and register: register waits for it (register.server_wait_s) and replays every point
  of reports/train_log.csv;
- a 1-byte flip in a registered adapter artifact is refused before the adapter is used.

Every test ends with tests/support/invariants.check(). Projects come from
tests/support/adapters.py (a real random:tiny LoRA adapter and real reports).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import invariants
from support.adapters import make_trained_project
from support.servers import LossyProxy, MlflowServer
from tasks import promote, register, registry, tracking
from tasks.errors import ModelError

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TRAIN_LOG_POINTS = 4  # support/adapters.py writes steps 1-4 of loss, learning_rate, grad_norm, tokens_per_second


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    srv.start()
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", srv.url)
    mp.delenv(tracking.ENV_RUN_ID, raising=False)
    yield srv
    mp.undo()
    srv.stop()


def project(root: Path, model_name: str, seed: int, accuracy: float = 0.7):
    params, _, _ = make_trained_project(root, seed=seed, accuracy=accuracy,
                                        overrides={"register": {"model_name": model_name}})
    return params


def start_register(params, uri: str, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tasks", "register", "--params", str(params.root / "params.yaml")],
                            cwd=REPO, env={**os.environ, "MLFLOW_TRACKING_URI": uri, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def register_with_retries(params, uri: str, attempts: int = 6, **env) -> int:
    """`python -m tasks register` until it succeeds, as the flow's register task retries it."""
    err = ""
    for attempt in range(1, attempts + 1):
        proc = start_register(params, uri, **env)
        err = proc.communicate(timeout=600)[1]
        if proc.returncode == 0:
            return attempt
    raise AssertionError(f"register failed {attempts} times; last stderr:\n{err[-3000:]}")


def curve_points(params) -> dict[str, list[int]]:
    c = tracking.client(params)
    run_id = tracking.read_report(params, "register")["run_id"]
    return {k: sorted(m.step for m in c.get_metric_history(run_id, f"train/{k}"))
            for k in ("loss", "learning_rate", "grad_norm", "tokens_per_second")}


def cleanup_and_check(params, server: MlflowServer, **kw) -> invariants.Report:
    """The next pipeline start's cleanup (runs of dead processes -> KILLED), then every invariant."""
    tracking.mark_stale_runs(params)
    return invariants.check(tracking_uri=server.url, model_name=params.register.model_name, root=params.root,
                            dvc=False, **kw)


def test_eight_concurrent_registrations_one_version_each_and_best_is_champion(server, tmp_path):
    name = "chaos-concurrent"
    scores = [0.6, 0.9, 0.7, 0.8]  # the second pipeline run is the best
    runs = [project(tmp_path / f"p{i}", name, seed=40 + i, accuracy=a) for i, a in enumerate(scores)]
    procs = [start_register(p, server.url) for p in runs for _ in range(2)]
    errors = [p.communicate(timeout=900)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, "\n".join(e[-2000:] for e in errors)
    for e in errors:  # shown by pytest if an invariant fails below (deletions are logged as warnings)
        print("\n".join(line for line in e.splitlines() if "register:" in line or "Error" in line))

    report = cleanup_and_check(runs[0], server).assert_ok()
    tokens = {register.pipeline_token(p.sha256, tracking.read_report(p, "ingest")["md5"],
                                      tracking.read_report(p, "train")["adapter_sha256"]) for p in runs}
    assert set(report.tokens) == tokens, "a pipeline run lost its version"
    best = tracking.read_report(runs[1], "register")["version"]
    assert report.aliases["champion"] == best
    for p in runs:
        assert curve_points(p)["loss"] == list(range(1, TRAIN_LOG_POINTS + 1))
    print(f"FIGURE concurrent registrations: 8 processes, {len(report.versions)} versions for 4 pipeline runs, "
          f"duplicates {report.duplicates}, lost {len(tokens - set(report.tokens))}, champion v{best} (best metric)")


def test_flipped_adapter_artifact_is_refused_before_use(server, tmp_path):
    params = project(tmp_path / "p", "chaos-flip", seed=51)
    result = register.run(params)
    run_dir = next(p for p in server.artifacts.rglob(result.run_id) if p.is_dir())
    [weights] = [p for p in run_dir.rglob("adapter_model.safetensors")]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    try:
        with pytest.raises(ModelError, match="sha256"):
            registry.load_peft(f"models:/{params.register.model_name}@champion", params, tmp_path / "dl")
        detected = invariants.check(tracking_uri=server.url, model_name=params.register.model_name).problems
        assert any("stored adapter sha256" in p for p in detected)
    finally:
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    invariants.check(tracking_uri=server.url, model_name=params.register.model_name).assert_ok()


def test_lost_acknowledgements_leave_no_duplicate_and_lose_nothing(server, tmp_path):
    name = "chaos-lossy"
    proxy = LossyProxy(server.port, drop_rate=0.2, seed=7)
    # Short client backoff so the test stays bounded; the retries are still MLflow's own.
    env = {"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5"}
    runs = [project(tmp_path / f"p{i}", name, seed=60 + i, accuracy=0.6 + 0.1 * i) for i in range(3)]
    try:
        attempts = [register_with_retries(p, proxy.url, **env) for p in runs]
    finally:
        proxy.close()
    report = cleanup_and_check(runs[0], server, dense=False).assert_ok()
    assert len(report.tokens) == 3 and report.duplicates == 0
    lost_points = sum(TRAIN_LOG_POINTS - len(steps) for p in runs for steps in curve_points(p).values())
    doubled = sum(len(steps) - len(set(steps)) for p in runs for steps in curve_points(p).values())
    assert lost_points == 0 and doubled == 0
    gaps = report.versions[-1] - len(report.versions)
    print(f"FIGURE lost acknowledgements: {proxy.dropped}/{proxy.forwarded} responses dropped, register attempts "
          f"{attempts}, versions {report.versions} (retried creations removed: {gaps}), duplicates 0, "
          f"lost versions 0, metric points lost {lost_points}, doubled {doubled}")
    assert proxy.dropped > 0


def outage(server: MlflowServer, tmp_path: Path, seconds: float, seed: int) -> None:
    """The flow's MLflow run is open; the server dies; training's outputs are ready; register runs
    while the server is down and must finish once it is back, with every metric point."""
    params = project(tmp_path / "p", f"chaos-outage-{int(seconds)}", seed=seed)
    run_id = tracking.start_run(params, run_name="flow-run")  # what the flow's start-tracking task does
    server.kill()
    down = time.monotonic()
    proc = start_register(params, server.url, **{tracking.ENV_RUN_ID: run_id})
    time.sleep(seconds)
    assert proc.poll() is None, f"register gave up while the server was down:\n{proc.stderr.read()[-3000:]}"
    server.start()
    downtime = time.monotonic() - down
    err = proc.communicate(timeout=600)[1]
    assert proc.returncode == 0, err[-3000:]
    tracking.finish_run(params, run_id)  # the flow's finish-tracking task
    points = curve_points(params)
    lost = sum(TRAIN_LOG_POINTS - len(set(steps)) for steps in points.values())
    assert points["loss"] == list(range(1, TRAIN_LOG_POINTS + 1)) and lost == 0
    assert tracking.read_report(params, "register")["run_id"] == run_id
    cleanup_and_check(params, server).assert_ok()
    print(f"FIGURE tracking server down {downtime:.0f} s (killed for {seconds:.0f} s): metric points lost {lost}")


def test_tracking_server_killed_for_10s_loses_no_point(server, tmp_path):
    outage(server, tmp_path, 10, seed=71)


@pytest.mark.slow
def test_tracking_server_killed_for_60s_loses_no_point(server, tmp_path):
    outage(server, tmp_path, 60, seed=72)


def test_failed_registration_leaves_aliases_alone(server, tmp_path):
    """A register that fails (adapter changed since training) changes neither versions nor aliases."""
    params = project(tmp_path / "p", "chaos-concurrent", seed=81, accuracy=0.99)
    c = tracking.client(params)
    before = invariants.registry_snapshot(c, params.register.model_name)
    (params.root / "models/adapter/adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="changed since training"):
        register.run(params)
    assert invariants.registry_snapshot(c, params.register.model_name) == before
    cleanup_and_check(params, server, aliases_before=before["aliases"]).assert_ok()
    assert promote.alias_version(c, params.register.model_name, promote.CHAMPION) == before["aliases"]["champion"]
