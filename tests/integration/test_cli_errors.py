"""A user error through a flow CLI reads as one `error:` report on the terminal, exit 2.

Each flow CLI runs once, in its own process, on a params file with a typo, against one shared
real Prefect server: the terminal shows Prefect's run lines and the error, no traceback and no
repeat of the error; the flow run's log in Prefect keeps the traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration

TYPO = "max_stepz"
CLIS = {  # flow CLI -> its arguments besides --params
    "flows.finetune": [],
    "flows.retrain": [],
    "flows.promote": ["1"],
}


@pytest.fixture
def bad_params(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text().replace("  max_steps:", f"  {TYPO}:", 1))
    assert TYPO in path.read_text()
    return path


def _flow_run_logs(flow_name: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                    sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        return [log.message for log in client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[run.id])))]


@pytest.mark.parametrize("module", CLIS)
def test_a_user_error_prints_one_error_report_and_exits_2(module, bad_params, prefect_api):  # noqa: F811
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    out = subprocess.run([sys.executable, "-m", module, *CLIS[module], "--params", str(bad_params)], cwd=REPO,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    lines = out.stdout.strip().splitlines()
    print(out.stdout)
    assert out.returncode == 2, out.stdout[-3000:]
    assert "Traceback" not in out.stdout and out.stdout.count(TYPO) == 1, out.stdout[-3000:]
    error = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert lines[error:] == [f"error: {bad_params}: 1 invalid setting(s)",
                             f"  - train.{TYPO}: unknown key (check the spelling; see docs/params.md for every key)"]
    # before it only Prefect's lines of the run: its start and its link in the UI
    assert len(lines[:error]) <= 2, out.stdout
    # the Prefect UI still has the whole story
    logs = "\n".join(_flow_run_logs(module.split(".")[1]))
    assert "Traceback" in logs and TYPO in logs
