"""`register.approval: manual`: a version the gate would promote gets only `challenger`; the gate's
reason (what the run summary prints) says a person moves `champion`. Real embedded MLflow store."""

from __future__ import annotations

import pytest

from support.adapters import make_trained_project
from tasks import promote, register, tracking

pytestmark = pytest.mark.integration


def test_manual_approval_sets_only_challenger(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.ENV_RUN_ID, raising=False)
    # accuracy 0.9 vs a 0.5 base on 400 rows: the gate passes (as test_registry's gate-on case shows)
    params, _, _ = make_trained_project(tmp_path / "proj", accuracy=0.9,
                                        overrides={"register": {"approval": "manual"}})
    result = register.run(params)
    client = tracking.client(params)
    name = params.register.model_name
    assert promote.alias_version(client, name, promote.CHALLENGER) == result.version
    assert promote.alias_version(client, name, promote.CHAMPION) is None and not result.promoted
    assert "improvement confirmed" in result.reason and "register.approval is manual" in result.reason
    assert "champion is left for a person to move" in result.reason
