"""Benchmark of the sweep flow: wall time, trials per hour, what Prefect + MLflow + Optuna add per trial.

    .venv/bin/python bench/sweep_overhead.py [--tiny] [--trials N] [--concurrency K] [--out FOLDER]

Makes a fresh project from examples/sweep (`python -m tasks.project new`), runs `python -m
flows.sweep` on it once (a fresh study) and reads the study and its MLflow runs back:
- wall: the whole command (Prefect server start, ingest, preprocess, every trial, the summary);
- per trial: Optuna's start -> complete time (ask ... tell, which spans the Prefect task, the
  state record, the nested MLflow run and its logging) against the time inside train + evaluate
  (`seconds.total`, measured in tasks/sweep.py); overhead = the difference;
- the best trial's validation metric against trial 0 (the params file's own values).
`--tiny` swaps in `random:tiny` with 4 steps (a check of the script, and the overhead in seconds
with almost nothing to train). Prints one JSON object.
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
TINY = {"model": {"base": "random:tiny"}, "preprocess": {"max_length": 64, "max_samples": 400, "system_prompt": None},
        "train": {"max_steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "save_steps": 2,
                  "peft": {"last_layers": None}},
        "evaluate": {"max_samples": 32, "batch_size": 8, "generation_samples": 2}}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    folder = (args.out or Path(tempfile.mkdtemp(prefix="sweep-bench-"))) / "project"
    py = sys.executable
    subprocess.run([py, "-m", "tasks.project", "new", str(folder), "--from", "examples/sweep", "--name", "sweepbench"],
                   cwd=REPO, check=True, capture_output=True)
    params = yaml.safe_load((folder / "params.yaml").read_text())
    over = dict(TINY) if args.tiny else {}
    if args.trials:
        over = merge(over, {"sweep": {"n_trials": args.trials}})
    if args.concurrency:
        over = merge(over, {"sweep": {"concurrency": args.concurrency}})
    (folder / "params.yaml").write_text(yaml.safe_dump(merge(params, over), sort_keys=False))
    started = time.perf_counter()
    run = subprocess.run([py, "-m", "flows.sweep", "--params", str(folder / "params.yaml")], cwd=REPO,
                         capture_output=True, text=True)
    wall = time.perf_counter() - started
    if run.returncode != 0:
        print(run.stdout[-3000:], run.stderr[-3000:], file=sys.stderr)
        return 1
    print(json.dumps(measure(folder, wall), indent=2))
    return 0


def measure(folder: Path, wall: float) -> dict:
    import optuna

    from tasks import sweep, sweep_tracking, tracking
    from tasks.config import load_params

    params = load_params(folder / "params.yaml")
    study = optuna.load_study(study_name=sweep.study_name(params), storage=sweep.storage_url(params))
    c = tracking.client(params)
    runs = c.search_runs([tracking.experiment_id(params, c)], filter_string=f"tags.`{sweep_tracking.TAG_TRIAL}` != ''")
    inside = {int(r.data.tags[sweep_tracking.TAG_TRIAL]): r.data.metrics.get("seconds.total") for r in runs}
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name != "COMPLETE" or inside.get(t.number) is None:
            continue
        span = (t.datetime_complete - t.datetime_start).total_seconds()
        rows.append({"trial": t.number, "value": t.value, "params": t.params, "span_s": round(span, 2),
                     "train_evaluate_s": round(inside[t.number], 2), "overhead_s": round(span - inside[t.number], 2)})
    first = min(t.datetime_start for t in study.get_trials(deepcopy=False))
    last = max(t.datetime_complete for t in study.get_trials(deepcopy=False) if t.datetime_complete)
    trial_phase = (last - first).total_seconds()
    overhead = sum(r["overhead_s"] for r in rows) / len(rows)
    span = sum(r["span_s"] for r in rows) / len(rows)
    default = next((r for r in rows if r["trial"] == 0), None)
    best = max(rows, key=lambda r: r["value"]) if params.sweep.objective.direction == "maximize" else \
        min(rows, key=lambda r: r["value"])
    return {"model": params.model.base, "trials": len(rows), "wall_s": round(wall, 1),
            "trial_phase_s": round(trial_phase, 1), "trials_per_hour": round(3600 * len(rows) / trial_phase, 1),
            "mean_trial_s": round(span, 2), "mean_overhead_s": round(overhead, 2),
            "overhead_pct_of_trial": round(100 * overhead / span, 2),
            "metric": params.sweep.objective.metric, "default_value": default and default["value"],
            "best": best, "per_trial": rows}


if __name__ == "__main__":
    sys.exit(main())
