#!/usr/bin/env bash
# The train stage on 1 and then N GPUs (train.devices; DDP over NCCL under torchrun), same params,
# same global batch: scaling and loss agreement. Same setup as bench/gpu_flow.sh (carry .gpu-site).
#   N (default 2) GPUs; STEPS (default 60) steps of GLOBAL (default 32) rows, micro-batch 16; MODEL, DEVICE override (CPU check:
#   TARBALL= MODEL=random:tiny DEVICE=cpu runs it over gloo). Writes train-<n>.json / train_log-<n>.csv to $OUT.
set -euo pipefail
source "$(dirname "$0")/gpu_project.sh"
new_project /tmp/peftflow-gpu-ddp
python3 - "${STEPS:-60}" <<'PY'
import os, sys, yaml
p = yaml.safe_load(open("params.yaml"))
p["model"]["base"] = os.environ.get("MODEL", "random:llama-1b")
p["preprocess"].update(max_length=512, max_samples=4000)
p["train"]["peft"]["last_layers"] = None
p["train"].update(max_steps=int(sys.argv[1]), save_steps=1000, global_batch_size=int(os.environ.get("GLOBAL", 32)), micro_batch_size=16,
                  device=os.environ.get("DEVICE", "cuda"), warmup_steps=0.1)
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
PY
python3 -m tasks ingest > /dev/null && python3 -m tasks preprocess > /dev/null
for n in 1 "${N:-2}"; do
  sed -i "s/^  devices: .*/  devices: $n/" params.yaml
  grep -q "^  devices: $n$" params.yaml
  rm -rf models checkpoints reports/train.json
  python3 -m tasks train > "$OUT/train-$n.out" 2>&1 || { tail -40 "$OUT/train-$n.out"; exit 1; }
  cp reports/train.json "$OUT/train-$n.json" && cp reports/train_log.csv "$OUT/train_log-$n.csv"
done
python3 - "$OUT" "${N:-2}" <<'PY'
import csv, json, statistics, sys
from pathlib import Path
out, n = Path(sys.argv[1]), sys.argv[2]
def steady(k):  # median tokens/s over the second half of the steps (after compilation and warm-up)
    rows = list(csv.DictReader(open(out / f"train_log-{k}.csv")))
    return statistics.median(float(r["tokens_per_second"]) for r in rows[len(rows) // 2:]), rows
(one, r1), (many, rn) = steady("1"), steady(n)
diff = max(abs(float(a["loss"]) - float(b["loss"])) / float(a["loss"]) for a, b in zip(r1, rn))
print(json.dumps({"tokens_per_s_1": one, f"tokens_per_s_{n}": many, "speedup": many / one,
                  "max_rel_loss_diff": diff}, indent=1))
PY
