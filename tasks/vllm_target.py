"""The `vllm` serving target: the adapter laid out for vLLM's filesystem LoRA resolver and loaded
into a running vLLM server through its runtime LoRA API.

vLLM (started with `--enable-lora --max-lora-rank R`, `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`,
and for the resolver `VLLM_PLUGINS=lora_filesystem_resolver`, `VLLM_LORA_RESOLVER_CACHE_DIR=<dir>`)
serves adapter `<dir>/<lora name>/` under the model name `<lora name>`.

Contract:
- `lora_name(name, version) -> "<name>-v<version>"`: names are per version (vLLM cannot replace
  the weights behind a loaded name), so a request names exactly the version it gets.
- `check_fits(adapter_dir, max_rank)`: DeployError unless the adapter is plain LoRA (peft_type
  LORA, no DoRA, no `modules_to_save`) with rank and every per-module rank <= `max_rank`.
- `publish(adapter_dir, lora_dir, url, name, version, previous) -> dict`: copies the adapter to
  `<lora_dir>/<lora name>/` (atomically: a complete folder or none), POSTs `/v1/load_lora_adapter`
  `{"lora_name", "lora_path"}`, then (only after the load answered 200) `/v1/unload_lora_adapter`
  `{"lora_name"}` for the previous version. A refused load raises DeployError; the previous
  version stays loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tasks import atomic
from tasks.deploy_smoke import DeployError


def lora_name(name: str, version: str) -> str:
    return f"{name}-v{version}"


def check_fits(adapter_dir: Path, max_rank: int) -> dict:
    """See the module docstring; returns the adapter config."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    kind = config.get("peft_type")
    if kind != "LORA":
        raise DeployError(f"vLLM serves LoRA adapters only; this one is {kind}")
    if config.get("use_dora"):
        raise DeployError("vLLM does not serve DoRA adapters (use_dora: true); serve it with the mlflow target")
    if config.get("modules_to_save"):
        raise DeployError(f"vLLM does not serve adapters with modules_to_save ({config['modules_to_save']}); "
                          f"serve it with the mlflow target")
    ranks = [int(config.get("r") or 0), *map(int, (config.get("rank_pattern") or {}).values())]
    if max(ranks) > max_rank:
        raise DeployError(f"adapter rank {max(ranks)} exceeds the vLLM server's --max-lora-rank {max_rank}")
    return config


def _post(url: str, path: str, body: dict) -> None:
    import requests

    try:
        r = requests.post(f"{url.rstrip('/')}{path}", json=body, timeout=300)
    except requests.RequestException as err:
        raise DeployError(f"vLLM at {url} is unreachable ({err}); is it running with --enable-lora?") from None
    if r.status_code != 200:
        raise DeployError(f"vLLM refused {path} {body}: {r.status_code} {r.text[:300]}")


def publish(adapter_dir: Path, lora_dir: Path, url: str, name: str, version: str, previous: str | None) -> dict:
    """See the module docstring."""
    target = Path(lora_dir) / lora_name(name, version)
    if not (target / "adapter_config.json").is_file():
        with atomic.directory(target) as tmp:
            for item in Path(adapter_dir).iterdir():
                if item.is_file():
                    shutil.copy2(item, Path(tmp) / item.name)
    _post(url, "/v1/load_lora_adapter", {"lora_name": lora_name(name, version), "lora_path": str(target)})
    if previous and previous != str(version):
        _post(url, "/v1/unload_lora_adapter", {"lora_name": lora_name(name, previous)})
    return {"version": str(version), "lora_name": lora_name(name, version), "lora_path": str(target),
            "endpoint": url}
