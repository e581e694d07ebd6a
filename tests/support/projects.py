"""Real projects for tests: `make_project` (a checkout-like project: params.yaml, dvc.yaml, the
stage code, git, DVC with a local remote) and what builds on it: `small_project` (a 120-row local
CSV source), `prepared_project` (raw reviews run through the real preprocess stage); probes of a
project's DVC status and registered versions.

`tests/conftest.py` re-exports REPO, TINY, deep_merge, git and make_project, so
`from conftest import make_project` keeps working.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tasks import layout
from tasks.config import Params, load_params

REPO = Path(__file__).resolve().parents[2]


def deep_merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for k, v in overrides.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# Small, fast defaults for tests: tiny random model, few rows, few steps.
TINY = {
    "model": {"base": "random:tiny"},
    "preprocess": {"max_length": 64, "max_samples": 200, "system_prompt": None},
    "train": {"max_steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "save_steps": 2,
              "learning_rate": 1.0e-3, "peft": {"last_layers": None}},
    "evaluate": {"max_samples": 16, "batch_size": 8, "generation_samples": 2, "sample_predictions": 4},
    "merge": {"parity_samples": 2},
}


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def make_project(root: Path, overrides: dict | None = None, *, tiny: bool = True) -> Path:
    """Create a real project at `root`: params.yaml (defaults + TINY + overrides), dvc.yaml and a
    copy of tasks/ and flows/ (the stages' code deps), `git init`, `dvc init`, and a local DVC remote at `<root>/.dvc-storage`."""
    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if tiny:
        params = deep_merge(params, TINY)
    params = deep_merge(params, overrides or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # A test project is a clone of this repo: dvc.yaml names the code files as stage deps.
    for name in ("dvc.yaml", ".gitignore"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, root / name)
    for package in ("tasks", "flows"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    git(root, "init", "-q")
    git(root, "config", "user.email", "test@peftflow.local")
    git(root, "config", "user.name", "peftflow test")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", ".dvc-storage"], cwd=root, check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "modify", "local", "url", ".dvc-storage"], cwd=root, check=True)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "init")
    return root


def write_reviews(path: Path, rows: int, seed: int) -> None:
    """A small review data set in the embedded source's columns (category, text, movie_name)."""
    rng = random.Random(seed)
    good, bad = ["great", "moving", "sharp", "funny"], ["dull", "slow", "messy", "flat"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["category", "text", "movie_name"])
        for i in range(rows):
            fresh = rng.random() < 0.5
            words = rng.sample(good if fresh else bad, 2)
            w.writerow(["fresh" if fresh else "rotten", f"A {words[0]} and {words[1]} film, take {i}.",
                        f"movie-{i % 17}"])


def small_project(root: Path, **overrides) -> Path:
    """make_project (a checkout-like project with the stage code committed) with a 120-row local CSV
    as the data source (fast to ingest, easy to change)."""
    project = make_project(root, {"ingest": {"source": "data/reviews.csv"}, **overrides})
    write_reviews(project / "data" / "reviews.csv", 120, seed=0)
    return project


def dvc_status(root: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out or "{}")


def registered_versions(root: Path) -> list[str]:
    from tasks import tracking

    params = load_params(root / "params.yaml")
    c = tracking.client(params)
    return sorted(str(v.version) for v in c.search_model_versions(f"name='{params.register.model_name}'"))


POSITIVE = ["a warm, funny and moving film", "the cast is superb", "smart, tender, beautifully shot",
            "one of the best films of the year", "the story sings"]
NEGATIVE = ["dull, overlong and lifeless", "a mess of cliches", "the plot makes no sense",
            "i checked my watch every minute", "no heart at all"]


def prepared_project(root: Path, overrides: dict | None = None) -> Params:
    """A real project with raw data run through the real preprocess stage; returns its params."""
    import pandas as pd

    from tasks import preprocess

    make_project(root, overrides)
    rows = [{"text": f"{t} #{k}", "category": cat, "movie_name": f"movie {k % 12}"}
            for k in range(6) for texts, cat in ((POSITIVE, "fresh"), (NEGATIVE, "rotten")) for t in texts]
    (root / layout.RAW_DATA).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(root / layout.RAW_DATA)
    params = load_params(root / "params.yaml")
    preprocess.run(params)
    return params
