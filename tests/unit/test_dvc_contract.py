"""dvc.yaml, the stage CLI (`python -m tasks <stage>`) and the stage code stay in step.

- every dvc.yaml stage is a CLI stage and runs exactly `python -m tasks <stage>`;
- its code deps are exactly the `tasks/*.py` files the stage module imports (transitively), so a
  code change reruns precisely the stages that run that code;
- its params are exactly the params.yaml sections that code reads (`params.<section>`; of another
  stage's module only the functions it imports count);
- its outputs are the fixed paths of tasks/layout.py, and reports/<stage>.json is a metric.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tasks import layout
from tasks.__main__ import STAGES
from tasks.config import Params

REPO = Path(__file__).resolve().parents[2]
DVC_STAGES = ["preprocess", "train", "evaluate", "merge"]
SECTIONS = {name for name, f in Params.model_fields.items() if not f.exclude}
# Files every stage's import closure reaches but whose change must not rerun everything.
NOT_CODE_DEPS = {"tasks/__init__.py", "tasks/__main__.py"}
# Data each stage reads (the previous stage's outputs).
DATA_DEPS = {
    "preprocess": {str(layout.RAW_DATA)},
    "train": {str(layout.PROCESSED)},
    "evaluate": {str(layout.PROCESSED), str(layout.ADAPTER)},
    "merge": {str(layout.PROCESSED), str(layout.ADAPTER)},
}
OUTS = {"preprocess": {str(layout.PROCESSED)}, "train": {str(layout.ADAPTER)}, "evaluate": set(),
        "merge": {str(layout.MERGED)}}


@pytest.fixture(scope="module")
def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _paths(entries: list) -> set[str]:
    """dvc.yaml lists entries as plain strings or one-key mappings (path: options)."""
    return {e if isinstance(e, str) else next(iter(e)) for e in entries or []}


def _imports(path: Path) -> set[str]:
    """`tasks.*` modules imported anywhere in a file (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tasks."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tasks":
                found.update(f"tasks.{a.name}" for a in node.names)
            elif node.module.startswith("tasks."):
                found.add(node.module)
    return {m for m in found if (REPO / (m.replace(".", "/") + ".py")).is_file()}


def import_closure(stage: str) -> set[str]:
    """Repo-relative files of tasks.<stage> and every tasks module it imports, transitively."""
    todo, seen = [f"tasks.{stage}"], set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        todo.extend(_imports(REPO / (mod.replace(".", "/") + ".py")))
    return {m.replace(".", "/") + ".py" for m in seen} - NOT_CODE_DEPS


def _params_sections(nodes) -> set[str]:
    return {n.attr for node in nodes for n in ast.walk(node)
            if isinstance(n, ast.Attribute) and n.attr in SECTIONS and isinstance(n.value, ast.Name)
            and n.value.id == "params"}


def _functions_used(tree: ast.Module, names: set[str]) -> list[ast.AST]:
    """Module-level functions `names` plus the module functions they call, transitively."""
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    todo, seen = [n for n in names if n in defs], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(n.id for n in ast.walk(defs[name]) if isinstance(n, ast.Name) and n.id in defs)
    return [defs[n] for n in seen]


def sections_read(stage: str) -> set[str]:
    """params.yaml sections the stage's code reads as `params.<section>`.

    The stage module and its helper modules count whole; of another stage's module (e.g. merge
    reusing evaluate's loaders) only the functions imported by name, and what they call, count.
    """
    files = import_closure(stage) - {"tasks/config.py"}
    trees = {rel: ast.parse((REPO / rel).read_text()) for rel in files}
    whole = {rel for rel in files if rel == f"tasks/{stage}.py" or Path(rel).stem not in STAGES}
    used: dict[str, set[str]] = {}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.startswith("tasks.") and node.module.split(".")[1] in STAGES:
                    used.setdefault(node.module.replace(".", "/") + ".py", set()).update(a.name for a in node.names)
                elif node.module == "tasks":
                    whole.update(f"tasks/{a.name}.py" for a in node.names if a.name in STAGES)
            elif isinstance(node, ast.Import):
                whole.update(a.name.replace(".", "/") + ".py" for a in node.names
                             if a.name.startswith("tasks.") and a.name.split(".")[1] in STAGES)
    read: set[str] = set()
    for rel, tree in trees.items():
        if rel in whole:
            read |= _params_sections([tree])
        elif rel in used:
            read |= _params_sections(_functions_used(tree, used[rel]))
    return read


def test_stage_names_match_the_cli(dvc_stages):
    assert list(dvc_stages) == DVC_STAGES
    assert set(DVC_STAGES) <= set(STAGES)
    for name, stage in dvc_stages.items():
        assert stage["cmd"] == f"python -m tasks {name}", name
        assert (REPO / "tasks" / f"{name}.py").is_file(), f"dvc.yaml stage {name} has no tasks/{name}.py"


@pytest.mark.parametrize("stage", DVC_STAGES)
def test_code_deps_are_the_import_closure(dvc_stages, stage):
    if not (REPO / "tasks" / f"{stage}.py").is_file():
        pytest.fail(f"tasks/{stage}.py is missing")
    deps = _paths(dvc_stages[stage]["deps"])
    code = {d for d in deps if d.startswith("tasks/")}
    closure = import_closure(stage)
    assert code == closure, (
        f"dvc.yaml stage {stage}: missing code deps {sorted(closure - code)}, extra {sorted(code - closure)}")
    assert deps - code == DATA_DEPS[stage]


@pytest.mark.parametrize("stage", DVC_STAGES)
def test_params_are_the_sections_read(dvc_stages, stage):
    declared = set(dvc_stages[stage].get("params") or [])
    read = sections_read(stage)
    assert declared == read, (
        f"dvc.yaml stage {stage}: params {sorted(declared)} but its code reads {sorted(read)}")
    assert declared <= SECTIONS
    # Sanity of the analysis itself: every stage reads the model and its own section.
    assert {"model", stage} <= read


@pytest.mark.parametrize("stage", DVC_STAGES)
def test_outputs_are_the_layout_paths(dvc_stages, stage):
    s = dvc_stages[stage]
    cached_outs = {p for e in s.get("outs") or [] for p in _paths([e])
                   if isinstance(e, str) or next(iter(e.values())).get("cache", True)}
    assert cached_outs == OUTS[stage]
    metrics = s["metrics"]
    assert _paths(metrics) == {str(layout.report(stage))}
    assert metrics[0][str(layout.report(stage))]["cache"] is False  # small JSON: lives in git


def test_changing_train_params_reruns_only_downstream(dvc_stages):
    """train's outputs feed evaluate and merge; no stage before train may read `train:`."""
    assert "train" not in (dvc_stages["preprocess"].get("params") or [])
    for later in ("evaluate", "merge"):
        assert str(layout.ADAPTER) in _paths(dvc_stages[later]["deps"])


def test_plots_name_the_layout_files(dvc_stages):
    plots = {p: opts for stage in dvc_stages.values() for e in stage.get("plots") or []
             for p, opts in ([(e, {})] if isinstance(e, str) else e.items())}
    assert plots[str(layout.TRAIN_LOG)] == {"cache": False, "x": "step", "y": "loss"}
    assert str(layout.LOSS_CURVE) in plots and str(layout.CONFUSION_MATRIX) in plots


# --- Projects (tasks/project.py): every example is a project of its own, run in place. ---

EXAMPLES = sorted(p.parent for p in (REPO / "examples").glob("*/params.yaml"))


def test_every_example_is_a_project():
    assert EXAMPLES, "no examples/<name>/params.yaml found"
    for example in EXAMPLES:
        for name in ("dvc.yaml", ".gitignore", ".dvc/config", ".dvcignore"):
            assert (example / name).is_file(), f"{example.name}: missing {name}; run `python -m tasks.project sync {example}`"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_dvc_yaml_is_the_checkouts_with_code_deps_pointing_here(example):
    """The generated file is in step with dvc.yaml: same stages, code deps ../../tasks/*.py."""
    from tasks import project

    text = (example / "dvc.yaml").read_text()
    assert text == project.render_dvc_yaml(example), (
        f"examples/{example.name}/dvc.yaml is stale: run `python -m tasks.project sync examples/{example.name}`")
    stages = yaml.safe_load(text)["stages"]
    for name, stage in stages.items():
        code = {d for d in _paths(stage["deps"]) if d.endswith(".py")}
        assert code == {f"../../{d}" for d in import_closure(name)}, name
    project.check(example)  # what load_config runs first


def test_projects_have_their_own_registered_model_and_experiment():
    from tasks.config import load_params

    params = {p: load_params(p / "params.yaml") for p in [REPO, *EXAMPLES]}
    for key in ("model_name", "experiment"):
        names = [getattr(p.register, key) for p in params.values()]
        assert len(set(names)) == len(names), f"register.{key} shared between projects: {names}"


def test_example_dvc_projects_are_their_own_with_a_local_remote():
    for example in EXAMPLES:
        config = (example / ".dvc" / "config").read_text()
        assert "remote = local" in config and "url = ../.dvc-storage" in config, example.name
        assert "/.dvc-storage/" in (example / ".gitignore").read_text().splitlines()
