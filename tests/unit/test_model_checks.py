"""Settings that depend on the model's shape fail when the params are loaded, with the value to set,
from the model's configuration alone (no weights read, nothing converted or materialised)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from tasks import model_checks
from tasks.config import parse_params
from tasks.errors import ConfigError

MINILM_CLS = {"model": {"base": "embedded:minilm-l6"}, "preprocess": {"format": "classification"}}


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    """An empty model cache: a check that loaded or converted weights would leave files in it."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PEFTFLOW_CACHE", str(cache))
    yield
    assert not cache.exists() or not any(cache.rglob("*")), sorted(cache.rglob("*"))


def check(data: dict) -> str | None:
    try:
        model_checks.check(parse_params(data))
    except ConfigError as err:
        return str(err)
    return None


@pytest.mark.parametrize("data, message", [
    ({**MINILM_CLS, "train": {"peft": {"last_layers": 16}}},  # the case: params.yaml's own suggestion
     "train.peft.last_layers = 16 but embedded:minilm-l6 has 6 layers; set train.peft.last_layers to <= 6 or null"),
    ({"model": {"base": "random:tiny"}, "train": {"peft": {"last_layers": 3}}},
     "train.peft.last_layers = 3 but random:tiny has 2 layers; set train.peft.last_layers to <= 2 or null"),
    ({**MINILM_CLS, "train": {"peft": {"last_layers": None, "target_modules": ["query", "q_proj"]}}},
     "train.peft.target_modules ['q_proj'] match no module of embedded:minilm-l6; its linear modules are "
     "classifier, dense, key, query, value (or set train.peft.target_modules: all-linear)"),
    ({"model": {"base": "random:tiny"}, "train": {"peft": {"last_layers": None, "target_modules": ["query"]}}},
     "its linear modules are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    ({**MINILM_CLS, "preprocess": {"format": "classification", "max_length": 1024}},
     "preprocess.max_length = 1024 but embedded:minilm-l6 reads at most 512 positions; "
     "set preprocess.max_length to <= 512"),
    ({"model": {"base": "random:tiny"}, "train": {"peft": {"method": "prompt_tuning", "last_layers": 1}}},
     "set train.peft.last_layers to null"),
])
def test_a_setting_the_model_cannot_take_names_the_value_to_set(data, message):
    got = check(data)
    assert got is not None and message in got, got


@pytest.mark.parametrize("data", [
    {"model": {"base": "random:tiny"}, "train": {"peft": {"last_layers": 2, "target_modules": ["q_proj", "v_proj"]}}},
    {**MINILM_CLS, "preprocess": {"format": "classification", "max_length": 512},
     "train": {"peft": {"last_layers": 6, "target_modules": ["query", "value"]}}},
    {},  # the shipped default (embedded SmolLM2, 30 layers, top 16), read from the GGUF header alone
    {"model": {"base": "no-such-org/no-such-model"}},  # no config offline: the stage's resolve says why
])
def test_settings_that_fit_pass(data):
    assert check(data) is None


def test_the_stage_cli_refuses_before_the_stage_runs(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["base"] = "embedded:minilm-l6"
    params["preprocess"]["format"] = "classification"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = subprocess.run([sys.executable, "-m", "tasks", "preprocess", "--params", str(tmp_path / "params.yaml")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: train.peft.last_layers = 16 but embedded:minilm-l6 has 6 layers; "
        "set train.peft.last_layers to <= 6 or null"], out.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # preprocess never started
