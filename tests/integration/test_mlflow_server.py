"""Tracking + registration + load-back against a real `mlflow server` on 127.0.0.1 (sqlite in tmp)."""

from __future__ import annotations

import subprocess

import pytest

from support.adapters import logits, make_trained_project
from support.services import MLFLOW, free_port, stop_group, wait_http
from tasks import register, registry, tracking

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real MLflow tracking + registry + artifact-proxy server for the module."""
    d = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(d / "server.log", "wb")
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
         "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", 120, proc)
        yield url
    finally:
        stop_group(proc)
        log.close()


@pytest.fixture(scope="module")
def env(server, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", server)
    mp.setenv("PEFTFLOW_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.delenv(tracking.ENV_RUN_ID, raising=False)
    yield server
    mp.undo()


@pytest.fixture(scope="module")
def registered(env, tmp_path_factory):
    root = tmp_path_factory.mktemp("server-proj") / "proj"
    params, model, tok = make_trained_project(root, seed=21)
    assert tracking.check_reachable(params) == env
    return params, model, tok, register.run(params)


def test_register_through_server(registered):
    params, _, _, result = registered
    assert result.created and result.promoted and result.champion == result.version
    assert not (params.root / "mlflow.db").exists()  # everything went to the server
    c = tracking.client(params)
    run = c.get_run(result.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert len(c.get_metric_history(result.run_id, "train/loss")) == 4
    assert run.data.tags["adapter.sha256"] == result.adapter_sha256


def test_load_back_through_server_gives_trained_logits(registered, tmp_path):
    import mlflow

    params, model, tok, _ = registered
    uri = f"models:/{params.register.model_name}@champion"
    expected = logits(model, tok)
    peft_model, peft_tok = registry.load_peft(uri, params, tmp_path / "dl")
    assert (logits(peft_model, peft_tok) - expected).abs().max().item() <= 1e-5
    loaded = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    assert (logits(loaded.model, loaded.tokenizer) - expected).abs().max().item() <= 1e-5


def test_retry_against_server_creates_nothing_new(registered):
    params, _, _, result = registered
    again = register.run(params)
    assert (again.version, again.run_id, again.created) == (result.version, result.run_id, False)
    c = tracking.client(params)
    assert len(c.search_model_versions(f"name='{params.register.model_name}'")) == 1
    assert len(c.get_metric_history(result.run_id, "train/loss")) == 4
