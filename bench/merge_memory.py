"""Peak memory and time of the merge stage, against the merged model's own size.

    .venv/bin/python bench/merge_memory.py                          # SmolLM2-135M (embedded), CPU
    .venv/bin/python bench/merge_memory.py --base random:llama-8b   # 8B shape, random weights, CPU

Builds a throwaway project (the embedded rotten_tomatoes data, classification as params.yaml
ships it), saves a LoRA adapter on every linear layer (r=16, seeded random A and B, so the update
is really there), then runs the merge stage (`tasks/merge.py`, the pipeline's own code) in a fresh
process and prints, as one JSON line: peak RSS of that process, its RSS after the imports (the
interpreter and libraries, which no merge can avoid), the merge's own peak (the difference), the
bytes of the merged safetensors (peaks read from /proc/self/status), the ratio of the two, wall seconds and the parity figures.
Figures: docs/benchmarks.md ("Merging large models").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def status_bytes(key: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries that across exec,
    so a child would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def build(root: Path, base: str, dtype: str) -> Path:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    from tasks import ingest, layout, models, preprocess
    from tasks.config import load_params

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["base"] = base
    params["preprocess"]["max_samples"] = 200
    params["merge"]["dtype"] = dtype
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "data/raw").mkdir(parents=True)
    ingest._read_source("embedded:rotten_tomatoes", "train", None, root).to_pandas().to_parquet(
        root / "data/raw/dataset.parquet")
    p = load_params(root / "params.yaml")
    preprocess.run(p)
    resolved = models.resolve(p.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = models.load_model(resolved, classification_labels=2, dtype=torch.bfloat16)
        peft_model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=16, lora_alpha=32,
                                                      target_modules="all-linear"))
        with torch.no_grad():
            for _, t in peft_model.named_parameters():
                if t.requires_grad:
                    t.normal_(0.0, 0.02)
    peft_model.save_pretrained(str(root / layout.ADAPTER), safe_serialization=True)
    models.load_tokenizer(resolved).save_pretrained(str(root / layout.ADAPTER))
    return root / "params.yaml"


def child(params_path: str) -> None:
    import peft  # noqa: F401  the libraries every merge needs, loaded before the baseline is read
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from tasks import layout, merge
    from tasks.config import load_params

    params = load_params(params_path)
    after_imports = status_bytes("VmRSS")
    start = time.perf_counter()
    result = merge.run(params)
    seconds = time.perf_counter() - start
    peak = status_bytes("VmHWM")
    merged_bytes = sum(f.stat().st_size for f in (params.root / layout.MERGED).glob("*.safetensors"))
    report = json.loads((params.root / layout.report("merge")).read_text())
    print(json.dumps({
        "base": params.model.base, "dtype": result.dtype, "seconds": round(seconds, 1),
        "peak_rss_gb": round(peak / 2**30, 3), "rss_after_imports_gb": round(after_imports / 2**30, 3),
        "merge_peak_gb": round((peak - after_imports) / 2**30, 3), "merged_gb": round(merged_bytes / 2**30, 3),
        "merge_peak_over_merged": round((peak - after_imports) / merged_bytes, 2),
        "parity": {k: report.get(k) for k in ("max_abs_logit_diff", "tolerance", "max_layer_error", "layers_checked",
                                              "parity_dtype")},
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="merge.dtype")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    with tempfile.TemporaryDirectory() as tmp:
        params_path = build(Path(tmp) / "proj", args.base, args.dtype)
        subprocess.run([sys.executable, __file__, "--child", str(params_path)], check=True)


if __name__ == "__main__":
    main()
