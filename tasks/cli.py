"""Process set-up and error policy of every peftflow command line (`python -m tasks`, `python -m flows.*`).

Contract:
- `ENV_DEFAULTS`: the one table of process defaults: offline, no telemetry, no pickle, one
  tokenizer thread pool, no MLflow job runners, stage loggers routed to Prefect. The Makefile
  exports it (`python3 -m tasks.cli env`), the flow and stage entry points and the tests apply it.
- `apply_env_defaults(environ=os.environ)`: sets each default the environment does not set yet (a
  value the user set wins). Call it before prefect, transformers or mlflow are imported: they read
  the environment at import.
- `main_guard(main)`: decorator for a CLI's `main(argv) -> int`. A user error (`user_error(exc)`
  is not None: a PeftflowError, or a full disk / quota / file-size limit) prints
  `error: <message>` to stderr and returns 2, without a traceback; anything else is a bug and
  keeps its traceback.
- `stage_outputs(stage)`: context manager; a full disk while `stage` writes becomes an
  OutputsNotWritten naming the stage (its outputs are written atomically: the old ones are whole).
- `python -m tasks.cli env`: prints `KEY=VALUE` for each default the environment does not set.

Nothing here imports more than the standard library: the Makefile runs it before .venv exists.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sys
from collections.abc import Callable, Iterator, MutableMapping

from tasks.errors import PeftflowError

ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Registered models load from code and safetensors; nothing of ours is a pickle.
    "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
    # mlflow server otherwise starts ~8 huey job-runner processes we never use (2 CPU cores in CI).
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    # Stage modules log with `logging.getLogger("tasks....")`; this sends those records to the
    # flow run's log in the Prefect UI as well as to the terminal.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks",
}
DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


class OutputsNotWritten(PeftflowError):
    """A stage could not write its outputs: disk full, quota or file-size limit (the user's to fix)."""


def apply_env_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    for key, value in ENV_DEFAULTS.items():
        environ.setdefault(key, value)


def _disk_full_message(err: OSError, what: str) -> str:
    return (f"{what}: {err.strerror or err} ({err.filename or 'an output file'}). Free disk space (or raise "
            f"the quota/file-size limit) and run it again; the previous outputs are unchanged.")


def user_error(exc: BaseException) -> str | None:
    """The one-line-worthy message of a user error, or None when `exc` is a bug (or not an error)."""
    if isinstance(exc, PeftflowError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return _disk_full_message(exc, "cannot write the outputs")
    return None


def main_guard(main: Callable[..., int]) -> Callable[..., int]:
    """See the module docstring."""

    @functools.wraps(main)
    def guarded(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except (PeftflowError, OSError) as err:
            message = user_error(err)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            return 2

    return guarded


@contextlib.contextmanager
def stage_outputs(stage: str) -> Iterator[None]:
    """See the module docstring."""
    try:
        yield
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        raise OutputsNotWritten(_disk_full_message(err, f"{stage}: cannot write its outputs")) from None


def _print_missing_defaults() -> int:
    for key, value in ENV_DEFAULTS.items():
        if key not in os.environ:
            print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["env"]:
        sys.exit("usage: python3 -m tasks.cli env   (prints the process defaults the environment does not set)")
    sys.exit(_print_missing_defaults())
