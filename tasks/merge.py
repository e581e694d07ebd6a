"""Stage `merge`: fold the adapter into the base weights, with a logit parity check.

Reads: `models/adapter/`, the base model (`model:`), `data/processed/` (split `test`, for parity
inputs), `reports/preprocess.json` (label names, classification only), `merge:` params.
Writes (atomically): `models/merged/` (safetensors + config + tokenizer + `MERGE.json`) and
`reports/merge.json`.
Raises DataError (tasks/processed.py): processed test split or label names missing.
Raises ModelError: adapter missing, for a different base, with NaN/inf weights; `model.base` is a
merged model that already contains this adapter; the merge fails its parity check (then nothing is
left under `models/merged/`).

Steps: check every adapter tensor is finite; load the base on CPU in the dtype it is saved in
(`merge.dtype`, `auto` = the base's saved dtype); load the adapter; merge layer by layer with a
float64 check of each layer on real inputs of the first `parity_samples` held-out test rows, and
an end-to-end logit check in the working dtype (tasks/merge_parity.py; no float64 copy of the
model, so peak memory stays near one copy); save; reload the saved folder and check every tensor
came back unchanged (catches weights saved under wrong names, which would load as fresh random
weights). A layer beyond its rounding bound, or logits beyond `merge.tolerance` scaled to the
working dtype, fail the stage.

Prompt learning methods (prompt tuning, prefix tuning, p-tuning) add virtual tokens, not weight
deltas, so there is nothing to merge: the stage succeeds, records the reason, and `models/merged/`
holds only `MERGE.json` saying so (dvc.yaml names the folder as an output).

`MERGE.json` records the adapter hash (`adapters.adapter_sha256`: every file of the adapter folder), the
base weights hash and the dtype. Re-running with the same adapter, base and dtype (and merged weights still intact) is a
no-op; a `model.base` folder whose MERGE.json names this adapter is refused, since merging the
same adapter twice would apply its update twice.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from tasks import atomic, layout, merge_parity, models, processed
from tasks.config import Params
from tasks.errors import ModelError
from tasks.adapters import adapter_sha256, attach_adapter, check_adapter, check_finite

MARKER = "MERGE.json"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class MergeResult:
    merged: bool  # False when the method cannot be merged (see reason)
    reason: str | None
    reused: bool  # True when models/merged already held this exact merge (no-op)
    max_abs_logit_diff: float | None
    dtype: str | None
    path: str
    report: str


def target_dtype(params: Params, base: models.BaseModel) -> str:
    """torch dtype name to save in: merge.dtype, or for `auto` the dtype the base was saved in."""
    if params.merge.dtype != "auto":
        return DTYPES[params.merge.dtype]
    try:
        config = json.loads((Path(base.path) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return name if name in DTYPES.values() else "float32"


def _label_names(params: Params) -> list[str]:
    names = processed.label_names(params.root)
    if len(names) < 2:
        raise ModelError(f"{layout.report('preprocess')} lists {len(names)} label name(s); a classification "
                         f"adapter needs at least two; {processed.REBUILD}")
    return names


def _parity_rows(params: Params) -> list[list[int]]:
    """input_ids of the first `merge.parity_samples` test rows (held out from training)."""
    test = processed.read_split(params.root, "test", {"input_ids"})
    return [list(x) for x in test.select(range(min(params.merge.parity_samples, len(test))))["input_ids"]]


def _refuse_merged_base(base: models.BaseModel, adapter_dir: Path) -> None:
    marker = Path(base.path) / MARKER
    if not marker.is_file() or not (adapter_dir / "adapter_config.json").is_file():
        return
    info = json.loads(marker.read_text())
    if info.get("merged") and info.get("adapter_sha256") == adapter_sha256(adapter_dir):
        raise ModelError(
            f"model.base '{base.spec}' is a merged model that already contains this adapter ({marker}); "
            f"merging it again would apply the adapter twice. Set model.base to the original base "
            f"'{info.get('base_model')}'"
        )


def _reusable(merged_dir: Path, identity: dict, tolerance: float) -> dict | None:
    """The stored report if models/merged already is this merge, intact and within tolerance."""
    marker = merged_dir / MARKER
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
        report = info["report"]
        same = all(info.get(k) == v for k, v in identity.items())
        if not same or not report.get("merged"):
            return None
        if not report["max_abs_logit_diff"] <= tolerance:
            return None
        if models.weights_sha256(merged_dir) != info["merged_weights_sha256"]:
            return None
    except (OSError, ValueError, KeyError, TypeError, ModelError):
        return None  # anything odd: merge again rather than trust it
    return report


def _digests(model) -> dict[str, str]:
    """sha256 of every tensor of the state dict (dtype, shape and bytes), by name."""
    import hashlib

    import torch

    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().contiguous().cpu()
        digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update((t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)).numpy())  # no copy
        out[name] = digest.hexdigest()
    return out


def _check_roundtrip(folder: Path, want: dict[str, str], base: models.BaseModel, dtype,
                     classification_labels: int | None, trust_remote_code: bool) -> None:
    """The saved folder, loaded as users load it, gives back the merged tensors (`want`: their
    digests, taken before the merged model was freed, so two copies never coexist). Catches
    weights saved under names the loader maps elsewhere, which would load as fresh random weights."""
    reloaded = models.load_model(
        models.BaseModel(str(folder), str(folder), None, "", base.is_encoder),
        classification_labels=classification_labels, dtype=dtype, trust_remote_code=trust_remote_code,
    )
    got = _digests(reloaded)
    del reloaded
    wrong = sorted(k for k in want if got.get(k) != want[k])
    if wrong:
        raise ModelError(f"the saved merged model does not reload to the merged weights ({len(wrong)} tensors "
                         f"differ, e.g. {wrong[:3]}); this is a bug, please report it")


def _not_mergeable(params: Params, method: str, base: models.BaseModel, identity: dict) -> MergeResult:
    """Prompt learning adds virtual tokens, not weight deltas: record why nothing was merged."""
    reason = (f"{method} learns virtual-token embeddings/prefix activations, not weight deltas, so there is "
              "nothing to merge into the base weights; serve the base with the adapter instead")
    report = {"merged": False, "method": method, "reason": reason, "base_model": base.spec, **identity}
    with atomic.directory(params.root / layout.MERGED) as tmp:
        atomic.write_json(tmp / MARKER, {**identity, "merged": False, "reason": reason, "report": report})
    report_path = params.root / layout.report("merge")
    atomic.write_json(report_path, report)
    return MergeResult(False, reason, False, None, None, str(layout.MERGED), str(report_path))


def _tolerance(params: Params, dtype_name: str) -> float:
    """merge.tolerance (an fp32 figure) scaled to the working dtype's rounding: eps(dtype) / eps(fp32)."""
    import torch

    return params.merge.tolerance * torch.finfo(getattr(torch, dtype_name)).eps / torch.finfo(torch.float32).eps


