"""docker/ checked as far as a machine without a Docker engine allows: hadolint on the Dockerfiles,
`docker-compose config` on the compose file, and the pins in the images against the lock files.

hadolint (requirements-services.lock) and docker-compose (Debian) come from scripts/ci-setup.sh;
without them the tool tests skip saying so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "mlflow.Dockerfile"]
COMPOSE = DOCKER / "compose.yaml"
SECRETS = {"POSTGRES_PASSWORD": "pg-secret", "MINIO_ROOT_USER": "peftflow", "MINIO_ROOT_PASSWORD": "minio-secret",
           "PREFECT_AUTH_STRING": "admin:prefect-secret", "PEFTFLOW_WEBHOOK_SECRET": "webhook-secret",
           "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": "a-fernet-key"}
INSTALL_HINT = "install it with `bash scripts/ci-setup.sh` (CI does)"

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        pytest.skip(f"{name} is not installed; {INSTALL_HINT}")
    return found


def compose(tmp_path: Path, *args: str, secrets: dict[str, str] = SECRETS) -> subprocess.CompletedProcess:
    # An empty env file and a scrubbed environment: a developer's docker/.env must not decide the result.
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith(("PEFTFLOW_", "MLFLOW_"))}
    return subprocess.run([tool("docker-compose"), "-f", str(COMPOSE), "--env-file", str(env_file), *args],
                          env={**env, **secrets}, capture_output=True, text=True, timeout=60)


def test_hadolint_passes_on_every_dockerfile():
    out = subprocess.run([tool("hadolint"), *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_file_is_valid(tmp_path: Path):
    out = compose(tmp_path, "config", "-q")
    assert out.returncode == 0, out.stderr


def test_compose_refuses_to_start_without_secrets(tmp_path: Path):
    for name in SECRETS:
        out = compose(tmp_path, "config", "-q", secrets={k: v for k, v in SECRETS.items() if k != name})
        assert out.returncode != 0 and name in out.stderr, (name, out.stderr)


def test_resolved_stack_wires_the_services(tmp_path: Path):
    out = compose(tmp_path, "--profile", "train", "config")
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert set(services) == {"postgres", "minio", "create-buckets", "mlflow", "prefect-server", "prefect-worker",
                             "train", "webhook-receiver", "register-webhook", "deploy-worker"}
    for name, svc in services.items():
        tag = svc["image"].rsplit(":", 1)
        assert len(tag) == 2 and tag[1] != "latest", f"{name}: image {svc['image']} is not pinned to a tag"
        for port in svc.get("ports", []):  # compose v1 keeps "ip:host:container"; v2 writes a mapping
            host_ip = port.get("host_ip") if isinstance(port, dict) else port.split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"
    for name in ("train", "prefect-worker"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}], name
        env = services[name]["environment"]
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["PREFECT_API_AUTH_STRING"] == SECRETS["PREFECT_AUTH_STRING"]
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert f"postgresql+psycopg2://peftflow:{SECRETS['POSTGRES_PASSWORD']}@postgres:5432/mlflow" in mlflow_cmd
    assert "--artifacts-destination=s3://mlflow/" in mlflow_cmd
    assert services["mlflow"]["depends_on"]["create-buckets"]["condition"] == "service_completed_successfully"
    prefect_db = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and prefect_db.endswith("@postgres:5432/prefect")
    assert services["train"]["profiles"] == ["train"]
    # an alias move deploys: the receiver holds the webhook secret, MLflow the key that encrypts it
    assert services["webhook-receiver"]["environment"]["PEFTFLOW_WEBHOOK_SECRET"] == SECRETS["PEFTFLOW_WEBHOOK_SECRET"]
    assert "ports" not in services["webhook-receiver"]  # reached by MLflow on the compose network only
    assert services["mlflow"]["environment"]["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"] == "a-fernet-key"
    assert services["deploy-worker"]["command"][-3:] == ["peftflow-serving", "--type", "process"]


def pins(text: str) -> dict[str, str]:
    return {m[0].lower(): m[1] for m in re.findall(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)", text, re.M)}


def test_images_install_exactly_the_locked_versions():
    """Every `pkg==ver` in a Dockerfile equals the pin in requirements*.lock or the Makefile."""
    locked = {**pins((REPO / "requirements.lock").read_text()),
              **pins((REPO / "requirements-services.lock").read_text())}
    makefile = {k.lower(): v
                for k, v in re.findall(r"([A-Za-z0-9_.\-]+)==([0-9][^\s']*)", (REPO / "Makefile").read_text())}
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        for name, version in re.findall(r"\s([A-Za-z][A-Za-z0-9_.\-]*)==([0-9][^\s\\]*)", text):
            expected = locked.get(name.lower()) or makefile.get(name.lower())
            assert expected == version, f"{dockerfile.name}: {name}=={version}, lock/Makefile say {expected}"
        assert re.search(r"^FROM \S+:\S+", text, re.M) and ":latest" not in text, f"{dockerfile.name}: base tag"


def test_images_run_as_non_root():
    for dockerfile in DOCKERFILES:
        users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), re.M)
        assert users and users[-1] not in ("root", "0"), f"{dockerfile.name} ends as {users[-1:] or 'root'}"
