"""Registered versions for the deploy tests, built cheaply but really evaluated: the deploy smoke
check re-scores a version on its own recorded test rows, so those records must be real.

- `deploy_project(root, overrides)`: a prepared project (real preprocess on a 60-row review set)
  with reports/ingest.json (its raw data md5) and the gate off (tests move aliases themselves).
- `register_version(params, seed, tamper=False)`: a seeded random LoRA adapter, the real evaluate
  stage, then the real register stage; returns the version. `tamper=True` flips the adapter's
  recorded per-row predictions (and its recorded accuracy to match): a version whose records
  are self-consistent but do not reproduce.
- `corrupt_artifact(params, version)`: overwrite the stored adapter weights of a version in the
  MLflow server's artifact folder (the registry's `adapter.sha256` then no longer matches).
- `WebhookRecorder`-free helpers: `sign(secret, delivery_id, timestamp, body)` (MLflow's scheme).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import pandas as pd

from support.adapters import make_adapter
from support.projects import prepared_project
from tasks import atomic, evaluate, layout, register
from tasks.adapters import adapter_sha256


def deploy_project(root: Path, overrides: dict | None = None):
    params = prepared_project(root, {"register": {"promote": False, "guards": {}},
                                     "evaluate": {"max_samples": 12}, **(overrides or {})})
    raw = root / layout.RAW_DATA
    atomic.write_json(root / layout.report("ingest"), {"source": "fixture", "rows": 60,
                                                        "md5": hashlib.md5(raw.read_bytes()).hexdigest()})
    return params


def register_version(params, seed: int, tamper: bool = False) -> str:
    root = Path(params.root)
    adapter = make_adapter(params, "lora", scale=0.5, seed=seed)
    atomic.write_json(root / layout.report("train"), {
        "adapter_sha256": adapter_sha256(adapter), "fingerprint": f"fp-{seed}", "tokens_trained": 1,
        "wall_seconds": 1.0, "device": "cpu", "final_loss": 1.0, "steps": 1})
    (root / layout.TRAIN_LOG).write_text("step,loss,learning_rate,grad_norm,tokens_per_second\n1,1.0,0.001,0.5,10\n")
    evaluate.run(params)
    if tamper:
        table = pd.read_csv(root / layout.PREDICTIONS)
        table["adapter.pred"] = 1 - table["adapter.pred"]
        table.to_csv(root / layout.PREDICTIONS, index=False)
        report = json.loads((root / layout.report("evaluate")).read_text())
        report["adapter"]["accuracy"] = float((table["adapter.pred"] == table["label"]).mean())
        atomic.write_json(root / layout.report("evaluate"), report)
    return register.run(params).version


def sign(secret: str, delivery_id: str, timestamp: str, body: str) -> str:
    """MLflow's webhook signature (mlflow/webhooks/delivery.py): v1,base64(HMAC-SHA256(id.ts.body))."""
    mac = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()