def _merge(params: Params, base: models.BaseModel, adapter_dir: Path, n_labels: int | None, rows: list[list[int]],
           dtype_name: str):
    """(merged model in the saved dtype, merge_parity.Parity): merged layer by layer, each layer
    checked in float64 on its own (tasks/merge_parity.py), so no float64 copy of the model exists."""
    import torch

    # The merge works in the dtype it is saved in: the saved weight is round(W + delta) in that dtype
    # either way, and one copy of the model in it is all the memory the merge needs.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # same fresh class head as evaluate (the adapter normally replaces it)
        model = models.load_model(base, classification_labels=n_labels, dtype=getattr(torch, dtype_name),
                                  trust_remote_code=params.model.trust_remote_code).eval()
    model = attach_adapter(model, adapter_dir, base)
    try:
        return merge_parity.merge_checked(model, rows)
    except ValueError as err:  # safe_merge found non-finite merged weights
        raise ModelError(f"merging {adapter_dir} gives non-finite weights ({err}); re-train the adapter") from None


def _checked_parity(params: Params, parity, dtype_name: str, n_rows: int, method: str) -> dict:
    """The parity figures of the report; ModelError (nothing left in models/merged) when they fail."""
    tolerance = _tolerance(params, dtype_name)
    figures = {"max_abs_logit_diff": parity.max_abs_logit_diff, "tolerance": tolerance, "parity_samples": n_rows,
               "parity_dtype": dtype_name, "max_layer_error": parity.max_layer_error,
               "worst_layer": parity.worst_layer, "layers_checked": parity.layers_checked}
    problem = None
    if not parity.max_layer_error <= 1.0:  # written so that NaN fails too
        problem = (f"merged layer {parity.worst_layer} differs from base + adapter by {parity.max_layer_error:.3g}x "
                   f"the rounding bound of {dtype_name} (float64 layer check)")
    elif not parity.max_abs_logit_diff <= tolerance:
        scaled = "" if dtype_name == "float32" else f" scaled to {dtype_name}: {tolerance:.3g}"
        problem = (f"merged model differs from base + adapter by max |logit diff| {parity.max_abs_logit_diff:.3g} > "
                   f"merge.tolerance {params.merge.tolerance:g}{scaled}")
    if problem:
        shutil.rmtree(params.root / layout.MERGED, ignore_errors=True)  # a stale merge must not pass for this one
        atomic.write_json(params.root / layout.report("merge"), {**figures, "method": method, "passed": False})
        raise ModelError(f"{problem} on {n_rows} test rows; nothing was written to {layout.MERGED}. "
                         f"Check the adapter (method {method}) or raise merge.tolerance if the difference is expected")
    return {**figures, "passed": True}


