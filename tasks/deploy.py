"""Deploy the version a registry alias (default `champion`) points at, verified first, with rollback.

`deploy(params, name, alias, target, ...)`:
1. resolves the alias to a version (under one deploy at a time per serving folder: a file lock);
   a version already served by that target is not redeployed (status "unchanged");
2. downloads it with the registry's hash check (tasks/registry.py) into
   `<serving>/models/<name>-v<version>/` (atomically);
3. checks it fits the target: the base weights digest of the version equals the served base's
   (this project's `model.base`); for vLLM, plain LoRA within the server's rank limit
   (tasks/vllm_target.py);
4. runs the smoke check (tasks/deploy_smoke.py);
5. publishes: `mlflow` = blue/green behind a stable front (tasks/serving_target.py); `vllm` = the
   resolver folder + runtime load/unload (tasks/vllm_target.py);
6. records it: version tags `peftflow.deployed_at` / `peftflow.deployed_target`, a line in
   `<serving>/deployments.jsonl` (what `python -m flows.deploy --status` prints).

On any PeftflowError in 2-5 nothing is switched: the version is tagged `peftflow.deploy_failed`,
the alias is moved back to the last version deployed to that target by compare-and-set under the
registry lock (tasks/promote.py; only if it still points at the failed version), the failure is
logged, and DeployError is raised with the reason. No Prefect here: flows/deploy.py drives it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from tasks import atomic, deploy_smoke, models, promote, registry, serving_target, tracking, vllm_target
from tasks.config import Params
from tasks.deploy_smoke import DeployError
from tasks.errors import PeftflowError

TARGETS = ("mlflow", "vllm")
TAG_DEPLOYED_AT, TAG_DEPLOYED_TARGET = "peftflow.deployed_at", "peftflow.deployed_target"
TAG_DEPLOY_FAILED = "peftflow.deploy_failed"
LOG_NAME = "deployments.jsonl"


class NoAlias(PeftflowError):
    """The registered model or the alias does not exist (yet): nothing to deploy."""


@dataclass(frozen=True)
class Target:
    """Where and how to publish. `front_port`: the mlflow endpoint's stable port; `vllm_url`,
    `lora_dir`, `max_lora_rank`: the running vLLM server, its resolver folder and rank limit."""

    kind: str = "mlflow"
    front_port: int = 5001
    vllm_url: str = "http://127.0.0.1:8000"
    lora_dir: str | None = None
    max_lora_rank: int = 16


@dataclass(frozen=True)
class DeployResult:
    model: str
    alias: str
    target: str
    version: str
    status: str  # "deployed" | "unchanged"
    endpoint: str
    previous: str | None
    smoke: dict | None
    seconds: float


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def deploy_lock(folder: Path):
    """One deploy per serving folder at a time (two alias moves in a row take turns)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".deploy.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_log(folder: Path) -> list[dict]:
    path = Path(folder) / LOG_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append_log(folder: Path, entry: dict) -> None:
    # One short line per O_APPEND write: readers see whole lines; the deploy lock orders writers.
    with open(Path(folder) / LOG_NAME, "a") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def last_deployed(folder: Path, name: str, alias: str, target: str) -> dict | None:
    done = [e for e in read_log(folder)
            if e["status"] == "deployed" and (e["model"], e["alias"], e["target"]) == (name, alias, target)]
    return done[-1] if done else None


def _served_version(folder: Path, name: str, alias: str, target: Target) -> str | None:
    if target.kind == "mlflow":
        state = serving_target.current(folder, name, alias)
        return state["version"] if state else None
    last = last_deployed(folder, name, alias, target.kind)
    return last["version"] if last else None


def _fetch(params: Params, name: str, version: str, folder: Path) -> tuple[Path, Path, dict]:
    """Download (hash-checked) into <serving>/models/<name>-v<version>/; (model dir, adapter dir, config)."""
    final = folder / "models" / f"{name}-v{version}"
    with atomic.directory(final) as tmp:
        adapter, config = registry.download_adapter(f"models:/{name}/{version}", params, Path(tmp))
        inner = adapter.relative_to(tmp)
    model_dir = final / inner.parts[0]
    return model_dir, final / inner, config


def check_base(params: Params, mv, config: dict) -> None:
    """The version's base weights digest must be the served base's (this project's model.base),
    and the base folder the served model loads must still hold those weights."""
    served = models.resolve(params.model)
    want = mv.tags.get("base.weights_sha256") or config.get("base_weights_sha256")
    if want != served.weights_sha256 or config.get("base_weights_sha256") != want:
        raise DeployError(f"version {mv.version} was trained on base weights {want}; the served base "
                          f"{served.spec} has {served.weights_sha256}")
    if models.weights_sha256(Path(config["base_path"])) != want:
        raise DeployError(f"base folder {config['base_path']} no longer holds weights {want}")


