"""Real team services for integration tests, all on 127.0.0.1: PostgreSQL, a moto S3 server, an
MLflow server (PostgreSQL backend store + S3 artifacts) and a Prefect server on PostgreSQL.

The same shapes as docker/compose.yaml, without a Docker engine: each service is the real program,
started on a free port in a temporary folder and stopped (and the folder removed) on exit.

Starters (context managers, usable outside pytest):
- `postgres()` -> Postgres: a fresh cluster (initdb + pg_ctl), password auth, databases `mlflow`,
  `mlflow_auth` (basic-auth users) and `prefect`. As root it runs as the `postgres` system user
  (initdb refuses root).
- `s3_server()` -> S3: `moto_server` with buckets `mlflow` and `dvc`; any credentials are accepted.
- `mlflow_server(pg, s3, admin_password=None)` -> MlflowServer: `mlflow server` on pg's `mlflow`
  database with `--artifacts-destination s3://mlflow/` (artifacts proxied, so clients need no S3
  credentials); with `admin_password`, the basic-auth app.
- `prefect_server(pg)` -> PrefectServer: `prefect server start` on pg's `prefect` database.

Fixtures (module-scoped, so a test module starts each service once; tests/conftest.py provides
them to every test): `postgres_db`, `s3`, `mlflow_on_postgres`, `mlflow_with_basic_auth`, and
`team_stack` (all four; `TeamStack.env()` is the environment a finetune flow run needs to use
them, `TeamStack.use_s3_dvc_remote(project)` points the project's DVC at the S3 server); and
`prefect_api`, Prefect's temporary test server (in this process's settings; a subprocess gets it
through PREFECT_API_URL = `prefect.settings.PREFECT_API_URL.value()`).

Helpers: `free_port()`, `wait_http(url, timeout_s, proc, log)`, `stop_group(proc)` (SIGTERM, then
SIGKILL, to the process group of a server started with `start_new_session=True`), `MLFLOW` (this
venv's mlflow program).

Missing programs (Debian's postgresql, requirements-services.lock) skip with the install command;
`scripts/ci-setup.sh` installs both, so CI runs these tests. A service that does not come up
raises ServiceError with the tail of its log.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
MLFLOW = BIN / "mlflow"
INSTALL_HINT = "install with `bash scripts/ci-setup.sh` (CI does)"
# moto accepts any credentials; these name the fake account in logs.
S3_ENV = {"AWS_ACCESS_KEY_ID": "peftflow-test", "AWS_SECRET_ACCESS_KEY": "peftflow-test-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}
BUCKETS = ("mlflow", "dvc")


class ServiceError(RuntimeError):
    """A service did not start; the message ends with the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """`predicate()`'s first truthy value, polled every `interval` s; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None,
              headers: dict[str, str] | None = None) -> None:
    """Poll `url` until it answers 200; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered:\n"
                               f"{_tail(log) if log else ''}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=3) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise ServiceError(f"{url} did not answer within {timeout_s:.0f} s:\n{_tail(log) if log else ''}")


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a server we started in its own session (its workers included)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


