"""The adapter folder (`models/adapter/`) as evaluate and merge consume it.

Contract: `check_adapter` returns the folder's PeftConfig after checking it is complete
(adapter_config.json + safetensors weights) and was made for the resolved base model;
`attach_adapter` loads it on top of a base model in eval mode; `check_finite` refuses NaN/inf
weights; `adapter_sha256` identifies an adapter folder (every file: weights, config, tokenizer) and
is the one digest train.json, merge.json, MLflow tags and the registry all record. Every problem
is a ModelError that names the folder and what to do.
"""

from __future__ import annotations

from pathlib import Path

from tasks import checkpoints, models
from tasks.errors import ModelError


def _same_base(named: str, base: models.BaseModel) -> bool:
    # Paths differ between machines (cache folders), so a matching folder name also counts.
    return named in {base.spec, base.path} or Path(named).name == Path(base.path).name


def check_adapter(adapter_dir: Path, base: models.BaseModel):
    """The adapter's PeftConfig, after checking the folder is complete and made for `base`."""
    from peft import PeftConfig

    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"{adapter_dir}/adapter_config.json not found; run `python -m tasks train` first")
    if not list(adapter_dir.glob("*.safetensors")):
        raise ModelError(f"{adapter_dir} has no *.safetensors weights (only safetensors are loaded); re-run train")
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
    except (OSError, ValueError, TypeError) as err:
        raise ModelError(f"{adapter_dir}/adapter_config.json is not a valid PEFT config: {err}") from None
    named = config.base_model_name_or_path
    if named and not _same_base(named, base):
        raise ModelError(
            f"{adapter_dir} was trained on base '{named}', but model.base is '{base.spec}' ({base.path}); "
            f"set model.base to the adapter's base or re-run train"
        )
    return config


def attach_adapter(model, adapter_dir: Path, base: models.BaseModel):
    """Load the adapter on top of `model` (in place) and return the PeftModel in eval mode."""
    from peft import PeftModel

    check_adapter(adapter_dir, base)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()
        detail = " ".join(first[:2])[:400]
        raise ModelError(
            f"{adapter_dir} does not fit model.base '{base.spec}' (an adapter for a different base?): {detail}"
        ) from None
    return peft_model.eval()


def adapter_sha256(adapter_dir: Path) -> str:
    """sha256 over the sorted (name, sha256) of every file of the adapter folder."""
    return checkpoints.combined_sha256(checkpoints.tree_sha256(adapter_dir))


def check_finite(adapter_dir: Path) -> None:
    """Raise ModelError naming the first adapter tensor that holds NaN or inf."""
    import torch
    from safetensors import safe_open

    for path in sorted(adapter_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                bad = int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
                if bad:
                    raise ModelError(
                        f"{path}: tensor '{key}' has {bad} non-finite (NaN/inf) values; the adapter is broken "
                        f"(training diverged?). Re-train it, e.g. with a lower train.learning_rate"
                    )