def _rollback(client, name: str, alias: str, failed: str, last: dict | None, reason: str) -> str:
    """Move `alias` back to the last deployed version if it still points at `failed`; a note."""
    if not last or last["version"] == failed:
        return "no earlier deployed version to move back to"
    if alias != promote.CHAMPION:
        return f"alias {alias} left at {failed} (only champion is moved back)"
    with registry.registry_lock(client, name):
        move = promote.move_champion(client, name, last["version"], failed, f"deploy of v{failed} failed: {reason}",
                                     record_previous=False)
    return f"champion moved back to v{last['version']}" if move.moved else f"champion not moved back: {move.note}"


def _publish(params, folder, name, alias, version, model_dir, adapter_dir, prompt, target: Target, previous):
    if target.kind == "mlflow":
        return serving_target.publish(folder, name, alias, version, model_dir, prompt, target.front_port)
    lora_dir = Path(target.lora_dir or folder / "lora")
    return vllm_target.publish(adapter_dir, lora_dir, target.vllm_url, name, version, previous)


def deploy(params: Params, name: str | None = None, alias: str = promote.CHAMPION, target: Target | None = None,
           smoke_rows: int = 5, tolerance: float = 0.02) -> DeployResult:
    """See the module docstring."""
    target = target or Target()
    if target.kind not in TARGETS:
        raise PeftflowError(f"unknown deploy target {target.kind!r}; choose one of {', '.join(TARGETS)}")
    name = name or params.register.model_name
    folder = serving_target.serving_dir(params)
    started = time.monotonic()
    with deploy_lock(folder):
        client = tracking.client(params)
        try:
            mv = client.get_model_version_by_alias(name, alias)
        except Exception as err:  # noqa: BLE001 - MlflowException: unknown model or alias
            raise NoAlias(f"registered model {name!r} has no alias {alias!r} ({err})") from None
        version = str(mv.version)
        last = last_deployed(folder, name, alias, target.kind)
        previous = _served_version(folder, name, alias, target)
        if previous == version:
            return DeployResult(name, alias, target.kind, version, "unchanged", (last or {}).get("endpoint", ""),
                                previous, None, time.monotonic() - started)
        entry = {"time": _now(), "model": name, "alias": alias, "target": target.kind, "version": version,
                 "previous": previous}
        try:
            model_dir, adapter_dir, config = _fetch(params, name, version, folder)
            check_base(params, mv, config)
            if target.kind == "vllm":
                vllm_target.check_fits(adapter_dir, target.max_lora_rank)
            with tempfile.TemporaryDirectory() as tmp:
                smoke = deploy_smoke.check(params, mv, adapter_dir, model_dir, Path(tmp), smoke_rows, tolerance,
                                           generate=target.kind != "mlflow")
            published = _publish(params, folder, name, alias, version, model_dir, adapter_dir,
                                 _smoke_prompt(params), target, previous)
        except PeftflowError as err:
            reason = str(err)
            client.set_model_version_tag(name, version, TAG_DEPLOY_FAILED, f"{entry['time']} {target.kind}: {reason}"[:5000])
            note = _rollback(client, name, alias, version, last, reason)
            _append_log(folder, {**entry, "status": "failed", "reason": reason[:2000], "rollback": note})
            raise DeployError(f"version {version} of {name} was not deployed to {target.kind}: {reason}; "
                              f"{note}; the endpoint keeps serving v{previous or 'none'}") from None
        client.set_model_version_tag(name, version, TAG_DEPLOYED_AT, entry["time"])
        client.set_model_version_tag(name, version, TAG_DEPLOYED_TARGET, target.kind)
        endpoint = published["endpoint"]
        smoke = dataclasses.replace(smoke, reply=smoke.reply or published.get("reply", ""))
        _append_log(folder, {**entry, "status": "deployed", "endpoint": endpoint,
                             "smoke": asdict(smoke), **{k: published[k] for k in ("lora_name", "port") if k in published}})
        return DeployResult(name, alias, target.kind, version, "deployed", endpoint, previous, asdict(smoke),
                            time.monotonic() - started)


def _smoke_prompt(params: Params) -> str:
    """The prompt of the smoke request to a new server (any text: the request must be answered)."""
    return "Review: a fine film\nIs this review positive or negative?"


def status_lines(folder: Path) -> list[str]:
    """The deployment log, one line per deployment (what `--status` prints)."""
    lines = []
    for e in read_log(folder):
        what = (f"-> {e.get('endpoint', '')}" if e["status"] == "deployed"
                else f"FAILED: {e.get('reason', '')[:200]} ({e.get('rollback', '')})")
        lines.append(f"{e['time']}  {e['model']}@{e['alias']}  v{e['version']}  {e['target']}  {e['status']}  {what}")
    return lines
