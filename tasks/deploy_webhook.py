"""MLflow webhook deliveries for the deploy trigger: registering the webhook and verifying a delivery.

MLflow (3.3+, SQL stores; mlflow/webhooks/delivery.py) POSTs JSON `{"entity", "action",
"timestamp", "data"}` with headers `X-MLflow-Delivery-Id`, `X-MLflow-Timestamp` (unix seconds)
and, when the webhook has a secret, `X-MLflow-Signature: v1,<base64 HMAC-SHA256(secret,
"<delivery id>.<timestamp>.<body>")>`.

Contract:
- `Verifier(secret, max_age_s=300).verify(headers, body, now=None) -> dict`: the parsed payload of
  a genuine, fresh, first-seen delivery. Raises Refused (a PeftflowError) for: no secret
  configured, a missing signature/id/timestamp, a wrong signature (compared in constant time), a
  timestamp more than `max_age_s` away from now, or a delivery id seen before (a replay; ids are
  remembered for `max_age_s`, after which the timestamp check refuses the old delivery anyway).
- `alias_move(payload) -> (model, alias, version) | None`: for `model_version_alias.created`.
- `register(client, url, secret, name="peftflow-deploy") -> webhook id`: creates (or, same name,
  updates) the MLflow webhook on `model_version_alias.created` pointing at the receiver.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time

from tasks.errors import PeftflowError

SIGNATURE, TIMESTAMP, DELIVERY = "x-mlflow-signature", "x-mlflow-timestamp", "x-mlflow-delivery-id"
EVENT = "model_version_alias.created"


class Refused(PeftflowError):
    """A webhook delivery that is not verified as MLflow's, fresh and first-seen."""


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()


class Verifier:
    def __init__(self, secret: str, max_age_s: float = 300.0):
        if not secret:
            raise Refused("no webhook secret configured: set PEFTFLOW_WEBHOOK_SECRET (the same secret the MLflow "
                          "webhook was created with)")
        self.secret, self.max_age_s = secret, max_age_s
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def verify(self, headers, body: bytes, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        h = {k.lower(): v for k, v in headers.items()}
        sig, ts, delivery = h.get(SIGNATURE), h.get(TIMESTAMP), h.get(DELIVERY)
        if not (sig and ts and delivery):
            raise Refused("unsigned delivery (X-MLflow-Signature, -Timestamp and -Delivery-Id are required)")
        if not hmac.compare_digest(sig.encode(), signature(self.secret, delivery, ts, body).encode()):
            raise Refused("wrong signature")
        try:
            age = abs(now - int(ts))
        except ValueError:
            raise Refused(f"bad timestamp {ts!r}") from None
        if age > self.max_age_s:
            raise Refused(f"stale delivery: timestamp is {age:.0f} s from now (limit {self.max_age_s:.0f} s)")
        with self._lock:
            self._seen = {d: t for d, t in self._seen.items() if now - t <= self.max_age_s}
            if delivery in self._seen:
                raise Refused(f"replayed delivery {delivery}")
            self._seen[delivery] = now
        try:
            return json.loads(body)
        except ValueError:
            raise Refused("body is not JSON") from None


def alias_move(payload: dict) -> tuple[str, str, str] | None:
    if (payload.get("entity"), payload.get("action")) != ("model_version_alias", "created"):
        return None
    data = payload.get("data") or {}
    if not all(data.get(k) for k in ("name", "alias", "version")):
        raise Refused(f"alias event without name/alias/version: {data}")
    return str(data["name"]), str(data["alias"]), str(data["version"])


def register(client, url: str, secret: str, name: str = "peftflow-deploy") -> str:
    """See the module docstring (one webhook per name: re-running points it at `url` again)."""
    for hook in client.list_webhooks():
        if hook.name == name:
            return client.update_webhook(hook.webhook_id, url=url, events=[EVENT], secret=secret).webhook_id
    return client.create_webhook(name=name, url=url, events=[EVENT], secret=secret,
                                 description="peftflow: an alias move deploys the version (flows/webhook.py)").webhook_id
