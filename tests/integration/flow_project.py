"""Helpers of the flow/DVC/Prefect integration tests: a checkout-like tiny project, DVC and MLflow probes."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_project
from tasks import tracking
from tasks.config import load_params


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
    params = load_params(root / "params.yaml")
    c = tracking.client(params)
    return sorted(str(v.version) for v in c.search_model_versions(f"name='{params.register.model_name}'"))


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_HOME: tmp_path_factory.mktemp("prefect-home")}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


