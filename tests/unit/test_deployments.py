"""prefect.yaml's deployments against the flows they name, without a server: every entrypoint
imports to a Prefect flow, and its parameters (and those its event triggers pass) are accepted by
that flow's own parameter validation. tests/integration/test_prefect_server.py deploys them for real."""

from __future__ import annotations

import importlib

import pytest
import yaml
from prefect import Flow

from conftest import REPO

DEPLOYMENTS = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]


def _flow(entrypoint: str) -> Flow:
    path, name = entrypoint.split(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_entrypoint_is_a_flow_that_accepts_the_deployment_parameters(deployment):
    flow = _flow(deployment["entrypoint"])
    assert isinstance(flow, Flow), deployment["entrypoint"]
    flow.validate_parameters(deployment.get("parameters", {}))  # unknown names or bad types raise
    for trigger in deployment.get("triggers", []):
        flow.validate_parameters(trigger.get("parameters", {}))


def test_sweep_deployment_runs_the_sweep_flow_without_promoting_by_default():
    (sweep,) = [d for d in DEPLOYMENTS if d["name"] == "sweep"]
    flow = _flow(sweep["entrypoint"])
    assert flow.name == "sweep"  # so `prefect deployment run sweep/sweep` (docs/operations.md)
    assert sweep["parameters"] == {"params": "params.yaml", "promote_best": False}
    assert sweep["work_pool"]["name"] == "peftflow-pool" and sweep["concurrency_limit"] == 1
