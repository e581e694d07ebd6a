#!/usr/bin/env bash
# The train stage sharded with FSDP2 (`train.sharding: fsdp`) over N GPUs on random:llama-8b, for a
# multi-GPU machine (device tool: carry [".gpu-site"], kind nvidia-h200-x2 with N=2, x4 with N=4;
# N=1 gives the one-GPU baseline without sharding; FAST=0 turns the fast path off). Not yet run on
# GPUs (no multi-GPU machine was lent); checked on CPU with `TARBALL= MODEL=random:tiny DEVICE=cpu`.
# Writes to $OUT: train.out, train.json, train_log.csv, checkpoints.txt.
set -euo pipefail
export N=${N:-2} STEPS=${STEPS:-40}
source "$(dirname "$0")/gpu_project.sh"
new_project /tmp/peftflow-fsdp
python3 - <<'PY'
import os, yaml
p = yaml.safe_load(open("params.yaml"))
p["model"]["base"] = os.environ.get("MODEL", "random:llama-8b")
p["preprocess"].update(max_length=2048, max_samples=4000)
p["train"]["peft"]["last_layers"] = None
n = int(os.environ["N"])
p["train"].update(max_steps=int(os.environ["STEPS"]), save_steps=20, global_batch_size=16, micro_batch_size=4,
                  devices=n, sharding="fsdp" if n > 1 else "none", device=os.environ.get("DEVICE", "cuda"))
p["train"]["fast_path"]["enabled"] = os.environ.get("FAST", "1") == "1"
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
PY
python3 -m tasks ingest > /dev/null && python3 -m tasks preprocess > /dev/null
python3 -m tasks train > "$OUT/train.out" 2>&1 || { tail -60 "$OUT/train.out"; exit 1; }
cp reports/train.json reports/train_log.csv "$OUT/"; ls checkpoints/*/ > "$OUT/checkpoints.txt"
python3 -c "import json; r = json.load(open('reports/train.json')); print({k: r[k] for k in ('devices', 'steps', 'final_loss', 'tokens_per_second', 'peak_memory_bytes', 'seconds_per_step')})"
