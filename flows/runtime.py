"""Process-level settings of the flow entry points, and the per-project lock.

Contract:
- `apply_env_defaults()`: offline, no telemetry, no pickle, stage loggers routed to Prefect
  (env defaults; a value the user already set wins). Call it before `prefect` is imported.
- `shared_api_url()`: the Prefect API every run of this machine should share: PREFECT_API_URL if
  set, else a local `prefect server start` answering on 127.0.0.1:4200 (`make prefect-ui`), else
  None (Prefect then starts its temporary per-process server on the SQLite file in PREFECT_HOME).
- `run_flow(flow, kwargs, on_result) -> exit code`: call a flow against `shared_api_url()`; a
  PeftflowError prints one line and returns 2; on success `on_result(return value)` and 0.
- `project_lock(root)`: an exclusive, cross-process lock of one project, held while a flow checks,
  runs and records a stage, so two flows on one checkout never interleave writes to the same DVC
  outputs, dvc.lock or the MLflow store (they take turns; the second then finds the stage current).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
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


def run_flow(flow: Callable[..., Any], kwargs: dict[str, Any], on_result: Callable[[Any], None]) -> int:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = shared_api_url()
    settings = temporary_settings({PREFECT_API_URL: url}) if url else contextlib.nullcontext()
    try:
        with settings:
            result = flow(**kwargs)
    except PeftflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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
