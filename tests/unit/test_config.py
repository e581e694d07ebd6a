"""params.yaml errors are clear (key path, bad value, what is allowed) and the reference stays in sync."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from tasks.config import Params, Section, load_params, parse_params
from tasks.errors import ConfigError
from tasks.params_doc import params_reference

REPO = Path(__file__).resolve().parents[2]


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as err:
        parse_params(data, source="params.yaml")
    return str(err.value)


def test_misspelt_key_names_its_path():
    msg = error_of({"train": {"learning_rat": 0.1}})
    assert "train.learning_rat: unknown key" in msg


def test_wrong_type_names_key_and_value():
    msg = error_of({"train": {"max_steps": "many"}})
    assert "train.max_steps = 'many'" in msg and "integer" in msg


def test_out_of_range_says_what_is_allowed():
    msg = error_of({"preprocess": {"split": {"test": 0.9}}})
    assert "preprocess.split.test = 0.9" in msg and "0.5" in msg


def test_cross_field_rule_is_explained():
    msg = error_of({"train": {"global_batch_size": 10, "micro_batch_size": 4}})
    assert "multiple of micro_batch_size" in msg


def test_invalid_yaml_gives_line_and_column(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  max_steps: 4\n  seed: [1, 2\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+, column \d+"):
        load_params(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_root_is_the_params_folder(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: {max_steps: 3}\n")
    params = load_params(path)
    assert params.root == tmp_path.resolve() and params.train.max_steps == 3 and len(params.sha256) == 64


def test_cli_bad_params_prints_one_message_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest:\n  sourse: embedded:rotten_tomatoes\n")
    proc = subprocess.run([sys.executable, "-m", "tasks", "preprocess", "--params", str(bad)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "ingest.sourse: unknown key" in proc.stderr
    assert proc.stdout == ""


def test_params_doc_is_generated_from_the_schema():
    doc = (REPO / "docs" / "params.md").read_text()
    assert doc.strip() == params_reference().strip(), "regenerate: python -m tasks params-doc > docs/params.md"


def test_repo_params_yaml_lists_every_key_and_loads():
    load_params(REPO / "params.yaml")
    data = yaml.safe_load((REPO / "params.yaml").read_text())

    def missing(model: type[BaseModel], section: dict, prefix: str) -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            key = f"{prefix}.{name}" if prefix else name
            if name not in section:
                out.append(key)
            elif isinstance(field.annotation, type) and issubclass(field.annotation, Section):
                out += missing(field.annotation, section[name] or {}, key)
        return out

    assert missing(Params, data, "") == []


def test_seed_tutorial_is_expressible_as_params():
    """shared/seed's LoRA recipe, as examples/seed-tutorial/params.yaml, validates and keeps its settings."""
    from tasks.config import load_params

    p = load_params(REPO / "examples" / "seed-tutorial" / "params.yaml")
    lora = p.train.peft
    assert (lora.method, lora.r, lora.alpha, lora.dropout, lora.target_modules) == ("lora", 8, 32.0, 0.05,
                                                                                      ["q_proj", "v_proj"])
    assert (p.train.global_batch_size, p.preprocess.max_length, p.preprocess.format) == (4, 128, "text")


def test_fast_path_switches_short_form_and_unknown_switch(tmp_path):
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    for short in (True, False):
        base["train"]["fast_path"] = short
        params = parse_params(base)
        assert params.train.fast_path.enabled is short and params.train.fast_path.packing is True
    base["train"]["fast_path"] = {"liger": False}
    assert parse_params(base).train.fast_path.model_dump() == {
        "enabled": True, "packing": True, "liger": False, "adapter_input_cast": False, "fused_lora": True,
        "fused_adamw": True, "compile": True}
    base["train"]["fast_path"] = {"ligr": False}
    with pytest.raises(ConfigError, match=r"train\.fast_path\.ligr: unknown key"):
        parse_params(base)


def test_epochs_and_max_steps_are_exclusive_and_epochs_become_the_trainers_steps():
    msg = error_of({"train": {"epochs": 3, "max_steps": 100}})
    assert "train.epochs (3) and train.max_steps (100) are both set" in msg and "set the other to null" in msg
    assert "both null" in error_of({"train": {"max_steps": None}})
    cfg = parse_params({"train": {"max_steps": None, "epochs": 2, "global_batch_size": 4, "micro_batch_size": 2}}).train
    # 17 rows in passes of 2 = 9 passes; 2 passes a step, the last step short: 5 steps an epoch
    assert cfg.optimizer_steps(17) == 10 and cfg.length == "2 epochs"
    assert cfg.optimizer_steps(17, world=2) == 10  # 9 rows per process: 5 passes of 2, one pass a step
    assert parse_params({}).train.optimizer_steps(17) == 100 and parse_params({}).train.length == "100 steps"


def test_cost_is_device_hours_times_the_rate_and_absent_without_a_rate():
    assert parse_params({}).register.cost(2.0) is None
    assert parse_params({"register": {"cost_per_device_hour": 2.5}}).register.cost(0.5) == 1.25
    assert "cost_per_device_hour" in error_of({"register": {"cost_per_device_hour": -1}})
    assert parse_params({}).preprocess.split.stratify is True
