"""The `mlflow` serving target: one endpoint per (model, alias), replaced blue/green.

Layout under the serving folder (`serving_dir(params)`: $PEFTFLOW_SERVING_DIR or <project>/serving):
  models/<model>-v<version>/          the downloaded, hash-checked model folder that is served
  mlflow-<model>-<alias>.json         the switch file: {"version", "port", "pid", "model_dir"}
  front-<model>-<alias>.json          the stable front (tasks/serving_front.py): {"port", "pid"}
  logs/                               the servers' logs

Contract:
- `publish(folder, name, alias, version, model_dir, prompt, front_port) -> dict`: starts
  `mlflow models serve` on the verified folder on a free port, waits for `/ping` and for a 200
  answer to a smoke request (`prompt`), then atomically rewrites the switch file (the front
  forwards new requests there from then on), waits `DRAIN_S` for requests in flight on the old
  backend and stops it. If the new backend does not come up or answer, it is stopped and
  DeployError raised: the switch file and the old backend are untouched.
- `ensure_front(folder, name, alias, port) -> url`: the front, started (detached) if not running.
- `current(folder, name, alias) -> dict | None`: the switch file, if its backend is alive.
- `stop(folder, name, alias)`: stop the backend and front of an alias (tests, `make clean`-like).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tasks import atomic
from tasks.deploy_smoke import DeployError

HOST = "127.0.0.1"
DRAIN_S = 2.0  # longer than a smoke-size request; the front retries a refused connection once anyway


def serving_dir(params) -> Path:
    return Path(os.environ.get("PEFTFLOW_SERVING_DIR") or Path(params.root) / "serving")


def _switch_file(folder: Path, name: str, alias: str) -> Path:
    return folder / f"mlflow-{name}-{alias}.json"


def _front_file(folder: Path, name: str, alias: str) -> Path:
    return folder / f"front-{name}-{alias}.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of this process is gone for our purposes
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(int(pid), os.WNOHANG)
        if done:
            return False
    return True


def _get(url: str, timeout: float = 3.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _spawn(cmd: list[str], log: Path, env: dict | None = None) -> int:
    """Start a detached server (own session: it outlives the flow run) and return its pid."""
    log.parent.mkdir(parents=True, exist_ok=True)
    # `mlflow models serve` execs `uvicorn` by name: this venv's bin must come first.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {}), "PATH": path})
    return proc.pid


def stop_pid(pid: int | None, timeout_s: float = 10.0) -> None:
    """SIGTERM the process group of a server we spawned, SIGKILL after `timeout_s`."""
    if not alive(pid):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(int(pid), signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(pid), signal.SIGKILL)


def _wait(url: str, pid: int, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pid):
            raise DeployError(f"the server exited before {url} answered; see {log}: "
                              f"{log.read_text(errors='replace')[-800:]}")
        if _get(url) == 200:
            return
        time.sleep(0.3)
    raise DeployError(f"{url} did not answer within {timeout_s:.0f} s; see {log}")


def ensure_front(folder: Path, name: str, alias: str, port: int) -> str:
    """See the module docstring. An existing live front keeps its port."""
    front = _read(_front_file(folder, name, alias))
    if front and alive(front.get("pid")):
        return f"http://{HOST}:{front['port']}"
    log = folder / "logs" / f"front-{name}-{alias}.log"
    # $PEFTFLOW_SERVE_HOST: the front's bind address (0.0.0.0 in a container); backends stay on loopback.
    pid = _spawn([sys.executable, "-m", "tasks.serving_front", "--state", str(_switch_file(folder, name, alias)),
                  "--host", os.environ.get("PEFTFLOW_SERVE_HOST", HOST), "--port", str(port)], log, {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 60
    while _get(f"{url}/health") not in (200, 503):
        if not alive(pid) or time.monotonic() > deadline:
            raise DeployError(f"the serving front did not start on port {port}; see {log}")
        time.sleep(0.2)
    atomic.write_json(_front_file(folder, name, alias), {"port": port, "pid": pid})
    return url


def current(folder: Path, name: str, alias: str) -> dict | None:
    state = _read(_switch_file(folder, name, alias))
    return state if state and alive(state.get("pid")) else None


def smoke_request(port: int, prompt: str, timeout: float = 120.0) -> list:
    import requests

    r = requests.post(f"http://{HOST}:{port}/invocations", timeout=timeout,
                      json={"inputs": [prompt], "params": {"max_new_tokens": 4}})
    if r.status_code != 200:
        raise DeployError(f"the new server answered the smoke request with {r.status_code}: {r.text[:300]}")
    out = r.json().get("predictions")
    if not isinstance(out, list) or len(out) != 1 or not isinstance(out[0], str):
        raise DeployError(f"the new server answered the smoke request with {r.text[:300]}")
    return out


def publish(folder: Path, name: str, alias: str, version: str, model_dir: Path, prompt: str,
            front_port: int, timeout_s: float = 180.0) -> dict:
    """See the module docstring. Returns the new switch state plus `endpoint`."""
    endpoint = ensure_front(folder, name, alias, front_port)
    old = _read(_switch_file(folder, name, alias))
    port = free_port()
    log = folder / "logs" / f"{name}-v{version}-{port}.log"
    pid = _spawn([str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", str(model_dir),
                  "--env-manager", "local", "-h", HOST, "-p", str(port), "-w", "1"], log)
    try:
        _wait(f"http://{HOST}:{port}/ping", pid, timeout_s, log)
        reply = smoke_request(port, prompt)[0]
    except BaseException:
        stop_pid(pid)
        raise
    state = {"version": str(version), "port": port, "pid": pid, "model_dir": str(model_dir),
             "since": time.time()}
    atomic.write_json(_switch_file(folder, name, alias), state)
    if old and old.get("pid") != pid:
        time.sleep(DRAIN_S)
        stop_pid(old.get("pid"))
    return {**state, "endpoint": endpoint, "reply": reply}


def stop(folder: Path, name: str, alias: str) -> None:
    for path in (_switch_file(folder, name, alias), _front_file(folder, name, alias)):
        state = _read(path)
        if state:
            stop_pid(state.get("pid"))