@contextlib.contextmanager
def _process(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Run `cmd` in its own process group (servers fork workers); stop the group on exit."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=5)  # test servers hold nothing worth a slow shutdown
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                proc.wait(timeout=5)


# --- PostgreSQL -------------------------------------------------------------------------------

def pg_bindir() -> Path | None:
    """Folder of Debian's PostgreSQL server programs (newest major version), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).resolve().parent if on_path else None


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str
    password: str
    datadir: Path

    def url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        """SQLAlchemy URL, e.g. driver="postgresql+asyncpg" for Prefect. The driver is explicit:
        SQLAlchemy 2.1 maps a bare `postgresql://` to psycopg 3, which is not installed."""
        return f"{driver}://{self.user}:{self.password}@{HOST}:{self.port}/{database}"

    def query(self, database: str, sql: str) -> list[tuple]:
        import psycopg2

        with contextlib.closing(psycopg2.connect(host=HOST, port=self.port, user=self.user,
                                                 password=self.password, dbname=database)) as conn:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()


@contextlib.contextmanager
def postgres(databases: tuple[str, ...] = ("mlflow", "mlflow_auth", "prefect")) -> Iterator[Postgres]:
    bindir = pg_bindir()
    if bindir is None:
        raise FileNotFoundError(f"PostgreSQL server programs not found (Debian package postgresql); {INSTALL_HINT}")
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise FileNotFoundError("running as root and no `postgres` system user to run the server as; "
                                    f"{INSTALL_HINT}") from None
        as_user = ["runuser", "-u", "postgres", "--"]
    # Not under pytest's tmp_path: that is mode 0700 for root, which the postgres user cannot enter.
    base = Path(tempfile.mkdtemp(prefix="peftflow-pg-"))
    pg = Postgres(port=free_port(), user="peftflow", password=secrets.token_hex(8), datadir=base / "data")
    pwfile, log = base / "pwfile", base / "postgres.log"
    pwfile.write_text(pg.password + "\n")
    if owner:
        for p in (base, pwfile):
            os.chown(p, owner.pw_uid, owner.pw_gid)
        log.touch()
        os.chown(log, owner.pw_uid, owner.pw_gid)
    env = {"LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    try:
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(pg.datadir), "-U", pg.user,
                        f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, env={**os.environ, **env})
        # fsync off: a test cluster trades durability for speed on a shared 2-core machine.
        opts = f"-c listen_addresses={HOST} -p {pg.port} -k {base} -c fsync=off -c full_page_writes=off"
        started = subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(pg.datadir), "-l", str(log),
                                  "-o", opts, "-w", "-t", "60", "start"], capture_output=True, text=True,
                                 env={**os.environ, **env})
        if started.returncode != 0:
            raise ServiceError(f"pg_ctl start failed: {started.stderr}\n{_tail(log)}")
        try:
            for db in databases:
                subprocess.run([str(bindir / "createdb"), "-h", HOST, "-p", str(pg.port), "-U", pg.user, db],
                               check=True, capture_output=True, env={**os.environ, "PGPASSWORD": pg.password})
            yield pg
        finally:
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(pg.datadir), "-m", "fast", "-w",
                            "stop"], capture_output=True, env={**os.environ, **env})
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- S3 (moto server) -------------------------------------------------------------------------

@dataclass(frozen=True)
class S3:
    endpoint: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=S3_ENV["AWS_DEFAULT_REGION"],
                            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"])

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@contextlib.contextmanager
def s3_server(buckets: tuple[str, ...] = BUCKETS) -> Iterator[S3]:
    exe = BIN / "moto_server"
    if not exe.exists():
        raise FileNotFoundError(f"{exe} not found (moto[server] from requirements-services.lock); {INSTALL_HINT}")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="peftflow-s3-") as tmp:
        log = Path(tmp) / "moto.log"
        with _process([str(exe), "-H", HOST, "-p", str(port)], log) as proc:
            s3 = S3(endpoint=f"http://{HOST}:{port}")
            wait_http(f"{s3.endpoint}/moto-api/", 30, proc, log)
            for bucket in buckets:
                s3.client().create_bucket(Bucket=bucket)
            yield s3


# --- MLflow server ----------------------------------------------------------------------------

@dataclass(frozen=True)
class MlflowServer:
    url: str


@contextlib.contextmanager
def mlflow_server(pg: Postgres, s3: S3, bucket: str = "mlflow",
                  admin_password: str | None = None) -> Iterator[MlflowServer]:
    """With `admin_password`: the basic-auth app (`--app-name basic-auth`), its user store in pg's
    `mlflow_auth` database and an `admin` user with that password (docs/operations.md)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="peftflow-mlflow-") as tmp:
        log = Path(tmp) / "mlflow.log"
        cmd = [str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(port), "--workers", "1",
               "--backend-store-uri", pg.url("mlflow"), "--artifacts-destination", f"s3://{bucket}/"]
        env = {**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}
        headers = {}
        if admin_password:
            ini = Path(tmp) / "basic_auth.ini"
            ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {pg.url('mlflow_auth')}\n"
                           "admin_username = admin\n"
                           "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
            cmd += ["--app-name", "basic-auth"]
            env |= {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
                    "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
            headers = {"Authorization": "Basic " + base64.b64encode(f"admin:{admin_password}".encode()).decode()}
        with _process(cmd, log, env) as proc:
            server = MlflowServer(url=f"http://{HOST}:{port}")
            # First start migrates the schema into PostgreSQL: ~20-40 s on a busy 2-core machine.
            wait_http(f"{server.url}/health", 120, proc, log, headers)
            yield server


# --- Prefect server ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PrefectServer:
    api_url: str


@contextlib.contextmanager
def prefect_server(pg: Postgres) -> Iterator[PrefectServer]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="peftflow-prefect-") as tmp:
        log = Path(tmp) / "prefect.log"
        env = {"PREFECT_HOME": str(Path(tmp) / "home"),
               "PREFECT_API_DATABASE_CONNECTION_URL": pg.url("prefect", "postgresql+asyncpg"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
               "PREFECT_UI_ENABLED": "false"}
        with _process([str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(port)],
                      log, env) as proc:
            server = PrefectServer(api_url=f"http://{HOST}:{port}/api")
            wait_http(f"{server.api_url}/health", 120, proc, log)
            yield server


# --- pytest fixtures --------------------------------------------------------------------------

def _start(cm):
    """Enter a starter's context; a missing program skips (with the install command)."""
    try:
        return cm.__enter__()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def postgres_db() -> Iterator[Postgres]:
    cm = postgres()
    yield _start(cm)
    cm.__exit__(None, None, None)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    cm = s3_server()
    yield _start(cm)
    cm.__exit__(None, None, None)


@pytest.fixture(scope="module")
def mlflow_on_postgres(postgres_db: Postgres, s3: S3) -> Iterator[MlflowServer]:
    with mlflow_server(postgres_db, s3) as server:
        yield server


@pytest.fixture(scope="module")
def mlflow_with_basic_auth(postgres_db: Postgres, s3: S3) -> Iterator[tuple[MlflowServer, str]]:
    """(server, admin password): MLflow's basic-auth app on the same PostgreSQL and S3."""
    password = secrets.token_hex(12)
    with mlflow_server(postgres_db, s3, admin_password=password) as server:
        yield server, password


@dataclass(frozen=True)
class TeamStack:
    postgres: Postgres
    s3: S3
    mlflow: MlflowServer
    prefect: PrefectServer

    def env(self) -> dict[str, str]:
        """Environment for a finetune flow run against this stack (what compose gives its jobs)."""
        return {**S3_ENV, "MLFLOW_TRACKING_URI": self.mlflow.url, "PREFECT_API_URL": self.prefect.api_url,
                "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint}

    def use_s3_dvc_remote(self, project: Path, name: str = "s3", prefix: str = "store") -> str:
        """Make an S3 remote on this stack's endpoint the project's default DVC remote."""
        return use_s3_dvc_remote(project, self.s3, name=name, prefix=prefix)


def use_s3_dvc_remote(project: Path, s3: S3, name: str = "s3", prefix: str = "store") -> str:
    """`dvc remote add -d <name> s3://dvc/<prefix>` + endpointurl: the one switch docs/operations.md
    describes. Credentials stay in the environment (S3_ENV), never in .dvc/config."""
    url = f"s3://dvc/{prefix}"
    for args in (["remote", "add", "-d", "-f", name, url], ["remote", "modify", name, "endpointurl", s3.endpoint]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, check=True, capture_output=True)
    return url


@pytest.fixture(scope="module")
def team_stack(postgres_db: Postgres, s3: S3, mlflow_on_postgres: MlflowServer) -> Iterator[TeamStack]:
    """PostgreSQL + S3 + MLflow + Prefect (on PostgreSQL): for the finetune-flow-against-all-services
    test. Apply `stack.env()` to the flow's process (monkeypatch.setenv or a subprocess env)."""
    with prefect_server(postgres_db) as prefect:
        yield TeamStack(postgres_db, s3, mlflow_on_postgres, prefect)


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_HOME: tmp_path_factory.mktemp("prefect-home")}):
        with prefect_test_harness(server_startup_timeout=120):
            yield
