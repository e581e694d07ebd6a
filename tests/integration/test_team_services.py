"""The team backends for real: MLflow on PostgreSQL with S3 (moto) artifacts, DVC on S3, a
Prefect server on PostgreSQL, and the finetune flow run against all of them together.

Services start once for this module (tests/support/services.py) on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from support.projects import small_project
from support.services import S3_ENV, S3, MlflowServer, Postgres, TeamStack, use_s3_dvc_remote
from tasks import layout, models, register, registry, versioning
from tasks.config import load_params

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def tree_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def save_tiny_adapter(params, out: Path) -> Path:
    """A real random:tiny LoRA adapter folder (safetensors + adapter_config.json + tokenizer)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = models.resolve(params.model)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(models.load_model(base), lora)
    model.save_pretrained(out, safe_serialization=True)
    models.load_tokenizer(base).save_pretrained(out)
    return out


@pytest.mark.timeout(90, func_only=True)  # services start in module setup, bounded by their own waits
def test_registry_round_trip_on_postgres_and_s3(mlflow_on_postgres: MlflowServer, postgres_db: Postgres, s3: S3,
                                                project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import mlflow
    from mlflow import MlflowClient

    # `models:/` URIs resolve through the registry URI, which follows MLFLOW_TRACKING_URI (as in production).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_on_postgres.url)
    assert mlflow.get_registry_uri() == mlflow_on_postgres.url

    adapter = save_tiny_adapter(load_params(project / "params.yaml"), tmp_path / "adapter")
    assert (adapter / "adapter_model.safetensors").is_file()
    client = MlflowClient(tracking_uri=mlflow_on_postgres.url)
    experiment = client.create_experiment("team-services-test")
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(adapter), "adapter")
    client.set_terminated(run.info.run_id)

    name = "peftflow-team-test"
    client.create_registered_model(name)
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", version.version)

    got = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}@champion",
                                                   dst_path=str(tmp_path / "download")))
    assert tree_digests(got) == tree_digests(adapter)

    # The metadata is in PostgreSQL and the bytes are in the S3 bucket, not on a local disk.
    assert postgres_db.query("mlflow", f"SELECT version FROM model_versions WHERE name = '{name}'") == [(1,)]
    assert postgres_db.query("mlflow", f"SELECT alias FROM registered_model_aliases WHERE name = '{name}'") \
        == [("champion",)]
    stored = [k for k in s3.keys("mlflow") if f"/{run.info.run_id}/" in k]
    assert {k.split("/artifacts/adapter/", 1)[1] for k in stored} == set(tree_digests(adapter))
    key = next(k for k in stored if k.endswith("adapter_model.safetensors"))
    body = s3.client().get_object(Bucket="mlflow", Key=key)["Body"].read()
    assert body == (adapter / "adapter_model.safetensors").read_bytes()


@pytest.mark.timeout(90, func_only=True)  # services start in module setup, bounded by their own waits
def test_dvc_push_pull_through_s3_remote(s3: S3, project: Path, monkeypatch: pytest.MonkeyPatch):
    for k, v in S3_ENV.items():  # credentials from the environment only, as in production
        monkeypatch.setenv(k, v)
    url = use_s3_dvc_remote(project, s3, prefix="push-pull")
    config = (project / ".dvc" / "config").read_text()
    assert url in config and s3.endpoint in config and S3_ENV["AWS_SECRET_ACCESS_KEY"] not in config

    data = project / "data" / "blob.bin"
    data.parent.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(300_000)
    data.write_bytes(payload)
    md5 = versioning.add(project, "data/blob.bin")
    assert md5 == hashlib.md5(payload).hexdigest()
    assert versioning.push(project, ["data/blob.bin"]) == 1
    # DVC 3 lays objects out as files/md5/<2 chars>/<rest> under the remote's prefix.
    assert s3.keys("dvc", "push-pull/") == [f"push-pull/files/md5/{md5[:2]}/{md5[2:]}"]

    # A fresh clone's view: no workspace file, no cache; `dvc pull` brings the bytes back from S3.
    data.unlink()
    subprocess.run(["rm", "-rf", str(project / ".dvc" / "cache")], check=True)
    pulled = subprocess.run([sys.executable, "-m", "dvc", "pull", "data/blob.bin"], cwd=project,
                            capture_output=True, text=True)
    assert pulled.returncode == 0, pulled.stderr
    assert data.read_bytes() == payload


