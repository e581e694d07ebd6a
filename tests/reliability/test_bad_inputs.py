"""The bad-input matrix: each bad input fails early with a clear PeftflowError naming what to fix,
before any training or registry write, and leaves the project byte-for-byte unchanged (no new
file, no mlflow.db, no DVC object). Cases already covered elsewhere are listed in REFERENCED
(and in docs/reliability.md) instead of being run twice.

Every case starts from a copy of one prepared project (ingested + preprocessed, with a registered-
ready random:tiny adapter and reports), breaks one thing, runs the stage that first reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from conftest import REPO, make_project
from support.adapters import build_adapter
from support.projects import write_reviews
from tasks import atomic, layout, models
from tasks.adapters import adapter_sha256
from tasks.config import load_params
from tasks.errors import ConfigError, DataError, ModelError, PeftflowError

pytestmark = pytest.mark.integration

# Covered by other tests (same promise: early, clear error): referenced, not repeated.
REFERENCED = {
    "NaN adapter weights": "tests/unit/test_merge.py::test_nan_adapter_is_refused",
    "adapter for a different base": "tests/unit/test_merge.py::test_adapter_for_another_base_is_refused",
    "base folder with only pickle weights": "tests/unit/test_models.py::test_local_folder_without_safetensors_is_refused",
    "invalid model names (../, /, spaces)": "tests/integration/test_registry.py::test_invalid_model_names_rejected",
    "labels outside the label set": "tests/unit/test_preprocess.py::test_labels_outside_names_are_an_error_or_dropped",
    "hf: source offline": "tests/unit/test_preprocess.py::test_hf_source_offline_is_a_clear_error",
    "adapter config changed since training": "tests/integration/test_registry.py::test_adapter_changed_since_training_is_refused",
    "QLoRA without CUDA": "tests/unit/test_train.py::test_qlora_on_cpu_fails_before_loading_anything",
    "non-finite loss (NaN/inf) during training":
        "tests/unit/test_train.py::test_non_finite_loss_stops_with_the_step_and_writes_no_adapter",
}


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file of the project except git's own and DVC's scratch folder."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith((".git/", ".dvc/tmp/")) and "__pycache__" not in rel:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Ingested (DVC-tracked, pushed) and preprocessed project with a LoRA adapter and its reports."""
    from tasks import ingest, preprocess

    root = make_project(tmp_path_factory.mktemp("prepared") / "proj", {"ingest": {"source": "data/reviews.csv"}})
    write_reviews(root / "data" / "reviews.csv", 60, seed=0)
    params = load_params(root / "params.yaml")
    ingest.run(params)
    preprocess.run(params)
    model, tok = build_adapter(params, seed=3)
    with atomic.directory(root / layout.ADAPTER) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    atomic.write_json(root / layout.report("train"), {"adapter_sha256": adapter_sha256(root / layout.ADAPTER),
                                                      "fingerprint": "fp", "steps": 4, "device": "cpu"})
    atomic.write_json(root / layout.report("evaluate"), {"base": {"accuracy": 0.5, "f1_macro": 0.4},
                                                         "adapter": {"accuracy": 0.7, "f1_macro": 0.6}})
    return root


@pytest.fixture
def project(prepared, tmp_path) -> Path:
    return Path(shutil.copytree(prepared, tmp_path / "proj", symlinks=True))


# ---------------------------------------------------------------- how each case breaks the project


