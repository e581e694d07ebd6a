"""Process-level settings of the flow entry points, and the per-project lock.

Contract (the process defaults, `apply_env_defaults()`, and the CLI error policy live in tasks/cli.py):
- `shared_api_url()`: an already running API to use: PREFECT_API_URL if set, else a local
  `prefect server start` answering on 127.0.0.1:4200 (`make prefect-ui`), else None.
- `prefect_api()`: context manager yielding the API URL for this process's flow runs: the shared
  one above, else the temporary local server another peftflow process on this machine started
  (same PREFECT_HOME), else one started here and published for the others. Its owner stops it
  only after every process using it has let go (it waits for them), so concurrent embedded runs
  share one server and one SQLite database instead of each starting its own.
- `run_flow(flow, kwargs) -> the flow's return value`: call a flow against `prefect_api()`. A user
  error (tasks.cli.user_error) is raised on, for the CLI's `main_guard` to report in one line:
  while the flow runs, Prefect's records of it (the exception with its traceback, then the run's
  "Finished in state Failed") stay off the terminal; they still reach the Prefect UI.
- Quiet by default (`run_flow(..., verbose=False)`; `--verbose` on the flow CLIs, `make run
  VERBOSE=1` or PEFTFLOW_VERBOSE=1 for everything): the terminal gets Prefect's task lines (not the
  "Finished in state Completed()" ones), one progress bar per long step (training, evaluation,
  GGUF conversion) and the summary. Python warnings and the libraries' loggers (transformers,
  datasets, mlflow, peft, ...) go to `<project>/.dvc/tmp/peftflow.log`; their row-by-row bars
  (dataset saving, weight loading, artifact downloads) and the Trainer's per-step dicts are off
  (the per-step log is in reports/train_log.csv and MLflow).
- `project_lock(root)`: an exclusive, cross-process lock of one project, held while a flow checks,
  runs and records a stage, so two flows on one checkout never interleave writes to the same DVC
  outputs, dvc.lock or the MLflow store (they take turns; the second then finds the stage current).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tasks import cli

LOCAL_SERVER = "http://127.0.0.1:4200/api"
LOCK_FILE = Path(".dvc/tmp/peftflow-flow.lock")  # .dvc/tmp is git-ignored by DVC itself
LOG_FILE = Path(".dvc/tmp/peftflow.log")  # what quiet mode keeps off the terminal
ENV_VERBOSE = "PEFTFLOW_VERBOSE"  # "1": everything on the terminal (read by tasks/trainers.py too)
# Set before the libraries are imported (they read them at import): row-by-row bars off.
QUIET_ENV = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_CONFIGURE_LOGGING": "false"}
LIBRARY_LOGGERS = ("py.warnings", "transformers", "datasets", "mlflow", "peft", "huggingface_hub", "accelerate",
                   "torch", "alembic", "urllib3", "git", "dvc")


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


class _UserErrorsOffTheTerminal(logging.Filter):
    """Drops, on a console handler, Prefect's records of a run that failed with a user error: the
    one carrying the exception (and its traceback) and that run's "Finished in state" after it."""

    def __init__(self) -> None:
        super().__init__()
        self._failed: set[str] = set()  # task or flow run ids

    def filter(self, record: logging.LogRecord) -> bool:
        run = getattr(record, "task_run_id", None) or getattr(record, "flow_run_id", None)
        if record.exc_info and record.exc_info[1] is not None and cli.user_error(record.exc_info[1]) is not None:
            self._failed.add(str(run))
            return False
        return not (str(run) in self._failed and record.getMessage().startswith("Finished in state"))


@contextlib.contextmanager
def _console_filter(record_filter: logging.Filter, enabled: bool = True) -> Iterator[None]:
    """`record_filter` on Prefect's terminal handlers while the block runs (the UI still gets every record)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    consoles = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)] if enabled else []
    for handler in consoles:
        handler.addFilter(record_filter)
    try:
        yield
    finally:
        for handler in consoles:
            handler.removeFilter(record_filter)


class _CompletedOffTheTerminal(logging.Filter):
    """Quiet mode: a run's "Finished in state Completed()" adds nothing to the line before it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Finished in state Completed")


def add_verbose_flag(parser) -> None:
    """`--verbose` on a flow CLI's argparse parser (pass `args.verbose` to run_flow)."""
    parser.add_argument("--verbose", action="store_true", help="everything on the terminal: library warnings and "
                        f"logs, every progress bar, the trainer's per-step dicts (default: in <project>/{LOG_FILE})")


def verbose_requested(flag: bool = False) -> bool:
    """--verbose, or PEFTFLOW_VERBOSE=1 (`make run VERBOSE=1`)."""
    return flag or os.environ.get(ENV_VERBOSE) == "1"


def quiet_libraries(log_file: Path) -> None:
    """Keep library chatter off the terminal (see the module docstring); call before a flow runs."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    import datasets.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_default_handler()  # its own stderr handler, set at import
    datasets.utils.logging.get_logger().handlers.clear()  # likewise
    logging.captureWarnings(True)  # warnings.warn -> the `py.warnings` logger
    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        lib.handlers[:] = [handler]
        lib.propagate = False  # else the root logger's console handler prints them too
        lib.setLevel(logging.WARNING)  # what reached the terminal before: warnings and errors


def run_flow(flow: Callable[..., Any], kwargs: dict[str, Any], verbose: bool = False) -> Any:
    """See the module docstring. `kwargs["params"]` names the project (its folder holds the log)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    verbose = verbose_requested(verbose)
    if verbose:
        os.environ[ENV_VERBOSE] = "1"  # training workers and stage code see it too
    else:
        quiet_libraries(Path(kwargs.get("params") or "params.yaml").resolve().parent / LOG_FILE)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with prefect_api() as url, temporary_settings({PREFECT_API_URL: url}), \
                _console_filter(_UserErrorsOffTheTerminal()), \
                _console_filter(_CompletedOffTheTerminal(), enabled=not verbose):
            return flow(**kwargs)
    finally:
        signal.signal(signal.SIGTERM, previous)


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