@pytest.mark.timeout(90, func_only=True)
def test_mlflow_basic_auth_needs_the_credentials(mlflow_with_basic_auth: tuple[MlflowServer, str],
                                                 postgres_db: Postgres, monkeypatch: pytest.MonkeyPatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    server, password = mlflow_with_basic_auth
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert anonymous.value.code == 401

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password + "-wrong")
    with pytest.raises(MlflowException, match="401|[Uu]nauthori[sz]ed|credentials"):
        MlflowClient(tracking_uri=server.url).create_experiment("auth-denied")

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    MlflowClient(tracking_uri=server.url).create_experiment("auth-granted")
    # Users live in PostgreSQL too, in their own database.
    assert ("admin",) in postgres_db.query("mlflow_auth", "SELECT username FROM users")


FLOW = """
from prefect import flow

@flow(name="team-stack-probe")
def probe() -> int:
    return 42

assert probe() == 42
"""


@pytest.mark.timeout(90, func_only=True)
def test_prefect_server_on_postgres_records_flow_runs(team_stack: TeamStack, tmp_path: Path):
    env = {**os.environ, **team_stack.env(), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    ran = subprocess.run([sys.executable, "-c", FLOW], env=env, capture_output=True, text=True, timeout=80)
    assert ran.returncode == 0, ran.stderr[-3000:]
    rows = team_stack.postgres.query(
        "prefect", "SELECT fr.state_type FROM flow_run fr JOIN flow f ON f.id = fr.flow_id "
                   "WHERE f.name = 'team-stack-probe'")
    assert rows == [("COMPLETED",)]


@pytest.mark.timeout(900, func_only=True)
def test_finetune_flow_against_the_whole_team_stack(team_stack: TeamStack, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    """`python -m flows.finetune` with every backend a team runs (docs/operations.md): Prefect
    server on PostgreSQL, MLflow on PostgreSQL with S3 artifacts, the DVC remote on S3. Each
    service holds its part afterwards, and the registry round trip holds through the stack."""
    import torch
    from peft import PeftModel

    from support.adapters import logits

    project = small_project(tmp_path / "proj")
    team_stack.use_s3_dvc_remote(project, prefix="flow")
    env = {**os.environ, **team_stack.env(), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    ran = subprocess.run([sys.executable, "-m", "flows.finetune", "--params", str(project / "params.yaml")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=850)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    pg, params = team_stack.postgres, load_params(project / "params.yaml")

    # Prefect: the flow run and every stage's task run are in the server's PostgreSQL database.
    flow_runs = pg.query("prefect", "SELECT fr.id, fr.state_type FROM flow_run fr JOIN flow f ON f.id = fr.flow_id "
                                    "WHERE f.name = 'finetune'")
    assert [state for _, state in flow_runs] == ["COMPLETED"]
    task_runs = pg.query("prefect", f"SELECT name, state_type FROM task_run WHERE flow_run_id = '{flow_runs[0][0]}'")
    done = {name.split(" ·")[0] for name, state in task_runs if state == "COMPLETED"}
    assert {"ingest", "preprocess", "train", "evaluate", "merge", "register"} <= done, task_runs

    # MLflow: the version is in PostgreSQL, the adapter bytes in the S3 bucket.
    result = yaml.safe_load((project / layout.report("register")).read_text())
    name = params.register.model_name
    assert pg.query("mlflow", f"SELECT version FROM model_versions WHERE name = '{name}'") == [(1,)]
    assert pg.query("mlflow", f"SELECT status FROM runs WHERE run_uuid = '{result['run_id']}'") == [("FINISHED",)]
    stored = [k for k in team_stack.s3.keys("mlflow") if f"/{result['run_id']}/" in k]
    assert any(k.endswith("adapter_model.safetensors") for k in stored), stored

    # DVC: the ingested data is on the S3 remote, complete (stage outputs are rebuilt by `dvc repro`,
    # not pushed: the merged model alone is a full copy of the base).
    md5 = yaml.safe_load((project / layout.report("ingest")).read_text())["md5"]
    assert f"flow/files/md5/{md5[:2]}/{md5[2:]}" in team_stack.s3.keys("dvc", "flow/")
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "-c", "--json", f"{layout.RAW_DATA}.dvc"],
                            cwd=project, env=env, capture_output=True, text=True)
    assert status.returncode == 0 and yaml.safe_load(status.stdout or "{}") == {}, status.stdout + status.stderr

    # Round trip through the stack: the registered adapter gives the trained adapter's logits.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_stack.mlflow.url)
    loaded, tokenizer = registry.load_peft(f"models:/{name}/1", params, tmp_path / "download")
    base = models.load_model(models.resolve(params.model))
    trained = PeftModel.from_pretrained(base, str(project / layout.ADAPTER)).eval()
    diff = (logits(loaded, tokenizer) - logits(trained, tokenizer)).abs().max().item()
    assert diff <= 1e-5, diff
    assert torch.isfinite(logits(loaded, tokenizer)).all()
