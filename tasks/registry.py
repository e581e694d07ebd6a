"""The model registry's parts: the cross-process lock, finding versions, parsing `models:/` URIs,
downloading a version (hash-checked) and loading it as base + PEFT adapter.

Contract:
- `parse_model_uri(uri) -> (name, version | None, alias | None)`: the one parser of
  `models:/<name>/<version>` and `models:/<name>@<alias>`; ConfigError for anything else.
- `registry_lock(client, name)`: a mutex on registered model `name` shared by every process and
  machine using the store.
- `find_version(client, name, token)`, `download_model(uri, params, dst)`,
  `download_adapter(uri, params, dst) -> (adapter folder, model config)` (ModelError when the
  stored bytes differ from the version's `adapter.sha256`), `load_peft(uri, params, dst)`.
Always through this project's explicit client (tasks/tracking.py), never MLflow's global URIs.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from tasks import models, tracking
from tasks.adapters import adapter_sha256
from tasks.config import Params
from tasks.errors import ConfigError, ModelError
from tasks.tracking import TAG_HOST, TAG_PID, TAG_PID_START, TrackingError

TAG_TOKEN = "peftflow.run_token"


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/name/3` -> ("name", "3", None); `models:/name@champion` -> ("name", None, "champion")."""
    spec = uri.removeprefix("models:/")
    if spec == uri or not spec:
        raise ConfigError(f"{uri!r} is not a model URI; write models:/<name>/<version> or models:/<name>@<alias>")
    if "@" in spec:
        name, alias = spec.split("@", 1)
        if name and alias and "/" not in alias:
            return name, None, alias
    else:
        name, _, version = spec.rpartition("/")
        if name and version.isdigit():
            return name, version, None
    raise ConfigError(f"{uri!r} is not a model URI; write models:/<name>/<version> or models:/<name>@<alias>")


def resolve_version(client, uri: str):
    """The ModelVersion a `models:/` URI names (an alias is resolved once, here)."""
    name, version, alias = parse_model_uri(uri)
    return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)


LOCK_SUFFIX = ".lock"  # registered model `<name>.lock` exists while a process registers into `<name>`
TAG_LOCK_OWNER, TAG_LOCK_SINCE = "peftflow.lock.owner", "peftflow.lock.since"


@contextlib.contextmanager
def registry_lock(mlflow_client, name: str, stale_s: float = 900.0, timeout_s: float = 1800.0) -> Iterator[None]:
    """Hold a mutex on registered model `name`, shared by every process and machine using the store.

    Creating a registered model is atomic in every MLflow store (its name is unique), so whoever
    creates `<name>.lock` holds the lock; its tags (set in the same request) name the owner. A
    create whose answer was lost is recognised by the owner tag. A lock whose process on this host
    is gone, or older than `stale_s`, is broken. Raises TrackingError after `timeout_s` of waiting.
    """
    import uuid

    from mlflow.exceptions import MlflowException

    lock, nonce = name + LOCK_SUFFIX, uuid.uuid4().hex
    tags = {TAG_LOCK_OWNER: nonce, TAG_LOCK_SINCE: repr(time.time()), **tracking.process_tags()}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            mlflow_client.create_registered_model(lock, tags=tags, description=f"held while registering into {name}")
            break
        except MlflowException as err:
            # RESOURCE_DOES_NOT_EXIST: the server saw the name taken, then the holder released the
            # lock before the server could describe it (seen with 8 registrations at once).
            if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        try:
            held = mlflow_client.get_registered_model(lock).tags
        except MlflowException:
            continue  # released meanwhile
        if held.get(TAG_LOCK_OWNER) == nonce:
            break  # our create went through; only its answer was lost
        pid = held.get(TAG_PID, "")
        dead = (held.get(TAG_HOST) == socket.gethostname() and pid.isdigit()
                and not tracking.process_alive(int(pid), held.get(TAG_PID_START)))
        if dead or time.time() - float(held.get(TAG_LOCK_SINCE) or 0) > stale_s:
            with contextlib.suppress(MlflowException):
                mlflow_client.delete_registered_model(lock)
            continue
        if time.monotonic() > deadline:
            raise TrackingError(f"registered model {lock} has been held for more than {timeout_s:.0f} s by process "
                                f"{pid} on {held.get(TAG_HOST)}; if that process is gone, delete {lock} in MLflow")
        time.sleep(0.2)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            # Only our own lock: had it been broken as stale, another process may hold a new one.
            if mlflow_client.get_registered_model(lock).tags.get(TAG_LOCK_OWNER) == nonce:
                mlflow_client.delete_registered_model(lock)


