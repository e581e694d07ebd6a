"""tasks/project.py without git or DVC: the generated dvc.yaml, the check load_config runs, names."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks import project
from tasks.config import load_params
from tasks.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _project(root: Path, text: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dvc.yaml").write_text(project.render_dvc_yaml(root) if text is None else text)
    return root


def test_outside_the_checkout_code_deps_are_absolute_paths_to_the_package(tmp_path):
    root = _project(tmp_path / "task")
    deps = {d for s in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values() for d in s["deps"]}
    code = {d for d in deps if d.endswith(".py")}
    assert code and all(Path(d).is_absolute() and Path(d).parent == REPO / "tasks" for d in code)
    assert deps - code == {"data/raw/dataset.parquet", "data/processed", "models/adapter"}
    project.check(root)


def test_the_checkout_renders_its_own_dvc_yaml():
    assert project.render_dvc_yaml(REPO) == (REPO / "dvc.yaml").read_text()
    project.check(REPO)


def test_check_refuses_a_folder_without_dvc_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"no dvc.yaml.*python -m tasks.project sync"):
        project.check(tmp_path)


def test_check_refuses_a_stale_dvc_yaml(tmp_path):
    text = project.render_dvc_yaml(tmp_path).replace(f"      - {REPO}/tasks/merge.py\n", "", 1)
    assert text != project.render_dvc_yaml(tmp_path)
    _project(tmp_path, text)
    with pytest.raises(ConfigError, match=r"does not list the stages.*python -m tasks.project sync"):
        project.check(tmp_path)


def test_check_refuses_stage_code_that_differs_from_this_process(tmp_path):
    other = tmp_path / "other-checkout"
    (other / "tasks").mkdir(parents=True)
    for f in (REPO / "tasks").glob("*.py"):
        (other / "tasks" / f.name).write_bytes(f.read_bytes())
    (other / "dvc.yaml").write_bytes((REPO / "dvc.yaml").read_bytes())
    root = _project(tmp_path / "task", project.render_dvc_yaml(tmp_path / "task", code=other))
    project.check(root, code=other)
    (other / "tasks" / "train.py").write_text("# changed\n")
    with pytest.raises(ConfigError, match=r"differs from the code this flow runs.*tasks/train.py"):
        project.check(root)


def test_set_names_keeps_comments_and_other_keys():
    text = "model:\n  base: x  # keep\nregister:\n  experiment: peftflow  # own\n  model_name: peftflow-adapter\n  min_delta: 0.0\n"
    out = project._set_names(text, "my-task", "my-task-adapter")
    assert out == text.replace("experiment: peftflow ", "experiment: my-task ").replace(
        "model_name: peftflow-adapter", "model_name: my-task-adapter")
    assert yaml.safe_load(project._set_names("model:\n  base: x\n", "a", "a-adapter"))["register"] == {
        "experiment": "a", "model_name": "a-adapter"}


@pytest.mark.parametrize("example", ["chat", "wiki-descriptions", "quality-run", "seed-tutorial"])
def test_new_from_each_example_names_its_own_model(example, tmp_path):
    source = project._source_params(example)
    text = project._set_names(source.read_text(), "t1", "t1-adapter")
    (tmp_path / "params.yaml").write_text(text)
    params, original = load_params(tmp_path / "params.yaml"), load_params(source)
    assert (params.register.experiment, params.register.model_name) == ("t1", "t1-adapter")
    assert params.model_dump(exclude={"register"}) == original.model_dump(exclude={"register"})


def test_new_refuses_a_non_empty_folder_and_an_unknown_example(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    with pytest.raises(ConfigError, match="not empty"):
        project.new(tmp_path / "x", "chat")
    with pytest.raises(ConfigError, match=r"no such example.*chat"):
        project.new(tmp_path / "y", "no-such-example")
    assert not (tmp_path / "y").exists()
