"""Training in tests: a project folder with processed data built directly (no preprocess stage),
and `python -m tasks train` as a real process to kill and resume.

- `tiny_project(root, train_overrides, fmt, base)`: params.yaml (tiny model, 4 steps) + processed
  data of REVIEWS in the layout preprocess writes (docs/architecture.md); returns the params path.
- `write_processed(root, fmt)`, `adapter_bytes(root)`: that data; the adapter files' bytes.
- `launch(params_path)` / `finish(params_path)`: the train stage in a subprocess (stderr to
  <root>/train.stderr); `curve(root)`: the per-step log without timings; `started`/`sealed_step`:
  checkpoint-<step> begun / sealed; `wait_until`, `kill_when`: poll, and SIGKILL at a checkpoint.
- `SAME_GLOBAL_BATCH`: train overrides that several processes split the same way one process
  accumulates (the multi-process tests compare against one process); `losses(root)`: the loss column.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from support.projects import REPO
from tasks import checkpoints, layout, models
from tasks.config import ModelConfig

REVIEWS = [
    ("a warm, funny and moving film", "positive"),
    ("dull, overlong and lifeless", "negative"),
    ("the cast is superb and the story sings", "positive"),
    ("a mess of clichés with no heart", "negative"),
    ("one of the best films of the year", "positive"),
    ("i checked my watch every five minutes", "negative"),
    ("smart, tender and beautifully shot", "positive"),
    ("the plot makes no sense at all", "negative"),
]
LABEL_NAMES = ["negative", "positive"]


def write_processed(root: Path, fmt: str = "instruction", repeat: int = 2) -> None:
    """data/processed/ + reports/preprocess.json in the preprocess stage's layout, from REVIEWS."""
    from datasets import Dataset, DatasetDict

    tok = models.load_tokenizer(models.resolve(ModelConfig(base="random:tiny")))
    rows = []
    for text, target in REVIEWS * repeat:
        prompt = f"Review: {text}\nSentiment: "
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        t_ids = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        row = {"prompt": prompt, "target": target, "label": LABEL_NAMES.index(target)}
        if fmt == "classification":
            row["input_ids"] = p_ids
        else:
            row["input_ids"] = p_ids + t_ids
            row["labels"] = [-100] * len(p_ids) + t_ids
        rows.append(row)
    split = Dataset.from_list(rows)
    DatasetDict(train=split, validation=split.select(range(4)), test=split.select(range(4))).save_to_disk(
        str(root / layout.PROCESSED))
    (root / layout.REPORTS).mkdir(parents=True, exist_ok=True)
    (root / layout.report("preprocess")).write_text(json.dumps({"label_names": LABEL_NAMES}))


def tiny_project(root: Path, train_overrides: dict | None = None, fmt: str = "instruction",
                 base: str = "random:tiny") -> Path:
    """A project folder with params.yaml (tiny model, few steps) and processed data; returns params path."""
    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["base"] = base
    params["preprocess"]["format"] = fmt
    params["train"]["peft"]["last_layers"] = None  # the tiny model has 2 layers
    params["train"].update({"max_steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "save_steps": 2,
                            "learning_rate": 1.0e-3, "warmup_steps": 0, "lr_scheduler": "constant"})
    params["train"].update(train_overrides or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_processed(root, fmt)
    return root / "params.yaml"


def adapter_bytes(root: Path) -> dict[str, bytes]:
    folder = root / layout.ADAPTER
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def launch(params_path: Path) -> subprocess.Popen:
    log = open(params_path.parent / "train.stderr", "ab")
    return subprocess.Popen([sys.executable, "-m", "tasks", "train", "--params", str(params_path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=log)


# Same global batch either way: 1 process x micro 2 x accumulation 4, or 2 processes x micro 2 x 2.
SAME_GLOBAL_BATCH = {"max_steps": 6, "global_batch_size": 8, "micro_batch_size": 2, "save_steps": 3}


def losses(root: Path) -> list[float]:
    with open(root / layout.TRAIN_LOG) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def finish(params_path: Path) -> None:
    proc = launch(params_path)
    assert proc.wait(timeout=300) == 0, (params_path.parent / "train.stderr").read_text()[-3000:]


def curve(root: Path) -> list[tuple[str, ...]]:
    """The per-step log without the timing column (which legitimately differs)."""
    with open(root / layout.TRAIN_LOG) as f:
        return [(r["step"], r["loss"], r["learning_rate"], r["grad_norm"]) for r in csv.DictReader(f)]


def started(root: Path, step: int) -> bool:
    """True once the folder of checkpoint-<step> exists (its save has begun)."""
    return any((root / layout.CHECKPOINTS).glob(f"*/checkpoint-{step}"))


def sealed_step(root: Path, step: int) -> bool:
    """True once checkpoint-<step> exists with a verifying manifest."""
    return any(checkpoints.verify(c) for c in (root / layout.CHECKPOINTS).glob(f"*/checkpoint-{step}"))


def wait_until(proc: subprocess.Popen, done, timeout: float) -> None:
    """Poll until `done()` holds, the process exits or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and not done():
        time.sleep(0.0005)


def kill_when(proc: subprocess.Popen, root: Path, step: int, extra_delay: float) -> bool:
    """SIGKILL once checkpoint-<step> starts to appear, `extra_delay` s later at most: never after
    checkpoint-<step+1> starts to appear, so a fast machine cannot run past the kill.
    Returns True if a save was cut."""
    wait_until(proc, lambda: started(root, step), 300)
    wait_until(proc, lambda: started(root, step + 1), extra_delay)
    proc.kill()
    proc.wait()
    return any(not checkpoints.verify(c) for c in (root / layout.CHECKPOINTS).glob("*/checkpoint-*"))
