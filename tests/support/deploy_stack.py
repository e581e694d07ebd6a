"""The whole deploy path on loopback, for tests/integration/test_deploy.py and bench/deploy_switch.py:
a real MLflow server (SQLite, webhooks allowed to loopback over http, a Fernet key for the stored
secret), a real `prefect server start`, the receiver (`python -m flows.webhook serve`), the MLflow
webhook registered with a secret (`python -m flows.webhook register`), the `deploy` and
`deploy-poll` deployments of prefect.yaml (`prefect deploy`, the poll's schedule paused: runs on
demand) and a process worker on pool peftflow-serving, all on a project of really evaluated versions.

`deploy_stack(tmp, seeds, tamper=(), corrupt=())` yields a Stack; `seeds` -> registered versions
(`Stack.v[seed]`); seeds in `tamper` do not reproduce, in `corrupt` have a corrupted artifact.
It sets MLFLOW_TRACKING_URI and PEFTFLOW_CACHE in this process and restores them on exit.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import requests

from support.deploying import PrefectServer, corrupt_artifact, deploy_project, register_version
from support.projects import REPO
from support.servers import MlflowServer
from support.services import BIN, free_port, stop_group, wait_for, wait_http
from tasks import promote, serving_target, tracking

PROMPTS = ["Review: a fine film\nIs this review positive or negative?", "hello"]
GEN = {"max_new_tokens": 4}


class Stack:
    def __init__(self, mlflow, prefect, params, front_port, receiver_url, versions, secret):
        self.mlflow, self.prefect, self.params = mlflow, prefect, params
        self.name = params.register.model_name
        self.front = f"http://127.0.0.1:{front_port}"
        self.front_port, self.receiver_url, self.v = front_port, receiver_url, versions
        self.folder = serving_target.serving_dir(params)
        self.secret = secret

    def client(self):
        return tracking.client(self.params)

    def set_alias_as_the_ui_does(self, version: str) -> None:
        """The MLflow UI's own request (ajax-api, as its 'Add/Edit alias' dialog sends it)."""
        r = requests.post(f"{self.mlflow.url}/ajax-api/2.0/mlflow/registered-models/alias", timeout=30,
                          json={"name": self.name, "alias": "champion", "version": version})
        assert r.status_code == 200, r.text

    def champion(self) -> str | None:
        return promote.alias_version(self.client(), self.name, promote.CHAMPION)

    def served(self) -> str | None:
        try:
            r = requests.post(f"{self.front}/invocations", json={"inputs": PROMPTS, "params": GEN}, timeout=60)
        except requests.RequestException:
            return None
        return r.headers.get("X-Peftflow-Version") if r.status_code == 200 else None

    @contextlib.contextmanager
    def api(self):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.prefect.env["PREFECT_API_URL"]}), \
                get_client(sync_client=True) as c:
            yield c

    def deploy_runs(self, deployment: str = "deploy/deploy"):
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        with self.api() as c:
            dep = c.read_deployment_by_name(deployment)
            return dep, c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))


@contextlib.contextmanager
def _environ(values: dict[str, str | None]):
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _spawn(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@contextlib.contextmanager
def deploy_stack(tmp: Path, seeds=(1, 2), tamper=(), corrupt=()):
    """See the module docstring."""
    from cryptography.fernet import Fernet

    secret = "webhook-secret-" + uuid.uuid4().hex
    # The server delivers to loopback over http only when told to (SSRF protection is on by default).
    env_values = {"PEFTFLOW_CACHE": str(tmp / "cache"), tracking.ENV_RUN_ID: None,
                  "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true", "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
                  "MLFLOW_WEBHOOK_CACHE_TTL": "1", "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode()}
    mlflow, prefect, procs, params = MlflowServer(tmp / "mlflow"), PrefectServer(tmp / "prefect"), [], None
    with _environ(env_values), _environ({"MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI")}):
        try:
            mlflow.start()
            prefect.start()
            os.environ["MLFLOW_TRACKING_URI"] = mlflow.url
            params = deploy_project(tmp / "proj")
            versions = {k: register_version(params, seed=k, tamper=k in tamper) for k in seeds}
            for k in corrupt:
                run_id = tracking.client(params).get_model_version(params.register.model_name, versions[k]).run_id
                corrupt_artifact(mlflow.artifacts, run_id)
            front_port, receiver_port = free_port(), free_port()
            env = {**prefect.env, "MLFLOW_TRACKING_URI": mlflow.url, "PEFTFLOW_CACHE": os.environ["PEFTFLOW_CACHE"],
                   "PEFTFLOW_WEBHOOK_SECRET": secret}
            procs.append(_spawn([sys.executable, "-m", "flows.webhook", "serve", "--port", str(receiver_port)],
                                tmp / "receiver.log", env))
            receiver = f"http://127.0.0.1:{receiver_port}"
            wait_http(f"{receiver}/health", 120, procs[-1], tmp / "receiver.log")
            register = subprocess.run([sys.executable, "-m", "flows.webhook", "register", "--url",
                                       f"{receiver}/mlflow-webhook", "--params", str(params.root / "params.yaml")],
                                      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
            assert register.returncode == 0, register.stderr
            prefect.cli("work-pool", "create", "peftflow-serving", "--type", "process", cwd=REPO)
            for name in ("deploy", "deploy-poll"):
                prefect.cli("deploy", "--name", name, "--param", f"params={params.root / 'params.yaml'}",
                            "--param", f"front_port={front_port}", cwd=REPO)
            stack = Stack(mlflow, prefect, params, front_port, receiver, versions, secret)
            # The minute schedule is real (the polling test checks it); paused so that polls do not
            # interleave with the webhook-driven runs the tests count. A paused deployment still runs on demand.
            with stack.api() as c:
                c.pause_deployment(c.read_deployment_by_name("deploy/deploy-poll").id)
            procs.append(_spawn([str(BIN / "prefect"), "worker", "start", "--pool", "peftflow-serving", "--type",
                                 "process"], tmp / "worker.log", env))
            yield stack
        finally:
            for proc in procs:
                stop_group(proc)
            if params is not None:
                serving_target.stop(serving_target.serving_dir(params), params.register.model_name, "champion")
            if prefect.proc is not None:
                stop_group(prefect.proc)
            mlflow.stop()