def find_version(client, name: str, token: str) -> list[str]:
    """Versions of `name` tagged with `token`, lowest first."""
    found = client.search_model_versions(f"name='{name}' and tags.`{TAG_TOKEN}` = '{token}'")
    return sorted((str(v.version) for v in found), key=int)


def artifact_adapter_dir(model_dir: Path) -> Path:
    """The adapter folder inside a downloaded model version (per its MLmodel file)."""
    import yaml

    flavor = yaml.safe_load((Path(model_dir) / "MLmodel").read_text())["flavors"]["python_function"]
    return Path(model_dir) / flavor["artifacts"]["adapter"]["path"]


def model_config_of(model_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((Path(model_dir) / "MLmodel").read_text())["flavors"]["python_function"]["config"]


def download_model(model_uri: str, params: Params, dst: Path) -> Path:
    """Download `models:/<name>/<version>` or `models:/<name>@<alias>` from this project's registry.

    Resolved through an explicit client: MLflow's own `models:/` resolution uses the process-global
    registry URI, which may point at another store.
    """
    import mlflow

    c = tracking.client(params)
    mv = resolve_version(c, model_uri)
    source = c.get_model_version_download_uri(mv.name, str(mv.version))
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst),
                                                    tracking_uri=tracking.tracking_uri(params)))


def download_adapter(model_uri: str, params: Params, dst: Path) -> tuple[Path, dict]:
    """Download a registered model (e.g. `models:/name@champion`); return (adapter folder, model config).

    Raises ModelError when the downloaded adapter's bytes differ from the version's `adapter.sha256`
    tag (a corrupted artifact store), before anything loads them.
    """
    # The alias is resolved once, so the bytes are checked against the version downloaded.
    mv = resolve_version(tracking.client(params), model_uri)
    local = download_model(f"models:/{mv.name}/{mv.version}", params, dst)
    adapter = artifact_adapter_dir(local)
    expected, stored = mv.tags.get("adapter.sha256"), adapter_sha256(adapter)
    if expected and stored != expected:
        raise ModelError(f"{model_uri} (version {mv.version}): the stored adapter has sha256 {stored}, but the version "
                         f"was registered with {expected}; the artifact store is corrupted. Restore the artifact from a "
                         f"backup, or promote another version (`python -m tasks.promote promote VERSION`).")
    return adapter, model_config_of(local)


def load_peft(model_uri: str, params: Params, dst: Path):
    """The PEFT route: base model (hash-checked) + PeftModel.from_pretrained on the downloaded adapter.

    Returns (PeftModel in eval mode, fp32, tokenizer). Raises ModelError when the local base
    model's weights differ from the ones the adapter was trained on.
    """
    from peft import PeftModel

    adapter, config = download_adapter(model_uri, params, dst)
    base = models.BaseModel(config["base_spec"], config["base_path"], config["base_revision"] or None,
                            config["base_weights_sha256"], is_encoder=False)
    if models.weights_sha256(Path(base.path)) != base.weights_sha256:
        raise ModelError(f"base model {base.path} differs from the one {model_uri} was trained on "
                         f"(weights sha256 {base.weights_sha256})")
    labels = config["label_names"] if config["task"] == "classification" else None
    model = models.load_model(base, classification_labels=len(labels) if labels else None)
    from transformers import AutoTokenizer

    return PeftModel.from_pretrained(model, adapter).eval(), AutoTokenizer.from_pretrained(adapter)
