"""DPO through the finetune flow into the registry (real Prefect, MLflow, DVC; tiny model): the
version records the objective, the gate decides on preference_accuracy, and a second DPO run
starting from that registered version (`train.init_adapter: models:/<name>/1`) downloads it
hash-checked and records it in the train report and the lineage tags."""

from __future__ import annotations

import json

import pytest
import yaml

from support.projects import dvc_status, registered_versions
from support.preference import pair_source_project
from tasks import layout, tracking
from tasks.config import load_params

pytestmark = pytest.mark.integration

FAST = {"train": {"max_steps": 2, "save_steps": 2}, "merge": {"parity_samples": 1}, "evaluate": {"max_samples": 8}}


def test_dpo_runs_through_the_flow_into_the_registry_and_seeds_a_second_run(prefect_api, tmp_path):
    from flows.finetune import finetune

    project = pair_source_project(tmp_path / "pairs", FAST)
    first = finetune(params=str(project / "params.yaml"))
    assert first["version"] == "1" and first["registered_new"] is True
    assert dvc_status(project) == {}
    params = load_params(project / "params.yaml")
    evaluation = json.loads((project / layout.report("evaluate")).read_text())
    assert evaluation["format"] == "preference" and evaluation["base"]["reward_margin"] == 0.0
    assert {"preference_accuracy", "reward_margin"} <= set(evaluation["intervals"]["lift"])
    client = tracking.client(params)
    mv = client.get_model_version(params.register.model_name, "1")
    lineage = client.get_run(mv.run_id).data.tags  # the lineage tags (tasks/lineage.py) of the version's run
    assert lineage["train.objective"] == "dpo" and "train.init_adapter" not in lineage
    assert mv.tags["peftflow.gate.promote"] in ("true", "false")
    assert "preference_accuracy" in mv.tags["peftflow.gate.reason"]

    data = yaml.safe_load((project / "params.yaml").read_text())
    data["train"].update({"init_adapter": f"models:/{params.register.model_name}/1", "max_steps": 1,
                          "save_steps": 1})
    (project / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    second = finetune(params=str(project / "params.yaml"))
    assert second["version"] == "2" and registered_versions(project) == ["1", "2"]
    train = json.loads((project / layout.report("train")).read_text())
    assert train["init_adapter_sha256"] == mv.tags["adapter.sha256"]
    tags = client.get_run(client.get_model_version(params.register.model_name, "2").run_id).data.tags
    assert tags["train.init_adapter"] == f"models:/{params.register.model_name}/1"
    assert tags["train.init_adapter_sha256"] == mv.tags["adapter.sha256"]
