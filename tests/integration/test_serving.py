"""`mlflow models serve -m models:/<name>@champion --env-manager local` answers /invocations with text."""

from __future__ import annotations

import os
import subprocess

import pytest
import requests

from adapter_fixture import make_trained_project
from tasks import register, tracking
from test_mlflow_server import MLFLOW, free_port, stop, wait_http

pytestmark = pytest.mark.integration


def test_serve_champion_generates_text(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.ENV_RUN_ID, raising=False)
    params, _, _ = make_trained_project(tmp_path / "proj", seed=31)
    result = register.run(params)
    assert result.champion == result.version

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(params)}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [str(MLFLOW), "models", "serve", "-m", f"models:/{params.register.model_name}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/ping", proc, 90)
        r = requests.post(f"{url}/invocations", timeout=30,
                          json={"inputs": ["Review: a fine film", "hello"], "params": {"max_new_tokens": 4}})
        assert r.status_code == 200, r.text
        predictions = r.json()["predictions"]
        assert len(predictions) == 2 and all(isinstance(p, str) for p in predictions)
        r = requests.post(f"{url}/invocations", timeout=30, json={"dataframe_records": [{"prompt": "hi"}]})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 1, r.text
    finally:
        stop(proc)
        log.close()
        if proc.returncode not in (0, -15, None):
            print((tmp_path / "serve.log").read_text()[-3000:])
