"""The webhook receiver: MLflow alias moves in, Prefect events out.

`python -m flows.webhook serve [--host 127.0.0.1] [--port 5080]`       (secret: $PEFTFLOW_WEBHOOK_SECRET)
`python -m flows.webhook register --url http://<receiver>:5080/mlflow-webhook [--params P]`

Contract:
- `POST /mlflow-webhook`: a delivery verified by tasks/deploy_webhook.Verifier (HMAC signature,
  timestamp within 5 min, delivery id not seen before). An unsigned, wrongly signed, stale or
  replayed delivery is answered 401 and emits nothing. A verified `model_version_alias.created`
  emits the Prefect event `peftflow.model.alias.set` on resource `peftflow.model.<name>` with
  payload `{model, alias, version}` (event id derived from the delivery id, so Prefect too sees a
  redelivery as one event); the `deploy` deployment's trigger in prefect.yaml matches it. Other
  verified events are answered 200 and ignored. `GET /health` answers 200.
- `register`: creates or updates the MLflow webhook (tasks/deploy_webhook.register) with the secret.
The receiver needs PREFECT_API_URL (the server whose automations run the deploy).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid

from tasks import cli

cli.apply_env_defaults()

from tasks import deploy_webhook  # noqa: E402

EVENT = "peftflow.model.alias.set"
SECRET_ENV = "PEFTFLOW_WEBHOOK_SECRET"
log = logging.getLogger("tasks.webhook")


def app(secret: str, emit=None):
    """The receiver; `emit(event, resource, payload, id)` defaults to prefect.events.emit_event."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    verifier = deploy_webhook.Verifier(secret)
    if emit is None:
        from prefect.events import emit_event as emit

    async def receive(request: Request):
        body = await request.body()
        try:
            payload = verifier.verify(request.headers, body)
            move = deploy_webhook.alias_move(payload)
        except deploy_webhook.Refused as err:
            log.warning("webhook refused: %s", err)
            return JSONResponse({"refused": str(err)}, status_code=401)
        if move is None:
            return JSONResponse({"ignored": f"{payload.get('entity')}.{payload.get('action')}"})
        name, alias, version = move
        delivery = request.headers[deploy_webhook.DELIVERY]
        event = emit(event=EVENT, resource={"prefect.resource.id": f"peftflow.model.{name}",
                                            "peftflow.model": name, "peftflow.alias": alias},
                     payload={"model": name, "alias": alias, "version": version},
                     id=uuid.uuid5(uuid.NAMESPACE_URL, f"mlflow-webhook:{delivery}"))
        log.info("alias move %s@%s -> v%s: emitted %s", name, alias, version, EVENT)
        return JSONResponse({"emitted": EVENT, "id": str(getattr(event, "id", ""))})

    async def health(request: Request):
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/mlflow-webhook", receive, methods=["POST"]), Route("/health", health)])


@cli.main_guard
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.webhook", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the receiver")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=5080)
    reg = sub.add_parser("register", help="create/update the MLflow webhook that calls the receiver")
    reg.add_argument("--url", required=True, help="the receiver's /mlflow-webhook URL as MLflow reaches it")
    reg.add_argument("--params", default="params.yaml", help="params file (tracking store)")
    args = parser.parse_args(argv)
    secret = os.environ.get(SECRET_ENV, "")
    if args.command == "register":
        from tasks import tracking
        from tasks.config import load_params

        hook = deploy_webhook.register(tracking.client(load_params(args.params)), args.url,
                                       deploy_webhook.Verifier(secret).secret)
        print(f"webhook {hook} -> {args.url} on {deploy_webhook.EVENT}")
        return 0
    import uvicorn

    logging.basicConfig(level=logging.INFO)
    uvicorn.run(app(secret), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
