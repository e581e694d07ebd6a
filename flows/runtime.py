"""Process-level settings of the flow entry points, and the per-project lock.

Contract:
- `apply_env_defaults()`: offline, no telemetry, no pickle, stage loggers routed to Prefect
  (env defaults; a value the user already set wins). Call it before `prefect` is imported.
- `shared_api_url()`: an already running API to use: PREFECT_API_URL if set, else a local
  `prefect server start` answering on 127.0.0.1:4200 (`make prefect-ui`), else None.
- `prefect_api()`: context manager yielding the API URL for this process's flow runs: the shared
  one above, else the temporary local server another peftflow process on this machine started
  (same PREFECT_HOME), else one started here and published for the others. Its owner stops it
  only after every process using it has let go (it waits for them), so concurrent embedded runs
  share one server and one SQLite database instead of each starting its own.
- `run_flow(flow, kwargs, on_result) -> exit code`: call a flow against `prefect_api()`; a
  PeftflowError prints one line and returns 2; on success `on_result(return value)` and 0.
- `project_lock(root)`: an exclusive, cross-process lock of one project, held while a flow checks,
  runs and records a stage, so two flows on one checkout never interleave writes to the same DVC
  outputs, dvc.lock or the MLflow store (they take turns; the second then finds the stage current).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tasks.errors import PeftflowError

ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
    # Stage modules log with `logging.getLogger("tasks....")`; this sends those records to the
    # flow run's log in the Prefect UI as well as to the terminal.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks",
}
LOCAL_SERVER = "http://127.0.0.1:4200/api"
LOCK_FILE = Path(".dvc/tmp/peftflow-flow.lock")  # .dvc/tmp is git-ignored by DVC itself


def apply_env_defaults() -> None:
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _healthy(api_url: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def shared_api_url() -> str | None:
    """See the module docstring. Only loopback is probed; nothing is started here."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    return LOCAL_SERVER if _healthy(LOCAL_SERVER) else None


def _prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """See the module docstring. Files in PREFECT_HOME: peftflow-server.json (url, owner pid, server
    pid), .lock (held while joining or stopping), .users (a shared flock per process using it).
    A server whose owner died (kill -9) is adopted by the next process, which then stops it."""
    url = shared_api_url()
    if url:
        yield url
        return
    from prefect.server.api.server import SubprocessASGIServer

    home = _prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    info_path = home / "peftflow-server.json"
    with open(home / "peftflow-server.lock", "a") as election, open(home / "peftflow-server.users", "a") as users:
        server, orphan_pid = None, None
        fcntl.flock(election, fcntl.LOCK_EX)
        try:
            try:
                info = json.loads(info_path.read_text())
            except (OSError, ValueError):
                info = {}
            url = info.get("url")
            if url and _healthy(url, timeout=2.0):
                if not _alive(info.get("pid")):
                    orphan_pid = info.get("server_pid")
                    info_path.write_text(json.dumps({**info, "pid": os.getpid()}))
            else:
                server = SubprocessASGIServer()
                server.start(timeout=180)  # a cold start on a busy 2-core machine can take a minute
                url = server.api_url
                info_path.write_text(json.dumps({"url": url, "pid": os.getpid(),
                                                 "server_pid": server.server_process.pid}))
            fcntl.flock(users, fcntl.LOCK_SH)
        finally:
            fcntl.flock(election, fcntl.LOCK_UN)
        try:
            yield url
        finally:
            fcntl.flock(users, fcntl.LOCK_UN)
            if server is not None or orphan_pid:
                fcntl.flock(election, fcntl.LOCK_EX)  # nobody joins from now on
                try:
                    try:
                        fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        print(f"waiting for other flow runs using the Prefect server {url} to finish",
                              file=sys.stderr, flush=True)
                        fcntl.flock(users, fcntl.LOCK_EX)  # the processes still using it let go
                    info_path.unlink(missing_ok=True)
                    _drain_prefect_services()
                    if server is not None:
                        server.stop()
                    elif _alive(orphan_pid):
                        os.kill(orphan_pid, signal.SIGTERM)
                    fcntl.flock(users, fcntl.LOCK_UN)
                finally:
                    fcntl.flock(election, fcntl.LOCK_UN)


def _drain_prefect_services() -> None:
    """Deliver this process's pending logs, events and concurrency-slot releases before the server
    goes away (else their senders retry a dead address for about a minute at exit)."""
    from prefect._internal.concurrency.services import QueueService

    QueueService.drain_all(timeout=15)


def _exit_on_sigterm(signum, frame) -> None:
    # Prefect marks the run crashed, then hands SIGTERM on to this handler: unwinding (instead of
    # dying on the spot) lets prefect_api() stop the server it started.
    raise SystemExit(128 + signum)


def run_flow(flow: Callable[..., Any], kwargs: dict[str, Any], on_result: Callable[[Any], None]) -> int:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with prefect_api() as url, temporary_settings({PREFECT_API_URL: url}):
            result = flow(**kwargs)
    except PeftflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    on_result(result)
    return 0


@contextlib.contextmanager
def project_lock(root: Path) -> Iterator[None]:
    """Hold the project's flow lock (blocks until free; released on exit, crash or kill)."""
    path = Path(root) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # the kernel drops it when the process dies
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
