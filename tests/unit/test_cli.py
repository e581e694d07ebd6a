"""tasks/cli.py: one table of process defaults (applied by the entry points, exported by the
Makefile) and one CLI error policy (a user error: one `error:` report, exit 2; a bug: traceback)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from tasks import cli
from tasks.errors import ConfigError, DataError


def test_defaults_fill_only_what_the_environment_does_not_set():
    environ = {"HF_HUB_OFFLINE": "0"}
    cli.apply_env_defaults(environ)
    assert environ == {**cli.ENV_DEFAULTS, "HF_HUB_OFFLINE": "0"}
    assert cli.ENV_DEFAULTS["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in cli.ENV_DEFAULTS}


def test_env_command_prints_the_missing_defaults_with_the_system_python_alone():
    # The Makefile runs it before .venv exists: nothing beyond the standard library may be imported.
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    env = {**_clean_env(), "DO_NOT_TRACK": "0", "PYTHONNOUSERSITE": "1"}
    out = subprocess.run([python, "-S", "-m", "tasks.cli", "env"], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines() == [f"{k}={v}" for k, v in cli.ENV_DEFAULTS.items() if k != "DO_NOT_TRACK"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_the_makefile_exports_the_defaults_and_a_value_already_set_wins():
    env = {**_clean_env(), "HF_HUB_OFFLINE": "0"}
    out = subprocess.run(["make", "-s", "--no-print-directory", "-f", str(REPO / "Makefile"),
                          "--eval", "peftflow-env: ; @env", "peftflow-env"], cwd="/", env=env, capture_output=True,
                         text=True, check=True).stdout
    exported = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert {k: exported.get(k) for k in cli.ENV_DEFAULTS} == {**cli.ENV_DEFAULTS, "HF_HUB_OFFLINE": "0"}


def test_a_user_error_is_one_error_report_and_exit_2(capsys):
    @cli.main_guard
    def main(argv=None) -> int:
        raise DataError("data/raw is empty; run `python -m tasks ingest`")

    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: data/raw is empty; run `python -m tasks ingest`\n" and captured.out == ""


def test_a_bug_keeps_its_traceback_and_a_normal_exit_passes_through():
    @cli.main_guard
    def broken(argv=None) -> int:
        raise KeyError("a bug")

    @cli.main_guard
    def fine(argv=None) -> int:
        return 1

    with pytest.raises(KeyError):
        broken()
    with pytest.raises(PermissionError):  # an OSError that is not a full disk is no user error
        cli.main_guard(lambda: (_ for _ in ()).throw(PermissionError(errno.EACCES, "denied")))()
    assert fine() == 1 and fine.__name__ == "fine"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT])
def test_a_full_disk_while_a_stage_writes_names_the_stage(code, capsys):
    @cli.main_guard
    def main() -> int:
        with cli.stage_outputs("merge"):
            raise OSError(code, os.strerror(code), "models/merged/model.safetensors")

    assert main() == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: merge: cannot write its outputs: {os.strerror(code)} "
                          f"(models/merged/model.safetensors). Free disk space") and err.count("\n") == 1


def test_the_stage_cli_reports_a_bad_params_file_through_the_policy(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  max_stepz: 3\n")
    out = subprocess.run([sys.executable, "-m", "tasks", "train", "--params", str(bad)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ") and "train.max_stepz: unknown key" in out.stderr


def test_a_config_error_message_is_kept_whole(capsys):
    @cli.main_guard
    def main() -> int:
        raise ConfigError("params.yaml: 2 invalid setting(s)\n  - a: bad\n  - b: bad")

    assert main() == 2
    assert capsys.readouterr().err == "error: params.yaml: 2 invalid setting(s)\n  - a: bad\n  - b: bad\n"


def test_flow_tasks_retry_no_user_error_but_the_declared_tracking_error():
    from prefect.states import Completed, Failed

    from flows import stages
    from tasks import tracking

    def retried(exc: BaseException) -> bool:
        return stages._retry_unless_user_error(None, None, Failed(data=exc))

    assert stages.RETRIED_USER_ERRORS == (tracking.TrackingError,)
    assert not retried(ConfigError("bad key")) and not retried(DataError("empty"))
    assert retried(tracking.TrackingError("MLflow is not reachable"))  # often transient: declared, retried
    assert retried(OSError(errno.EIO, "I/O error")) and retried(RuntimeError("crash"))
    assert stages._retry_unless_user_error(None, None, Completed(data=1))