def run(params: Params) -> MergeResult:
    """Merge models/adapter into the base into models/merged; see the module docstring."""
    import torch

    root = params.root
    adapter_dir = root / layout.ADAPTER
    merged_dir = root / layout.MERGED
    report_path = root / layout.report("merge")
    base = models.resolve(params.model)
    _refuse_merged_base(base, adapter_dir)
    peft_config = check_adapter(adapter_dir, base)
    method = str(getattr(peft_config.peft_type, "value", peft_config.peft_type))
    identity = {"adapter_sha256": adapter_sha256(adapter_dir), "base_weights_sha256": base.weights_sha256}
    if peft_config.is_prompt_learning:
        return _not_mergeable(params, method, base, identity)

    dtype_name = target_dtype(params, base)
    identity["dtype"] = dtype_name
    stored = _reusable(merged_dir, identity, _tolerance(params, dtype_name))
    if stored is not None:
        atomic.write_json(report_path, stored)
        return MergeResult(True, None, True, stored["max_abs_logit_diff"], dtype_name, str(layout.MERGED),
                           str(report_path))

    check_finite(adapter_dir)
    # The adapter says whether it sits on a class head: merge then needs neither preprocess nor evaluate params.
    classification = str(getattr(peft_config.task_type, "value", peft_config.task_type)) == "SEQ_CLS"
    label_names = _label_names(params) if classification else []
    n_labels = len(label_names) if classification else None
    rows = _parity_rows(params)
    tokenizer = models.load_tokenizer(base, trust_remote_code=params.model.trust_remote_code)
    merged, parity = _merge(params, base, adapter_dir, n_labels, rows, dtype_name)
    report = {"merged": True, "method": method, "base_model": base.spec, **identity,
              **_checked_parity(params, parity, dtype_name, len(rows), method)}

    dtype = getattr(torch, dtype_name)
    if classification:
        merged.config.id2label = dict(enumerate(label_names))
        merged.config.label2id = {name: i for i, name in enumerate(label_names)}
    with atomic.directory(merged_dir) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        want = _digests(merged)
        del merged  # the caller holds no other reference: the reload below is the only copy
        _check_roundtrip(tmp, want, base, dtype, n_labels, params.model.trust_remote_code)
        report["merged_weights_sha256"] = models.weights_sha256(tmp)
        atomic.write_json(tmp / MARKER, {**identity, "merged": True,
                                         "merged_weights_sha256": report["merged_weights_sha256"], "report": report})
    atomic.write_json(report_path, report)
    return MergeResult(True, None, False, parity.max_abs_logit_diff, dtype_name, str(layout.MERGED), str(report_path))
