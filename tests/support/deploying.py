"""Registered versions for the deploy tests, built cheaply but really evaluated: the deploy smoke
check re-scores a version on its own recorded test rows, so those records must be real.

- `deploy_project(root, overrides)`: a prepared project (real preprocess on a 60-row review set)
  with reports/ingest.json (its raw data md5) and the gate off (tests move aliases themselves).
- `register_version(params, seed, tamper=False)`: a seeded random LoRA adapter, the real evaluate
  stage, then the real register stage; returns the version. `tamper=True` flips the adapter's
  recorded per-row predictions (and its recorded accuracy to match): a version whose records
  are self-consistent but do not reproduce.
- `corrupt_artifact(server_artifacts, run_id)`: overwrite a version's stored adapter weights in the
  MLflow server's artifact folder (its `adapter.sha256` tag then no longer matches).
- `sign(secret, delivery_id, timestamp, body)`: MLflow's webhook signature scheme.
- `PrefectServer(home)`: a real `prefect server start` (triggers and scheduler run there).
- `VllmRecorder()`: a stand-in for vLLM's runtime LoRA API that records the requests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import pandas as pd

from support.adapters import make_adapter
from support.projects import prepared_project
from tasks import atomic, evaluate, layout, register
from tasks.adapters import adapter_sha256


def deploy_project(root: Path, overrides: dict | None = None):
    params = prepared_project(root, {"register": {"promote": False, "guards": {}},
                                     "evaluate": {"max_samples": 12}, **(overrides or {})})
    raw = root / layout.RAW_DATA
    atomic.write_json(root / layout.report("ingest"), {"source": "fixture", "rows": 60,
                                                        "md5": hashlib.md5(raw.read_bytes()).hexdigest()})
    return params


def register_version(params, seed: int, tamper: bool = False) -> str:
    root = Path(params.root)
    adapter = make_adapter(params, "lora", scale=0.5, seed=seed)
    atomic.write_json(root / layout.report("train"), {
        "adapter_sha256": adapter_sha256(adapter), "fingerprint": f"fp-{seed}", "tokens_trained": 1,
        "wall_seconds": 1.0, "device": "cpu", "final_loss": 1.0, "steps": 1})
    (root / layout.TRAIN_LOG).write_text("step,loss,learning_rate,grad_norm,tokens_per_second\n1,1.0,0.001,0.5,10\n")
    evaluate.run(params)
    if tamper:
        table = pd.read_csv(root / layout.PREDICTIONS)
        table["adapter.pred"] = 1 - table["adapter.pred"]
        table.to_csv(root / layout.PREDICTIONS, index=False)
        report = json.loads((root / layout.report("evaluate")).read_text())
        report["adapter"]["accuracy"] = float((table["adapter.pred"] == table["label"]).mean())
        atomic.write_json(root / layout.report("evaluate"), report)
    return register.run(params).version


def sign(secret: str, delivery_id: str, timestamp: str, body: str) -> str:
    """MLflow's webhook signature (mlflow/webhooks/delivery.py): v1,base64(HMAC-SHA256(id.ts.body))."""
    mac = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def corrupt_artifact(server_artifacts: Path, run_id: str) -> Path:
    """Overwrite a version's stored adapter weights in the MLflow server's artifact folder."""
    [weights] = Path(server_artifacts).glob(f"**/{run_id}/artifacts/registered_model/**/adapter_model.safetensors")
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    return weights


class PrefectServer:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME (event triggers and
    the scheduler run there, unlike the test harness's); `env` is what a client/worker needs."""

    def __init__(self, home: Path):
        import os

        from support.services import free_port

        self.home, port = Path(home), free_port()
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.env.update(PREFECT_HOME=str(self.home), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
                        PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
                        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2", PREFECT_WORKER_QUERY_SECONDS="1",
                        PREFECT_WORKER_PREFETCH_SECONDS="5", PREFECT_LOGGING_EXTRA_LOGGERS="tasks")
        self.port, self.proc = port, None

    def start(self) -> None:
        import subprocess

        from support.services import BIN, wait_http

        log = self.home / "server.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                          "--port", str(self.port)], env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"{self.env['PREFECT_API_URL']}/health", 180, self.proc, log)

    def cli(self, *args: str, cwd: Path, timeout: float = 180) -> str:
        import subprocess

        from support.services import BIN

        proc = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=cwd, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout


class VllmRecorder:
    """A stand-in for a running vLLM server (vLLM cannot run here: no GPU build): records the
    runtime LoRA requests in vLLM's documented shape and answers them as vLLM does (200 for a
    well-formed load/unload; 400 for a load of a name already loaded or an unload of an unknown
    one). `GET /v1/models` lists the loaded adapters. `requests` = [(path, json body)]."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests, self.loaded = [], {}
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer(200, {"object": "list", "data": [{"id": n, "root": p} for n, p in recorder.loaded.items()]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                recorder.requests.append((self.path, body))
                name = body.get("lora_name")
                if self.path == "/v1/load_lora_adapter" and name and body.get("lora_path"):
                    if name in recorder.loaded:
                        return self._answer(400, {"error": f"The lora adapter '{name}' has already been loaded."})
                    recorder.loaded[name] = body["lora_path"]
                    return self._answer(200, {})
                if self.path == "/v1/unload_lora_adapter" and recorder.loaded.pop(name, None):
                    return self._answer(200, {})
                self._answer(400, {"error": f"bad request {self.path} {body}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