def set_param(path: str, value) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        data = yaml.safe_load((root / "params.yaml").read_text())
        *parents, key = path.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[key] = value
        (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return apply


def write_file(rel: str, data: bytes) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        (root / rel).write_bytes(data)
    return apply


def pickle_only_adapter(root: Path) -> None:
    adapter = root / layout.ADAPTER
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04\x95pickle: never loaded")


def truncated_adapter(root: Path) -> None:
    weights = root / layout.ADAPTER / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def bitflipped_adapter(root: Path) -> None:
    weights = root / layout.ADAPTER / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # inside the tensor data: the file still parses
    weights.write_bytes(bytes(data))


def _base_folder(root: Path, name: str) -> Path:
    """A local base model folder: the random:tiny files (config, weights, tokenizer)."""
    src = Path(models.resolve(load_params(root / "params.yaml").model).path)
    dst = root.parent / name
    shutil.copytree(src, dst)
    return dst


def pickle_only_base(root: Path) -> None:
    base = _base_folder(root, "pickle-base")
    (base / "model.safetensors").rename(base / "pytorch_model.bin")
    set_param("model.base", str(base))(root)


MARKER = "remote-code-ran"


def remote_code_base(root: Path) -> None:
    """A base of an architecture transformers does not know, whose config points at custom code
    (auto_map); that code would drop a marker file if it ever ran."""
    base = _base_folder(root, "remote-code-base")
    config = json.loads((base / "config.json").read_text())
    config["model_type"] = "evil-custom"
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (base / "config.json").write_text(json.dumps(config))
    code = f"open({str(root.parent / MARKER)!r}, 'w').write('ran')\n"
    (base / "configuration_evil.py").write_text(code)
    (base / "modeling_evil.py").write_text(code)
    set_param("model.base", str(base))(root)


CSV_HEADER = b"category,text,movie_name\n"

# (id, how the input is broken, stages to run, error type, message fragment)
CASES = [
    ("invalid-yaml", write_file("params.yaml", b"train: [unclosed\n  max_steps: 3\n"), ["preprocess"], ConfigError,
     r"line \d+"),
    ("wrong-type", set_param("train.max_steps", "many"), ["train"], ConfigError, r"train\.max_steps"),
    ("out-of-range", set_param("train.learning_rate", -1.0), ["train"], ConfigError, r"train\.learning_rate"),
    # A learning rate that diverges to NaN/inf stops training at that step (TrainingError, see
    # REFERENCED); an absurd one is refused before anything runs.
    ("diverging-learning-rate", set_param("train.learning_rate", 1.0e6), ["train"], ConfigError,
     r"train\.learning_rate"),
    ("unknown-key", set_param("train.max_stepz", 3), ["train"], ConfigError, r"train\.max_stepz: unknown key"),
    ("output-path-param", set_param("train.output_dir", "../../elsewhere"), ["train"], ConfigError,
     r"train\.output_dir: unknown key"),
    ("model-name-traversal", set_param("register.model_name", "../../etc/x"), ["register"], ConfigError,
     r"register\.model_name"),
    ("experiment-traversal", set_param("register.experiment", "a/../../b"), ["register"], ConfigError,
     r"register\.experiment"),
    ("missing-column", set_param("preprocess.text_fields", ["review"]), ["preprocess"], DataError, r"review"),
    ("empty-data", write_file("data/reviews.csv", CSV_HEADER), ["ingest"], DataError, r"no rows|empty"),
    ("non-utf8", write_file("data/reviews.csv", CSV_HEADER + b"fresh,caf\xe9 \xff,m\n"), ["ingest"], DataError,
     r"UTF-8.*line"),
    ("nul-bytes", write_file("data/reviews.csv", CSV_HEADER + b"fresh,a\x00b,m\n"), ["ingest"], DataError, r"NUL"),
    ("pickle-only-adapter", pickle_only_adapter, ["evaluate"], ModelError, r"safetensors"),
    ("truncated-adapter", truncated_adapter, ["register"], ModelError, r"changed since training"),
    ("bitflipped-adapter", bitflipped_adapter, ["register"], ModelError, r"changed since training"),
    ("pickle-only-base", pickle_only_base, ["preprocess"], ModelError, r"safetensors"),
    ("remote-code-base", remote_code_base, ["train"], ModelError, r"trust_remote_code|custom code"),
]


@pytest.mark.parametrize("case, breaks, stages, error, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_early_clearly_and_changes_nothing(project, case, breaks, stages, error, fragment):
    import importlib

    breaks(project)
    before = tree(project)
    with pytest.raises(error, match=fragment) as info:
        params = load_params(project / "params.yaml")
        for stage in stages:
            importlib.import_module(f"tasks.{stage}").run(params)
    assert isinstance(info.value, PeftflowError)
    assert tree(project) == before, "a failed stage changed the project"
    assert not (project / "mlflow.db").exists()
    assert not (project.parent / MARKER).exists(), "remote code was executed"


def test_million_character_text_is_truncated_with_bounded_memory(project):
    """One 1,000,000-character review: preprocess keeps max_length tokens of it, in bounded memory."""
    rows = (CSV_HEADER + b"".join(f"fresh,fine film {i},m{i}\n".encode() for i in range(40))
            + b"rotten," + b"x" * 1_000_000 + b",huge\n")
    (project / "data/reviews.csv").write_bytes(rows)
    code = ("import resource, sys; from tasks import ingest, preprocess; from tasks.config import load_params; "
            f"p = load_params({str(project / 'params.yaml')!r}); ingest.run(p); r = preprocess.run(p); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    peak_mb = int(out.stdout.strip().splitlines()[-1]) / 1024
    from datasets import load_from_disk

    data = load_from_disk(str(project / layout.PROCESSED))
    max_length = load_params(project / "params.yaml").preprocess.max_length
    longest = max(len(ids) for split in data.values() for ids in split["input_ids"])
    assert longest <= max_length
    assert any("xxxx" in p for split in data.values() for p in split["prompt"])  # kept, cut to size
    assert peak_mb < 2048, f"preprocess peaked at {peak_mb:.0f} MB"
    print(f"FIGURE 1M-character text: truncated to {longest} <= {max_length} tokens, peak RSS {peak_mb:.0f} MB")


def test_duplicates_never_leak_between_train_and_test(project):
    """Exact and whitespace-padded copies of texts: each text lands in one split only."""
    from datasets import load_from_disk

    from tasks import ingest, preprocess

    lines = [f"{'fresh' if i % 2 else 'rotten'},{' ' * (k % 2)}Film number {i} is {'fine' if i % 2 else 'dull'}."
             f"{' ' * k},movie-{i}\n".encode() for i in range(40) for k in range(3)]
    (project / "data/reviews.csv").write_bytes(CSV_HEADER + b"".join(lines))
    params = load_params(project / "params.yaml")
    ingest.run(params)
    report = preprocess.run(params)
    data = load_from_disk(str(project / layout.PROCESSED))
    seen: dict[str, str] = {}
    for split, rows in data.items():
        for prompt in rows["prompt"]:
            key = " ".join(prompt.split())
            assert seen.setdefault(key, split) == split, f"{key!r} is in {seen[key]} and {split}"
    assert report.dropped["duplicate_text"] == 80
    print(f"FIGURE leaked duplicates between splits: 0 ({report.dropped['duplicate_text']} copies dropped)")


def _limit_file_size(limit: int) -> Callable[[], None]:
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    return preexec


def test_full_disk_for_the_outputs_is_a_clear_error_and_keeps_the_old_outputs(project):
    """Writes past a 16 KiB file-size limit fail (EFBIG, like ENOSPC on a full disk): the stage exits 2
    with one message, and data/processed keeps its previous complete contents."""
    set_param("preprocess.max_samples", 50)(project)  # a changed param: preprocess must rewrite its outputs
    before = {k: v for k, v in tree(project).items() if k != "params.yaml"}
    out = subprocess.run([sys.executable, "-m", "tasks", "preprocess", "--params", str(project / "params.yaml")],
                         cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size(16 * 1024),
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]  # after the progress bars
    assert last.startswith("error: preprocess: cannot write its outputs") and "Traceback" not in out.stderr
    assert "too large" in last.lower() and "previous outputs are unchanged" in last
    assert {k: v for k, v in tree(project).items() if k != "params.yaml"} == before
