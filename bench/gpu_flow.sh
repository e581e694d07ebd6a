#!/usr/bin/env bash
# The whole finetune flow (Prefect + MLflow on SQLite + DVC with a local remote) on one GPU,
# on `random:llama-1b` in bf16, from the dependencies that bench/gpu_site.sh packed.
#
# Runs on the GPU machine, in a copy of the repository, with `.gpu-site/site.tar.xz` beside it
# (the device tool: carry [".gpu-site"], command `bash bench/gpu_flow.sh`). Writes to $OUT:
#   flow.log (the flow's whole output), reports.json (train/evaluate/merge reports, the MLflow
#   registry state, `dvc status`, versions), train_log.csv, loss_curve.png, confusion_matrix.png.
# STEPS (default 300) sets train.max_steps; MODEL and DEVICE override model.base and train.device;
# QUANTIZE=1 trains QLoRA (train.peft.quantize_4bit);
# TARBALL= (empty) runs it with the python3 on PATH (bench/gpu_project.sh).
set -euo pipefail
source "$(dirname "$0")/gpu_project.sh"
python3 -c 'import torch, transformers, peft, prefect, mlflow, dvc.version, datasets, pyarrow
print("versions:", {m.__name__: m.__version__ for m in (torch, transformers, peft, prefect, mlflow, datasets, pyarrow)},
      "dvc", dvc.version.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")'
new_project /tmp/peftflow-gpu-flow
python3 - "${STEPS:-300}" <<'PY'
import os, sys, yaml
p = yaml.safe_load(open("params.yaml"))
p["model"]["base"] = os.environ.get("MODEL", "random:llama-1b")
p["preprocess"]["max_length"] = 512        # byte-level tokenizer: ~1 token per character
p["train"]["peft"]["last_layers"] = None  # all 16 layers of llama-1b
p["train"].update(max_steps=int(sys.argv[1]), save_steps=100, micro_batch_size=16, device=os.environ.get("DEVICE", "cuda"))
p["train"]["peft"]["quantize_4bit"] = os.environ.get("QUANTIZE") == "1"  # QLoRA; merge still into the bf16/fp32 base
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
PY
git commit -qam "params: random:llama-1b on CUDA"

start=$(date +%s)
python3 -m flows.finetune 2>&1 | tee "$OUT/flow.log"
echo "flow wall: $(( $(date +%s) - start )) s" | tee -a "$OUT/flow.log"

python3 - "$OUT" <<'PY'
import json, shutil, subprocess, sys
from pathlib import Path
from tasks import tracking
from tasks.config import load_params
out, params = Path(sys.argv[1]), load_params("params.yaml")
client, name = tracking.client(params), params.register.model_name
versions = [{"version": v.version, "run_id": v.run_id, "aliases": client.get_model_version(name, v.version).aliases}
            for v in client.search_model_versions(f"name='{name}'")]
result = {stage: tracking.read_report(params, stage) for stage in ("train", "evaluate", "merge")}
result["registry"] = versions
result["dvc_status"] = subprocess.run([sys.executable, "-m", "dvc", "status"], capture_output=True, text=True).stdout
if shutil.which("nvidia-smi"):
    result["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                           "--format=csv,noheader"], capture_output=True, text=True).stdout
(out / "reports.json").write_text(json.dumps(result, indent=1, default=str))
print(json.dumps({k: result[k] for k in ("registry", "dvc_status")}, indent=1))
PY
cp reports/train_log.csv reports/loss_curve.png reports/confusion_matrix.png "$OUT"/
