"""The deploy's pure checks: webhook verification against MLflow's own signing code, and which
adapters the vLLM target refuses."""

from __future__ import annotations

import json
import time

import pytest

from tasks import deploy_webhook, vllm_target
from tasks.deploy_smoke import DeployError

BODY = json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "t",
                   "data": {"name": "m", "alias": "champion", "version": "3"}})


def mlflow_headers(secret: str, body: str = BODY, delivery: str = "d-1", ts: int | None = None) -> dict:
    """Headers exactly as MLflow's delivery code signs them (mlflow/webhooks/delivery.py)."""
    from mlflow.webhooks.delivery import _generate_hmac_signature

    ts = str(int(time.time()) if ts is None else ts)
    return {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": ts,
            "X-MLflow-Signature": _generate_hmac_signature(secret, delivery, ts, body)}


def test_a_genuine_delivery_is_accepted_once():
    v = deploy_webhook.Verifier("s3cret")
    payload = v.verify(mlflow_headers("s3cret"), BODY.encode())
    assert deploy_webhook.alias_move(payload) == ("m", "champion", "3")
    with pytest.raises(deploy_webhook.Refused, match="replayed"):
        v.verify(mlflow_headers("s3cret"), BODY.encode())


@pytest.mark.parametrize("headers, why", [
    ({}, "unsigned"),
    (mlflow_headers("other"), "wrong signature"),
    (mlflow_headers("s3cret", ts=int(time.time()) - 3600), "stale"),
    (mlflow_headers("s3cret", ts=int(time.time()) + 3600), "stale"),
])
def test_bad_deliveries_are_refused(headers, why):
    with pytest.raises(deploy_webhook.Refused, match=why):
        deploy_webhook.Verifier("s3cret").verify(headers, BODY.encode())


def test_a_changed_body_breaks_the_signature_and_no_secret_refuses_all():
    headers = mlflow_headers("s3cret")
    with pytest.raises(deploy_webhook.Refused, match="wrong signature"):
        deploy_webhook.Verifier("s3cret").verify(headers, BODY.replace('"3"', '"4"').encode())
    with pytest.raises(deploy_webhook.Refused, match="PEFTFLOW_WEBHOOK_SECRET"):
        deploy_webhook.Verifier("")


def test_other_events_are_not_alias_moves():
    assert deploy_webhook.alias_move({"entity": "model_version", "action": "created", "data": {}}) is None


@pytest.mark.parametrize("config, why", [
    ({"peft_type": "PROMPT_TUNING"}, "LoRA adapters only"),
    ({"peft_type": "LORA", "r": 8, "use_dora": True}, "DoRA"),
    ({"peft_type": "LORA", "r": 8, "modules_to_save": ["score"]}, "modules_to_save"),
    ({"peft_type": "LORA", "r": 32}, "rank 32 exceeds"),
    ({"peft_type": "LORA", "r": 8, "rank_pattern": {"q_proj": 64}}, "rank 64 exceeds"),
])
def test_vllm_refuses_what_it_cannot_serve(tmp_path, config, why):
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(DeployError, match=why):
        vllm_target.check_fits(tmp_path, max_rank=16)


def test_vllm_takes_plain_lora_within_the_rank(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "use_rslora": True}))
    assert vllm_target.check_fits(tmp_path, max_rank=16)["r"] == 16
