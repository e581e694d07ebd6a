"""The stable front of a served alias: a small reverse proxy on one port that forwards every request
to whichever `mlflow models serve` backend the switch file names.

`python -m tasks.serving_front --state serving/mlflow-<model>-<alias>.json --port 5001`

Contract:
- The switch file (written atomically by tasks/serving_target.py) is JSON with at least
  `{"port": int, "version": str}`. It is re-read when its mtime changes, so a deploy switches
  traffic by one atomic rename; requests already forwarded finish on the old backend.
- Every answer carries `X-Peftflow-Version` (the version that answered). `GET /health` is the
  front's own health (200 with the current version, or 503 before anything is deployed);
  every other path and method is forwarded as is.
- A request whose backend refuses the connection (it was stopped right after this request read the
  switch file) is retried once on the backend the file names now; nothing else is retried.

Built on starlette + httpx + uvicorn (already in the venv through mlflow and prefect); see
docs/architecture.md "Serving the champion" for why not nginx or a port swap.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "te", "upgrade",
       "host", "content-encoding", "date", "server"}


class Switch:
    """The backend the switch file names, re-read only when the file changes."""

    def __init__(self, path: Path):
        self.path, self._mtime, self.state = Path(path), None, None

    def current(self) -> dict | None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return None
        if mtime != self._mtime:
            self.state, self._mtime = json.loads(self.path.read_text()), mtime
        return self.state


def app(state_file: Path):
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    switch = Switch(state_file)
    client = httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=5.0))

    async def health(request: Request):
        state = switch.current()
        if not state:
            return JSONResponse({"status": "nothing deployed"}, status_code=503)
        return JSONResponse({"status": "ok", "version": state["version"]},
                            headers={"X-Peftflow-Version": str(state["version"])})

    async def forward(request: Request):
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        for attempt in (0, 1):
            state = switch.current()
            if not state:
                return JSONResponse({"error": "nothing deployed behind this endpoint yet"}, status_code=503)
            url = f"http://127.0.0.1:{state['port']}{request.url.path}"
            try:
                resp = await client.request(request.method, url, params=request.query_params, content=body,
                                            headers=headers)
                break
            except httpx.ConnectError:
                if attempt:
                    return JSONResponse({"error": f"backend of version {state['version']} is down"}, status_code=502)
        out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP}
        out["X-Peftflow-Version"] = str(state["version"])
        return Response(resp.content, status_code=resp.status_code, headers=out)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await client.aclose()

    return Starlette(routes=[Route("/health", health), Route("/{path:path}", forward, methods=methods)],
                     lifespan=lifespan)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m tasks.serving_front", description=__doc__.splitlines()[0])
    parser.add_argument("--state", required=True, help="switch file written by the deploy flow")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args(argv)
    uvicorn.run(app(Path(args.state)), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
