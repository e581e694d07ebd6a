"""ingest + preprocess in a real temporary project: git, DVC, a local remote, no mocks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_from_disk

from conftest import git, make_project
from tasks import ingest, layout, preprocess, versioning
from tasks.config import load_params
from tasks.errors import DataError

pytestmark = pytest.mark.integration

DVCFILE = Path(f"{layout.RAW_DATA}.dvc")


def objects(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()


def test_ingest_versions_pushes_is_idempotent_then_preprocess_and_push_check(project):
    params = load_params(project / "params.yaml")
    first = ingest.run(params)
    assert first.rows == 12808 and first.changed and first.path == str(layout.RAW_DATA)
    assert first.md5 == versioning.md5(project, layout.RAW_DATA) == versioning.recorded_md5(project, layout.RAW_DATA)
    cache, remote = objects(project / ".dvc" / "cache"), objects(project / ".dvc-storage")
    assert f"files/md5/{first.md5[:2]}/{first.md5[2:]}" in remote and remote <= cache
    git(project, "add", "-A")
    git(project, "commit", "-qm", "data v1")
    dvc_bytes = (project / DVCFILE).read_bytes()

    again = ingest.run(params)
    assert (again.md5, again.changed) == (first.md5, False)
    assert objects(project / ".dvc" / "cache") == cache and objects(project / ".dvc-storage") == remote
    assert (project / DVCFILE).read_bytes() == dvc_bytes
    assert git(project, "status", "--porcelain") == ""

    result = preprocess.run(params)
    ds = load_from_disk(str(project / layout.PROCESSED))
    assert sum(len(s) for s in ds.values()) == 200 == sum(result.rows.values())  # TINY max_samples
    report = json.loads((project / layout.report("preprocess")).read_text())
    assert report["dropped"]["duplicate_text"] > 0 and report["label_names"] == ["negative", "positive"]
    texts = [set(ds[s]["prompt"]) for s in ("train", "validation", "test")]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])

    # Objects lost from cache and remote: `dvc push` has nothing to send and succeeds; push() must not.
    obj = Path("files/md5") / first.md5[:2] / first.md5[2:]
    (project / ".dvc-storage" / obj).unlink()
    (project / ".dvc" / "cache" / obj).unlink()
    with pytest.raises(DataError, match="lacks 1 object"):
        versioning.push(project, [layout.RAW_DATA])


def test_changed_local_csv_gets_a_new_md5(project):
    (project / "data").mkdir(exist_ok=True)
    csv = project / "data" / "mine.csv"
    csv.write_text("text,category,movie_name\ngreat,fresh,a\nawful,rotten,b\n")
    make = lambda: load_params(project / "params.yaml")  # noqa: E731
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace(
        "source: embedded:rotten_tomatoes", "source: data/mine.csv"))
    first = ingest.run(make())
    csv.write_text("text,category,movie_name\ngreat,fresh,a\nawful,rotten,b\nfine,fresh,c\n")
    second = ingest.run(make())
    assert second.changed and second.md5 != first.md5 and second.rows == 3
    assert f"files/md5/{second.md5[:2]}/{second.md5[2:]}" in objects(project / ".dvc-storage")


def test_push_without_a_remote_says_how_to_add_one(tmp_path):
    root = make_project(tmp_path / "p")
    subprocess.run([sys.executable, "-m", "dvc", "remote", "remove", "local"], cwd=root, check=True)
    with pytest.raises(DataError, match="dvc remote add -d"):
        ingest.run(load_params(root / "params.yaml"))


def test_ingest_outside_a_dvc_project_is_a_clear_error(tmp_path):
    (tmp_path / "params.yaml").write_text("ingest: {source: embedded:rotten_tomatoes}\n")
    with pytest.raises(DataError, match="not a DVC project"):
        ingest.run(load_params(tmp_path / "params.yaml"))


def test_stage_status_and_commit(project):
    (project / "in.txt").write_text("1\n")
    (project / "dvc.yaml").write_text(
        "stages:\n  copy:\n    cmd: cp in.txt out.txt\n    deps: [in.txt]\n    outs: [out.txt]\n")
    (project / "out.txt").write_text("1\n")  # produced outside DVC, as a Prefect run does
    assert not versioning.stage_is_current(project, "copy")
    versioning.commit(project, ["copy"])
    assert versioning.stage_is_current(project, "copy")
    assert "out.txt" in (project / "dvc.lock").read_text()
    (project / "in.txt").write_text("2\n")
    assert not versioning.stage_is_current(project, "copy")


def test_cli_ingest_prints_only_the_result_json(project):
    proc = subprocess.run([sys.executable, "-m", "tasks", "ingest", "--params", str(project / "params.yaml")],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rows"] == 12808
