"""MLflow run logging, idempotent adapter registration, the gate on aliases, round trip, faults.

Real embedded store (sqlite under the project), a real random:tiny LoRA adapter, no mocks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from support.adapters import PROMPTS, logits, make_trained_project
from support.projects import make_project
from tasks import promote, register, registry, tracking
from tasks.config import load_params, parse_params
from tasks.errors import ConfigError, ModelError

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _isolated(tmp_path_factory):
    """Own model cache; no tracking server from the environment."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PEFTFLOW_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv(tracking.ENV_RUN_ID, raising=False)
    mp.setenv(tracking.ENV_FLOW_RUN_ID, "prefect-flow-run-123")  # as Prefect sets it for a flow run
    yield
    mp.undo()


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """One project registered once (version 1, champion): shared by the read-only checks."""
    root = tmp_path_factory.mktemp("reg") / "proj"
    params, model, tok = make_trained_project(root, seed=1, accuracy=0.7)
    result = register.run(params)
    return params, model, tok, result


def test_run_holds_params_curves_eval_lineage_artifacts(registered):
    params, _, _, result = registered
    c = tracking.client(params)
    run = c.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == str(params.train.max_steps)
    assert [m.step for m in c.get_metric_history(result.run_id, "train/loss")] == [1, 2, 3, 4]
    assert {"train/learning_rate", "train/grad_norm", "train/tokens_per_second"} <= set(run.data.metrics)
    assert run.data.metrics["base_accuracy"] == 0.5 and run.data.metrics["adapter_accuracy"] == 0.7
    assert run.data.metrics["lift_accuracy"] == pytest.approx(0.2)
    tags = run.data.tags
    ingest = tracking.read_report(params, "ingest")
    assert tags["data.md5"] == ingest["md5"] and tags["data.source"] == "embedded:rotten_tomatoes"
    assert tags["params.sha256"] == params.sha256 and len(tags["git.commit"]) == 40
    assert tags["git.dirty"] in ("true", "false")
    assert tags["base.spec"] == "random:tiny" and len(tags["base.weights_sha256"]) == 64
    assert tags["adapter.sha256"] == result.adapter_sha256
    assert tags["train.device"] == "cpu" and tags["train.tokens_trained"] == "4096"
    assert float(tags["train.gpu_hours"]) == 0.0
    assert tags["lib.torch"] and tags["lib.mlflow"]
    assert tags["registered.version"] == result.version
    assert tags["prefect.flow_run_id"] == "prefect-flow-run-123"
    [inp] = run.inputs.dataset_inputs
    assert inp.dataset.digest == ingest["md5"]
    names = {a.path for a in c.list_artifacts(result.run_id, "reports")}
    assert {"reports/evaluate.json", "reports/train_log.csv", "reports/predictions.csv",
            "reports/register.json"} <= names
    assert "params.yaml" in {a.path for a in c.list_artifacts(result.run_id)}


def test_version_holds_adapter_only_with_lineage_tags(registered, tmp_path):
    params, _, _, result = registered
    c = tracking.client(params)
    mv = c.get_model_version(params.register.model_name, result.version)
    assert mv.tags[registry.TAG_TOKEN] == result.token
    assert mv.tags["adapter.sha256"] == result.adapter_sha256
    assert mv.tags["metric.adapter.accuracy"] == "0.7" and mv.tags[register.TAG_GATE] == "true"
    assert "improvement confirmed" in mv.tags[register.TAG_GATE_REASON]
    assert "vs base" in mv.tags[register.TAG_GATE_REASON] and "[95% CI" in mv.tags[register.TAG_GATE_REASON]
    assert json.loads(mv.tags[register.TAG_GATE_IMPROVEMENT])["low"] > 0
    aliases = c.get_registered_model(params.register.model_name).aliases
    assert {k: str(v) for k, v in aliases.items()} == {"challenger": result.version, "champion": result.version}
    adapter, config = registry.download_adapter(f"models:/{params.register.model_name}@champion", params, tmp_path)
    files = {p.name for p in adapter.iterdir()}
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not {"model.safetensors", "pytorch_model.bin"} & files  # the base is referenced, never copied
    assert config["base_weights_sha256"] == mv.tags["base.weights_sha256"]
    total = sum(p.stat().st_size for p in adapter.rglob("*") if p.is_file())
    assert total < 1_000_000


def test_round_trip_pyfunc_and_peft_give_trained_logits(registered, tmp_path, monkeypatch):
    import mlflow

    params, model, tok, _ = registered
    uri = f"models:/{params.register.model_name}@champion"
    expected = logits(model, tok)
    # how a user points MLflow at the store (mlflow.set_tracking_uri would leak into later tests' env)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(params))
    pyfunc_model = mlflow.pyfunc.load_model(uri)
    loaded = pyfunc_model.unwrap_python_model()
    assert (logits(loaded.model, loaded.tokenizer) - expected).abs().max().item() <= TOL
    out = pyfunc_model.predict(PROMPTS[:2], params={"max_new_tokens": 3})
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    peft_model, peft_tok = registry.load_peft(uri, params, tmp_path)
    assert (logits(peft_model, peft_tok) - expected).abs().max().item() <= TOL
    # the comparison would catch a changed weight: the adapter really moves the logits
    with peft_model.disable_adapter():
        assert (logits(peft_model, peft_tok) - expected).abs().max().item() > 1e-3


def test_rerun_creates_no_second_version_nor_duplicate_points(registered):
    params, _, _, first = registered
    again = register.run(params)
    assert (again.version, again.run_id, again.created) == (first.version, first.run_id, False)
    c = tracking.client(params)
    assert len(c.search_model_versions(f"name='{params.register.model_name}'")) == 1
    assert len(c.get_metric_history(first.run_id, "train/loss")) == 4
    assert tracking.log_pipeline(first.run_id, params)["metric_points"] == 0


def test_gate_champion_rollback_and_manual_moves(tmp_path):
    root = tmp_path / "proj"
    params, _, _, = make_trained_project(root, seed=1, accuracy=0.7)
    name = params.register.model_name
    v1 = register.run(params)
    assert v1.promoted and v1.champion == v1.version

    def retrain(seed: int, accuracy: float):
        # a new pipeline run: a new adapter in the same project and store, evaluated on the same rows
        from support.adapters import build_adapter, write_evaluation
        from tasks import atomic, layout
        from tasks.adapters import adapter_sha256

        model, tok = build_adapter(params, seed)
        with atomic.directory(root / layout.ADAPTER) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        train = tracking.read_report(params, "train")
        atomic.write_json(root / layout.report("train"), {**train, "adapter_sha256": adapter_sha256(root / layout.ADAPTER)})
        write_evaluation(root, accuracy)
        return register.run(params)

    worse = retrain(2, 0.69)
    assert worse.created and worse.version != v1.version and worse.promoted is False
    c = tracking.client(params)
    assert promote.alias_version(c, name, "champion") == v1.version
    assert promote.alias_version(c, name, "challenger") == worse.version
    reason = c.get_model_version(name, worse.version).tags[register.TAG_GATE_REASON]
    assert f"vs champion v{v1.version}" in reason and "within the noise" in reason

    same = retrain(3, 0.7)  # no lift over the champion on the same rows: refused
    assert same.promoted is False and "within the noise" in same.reason

    better = retrain(4, 0.8)
    assert better.promoted and better.champion == better.version
    assert c.get_model_version(name, better.version).tags[promote.TAG_PREVIOUS] == v1.version

    # rollback through the CLI: champion goes back to v1
    rc = promote.main(["--params", str(root / "params.yaml"), "rollback"])
    assert rc == 0 and promote.alias_version(c, name, "champion") == v1.version
    # promote by hand, then a stale compare-and-set is refused and the manual choice stays
    assert promote.promote(name, worse.version, params).moved
    move = promote.move_champion(c, name, better.version, expected=v1.version, reason="gate")
    assert not move.moved and "meanwhile" in move.note
    assert promote.alias_version(c, name, "champion") == worse.version
    # a re-run of an already-gated pipeline run does not undo the manual move
    assert register.run(params).promoted is None
    assert promote.alias_version(c, name, "champion") == worse.version
    assert promote.main(["--params", str(root / "params.yaml"), "promote", "999"]) == 2


def test_trained_but_unregistered_adapter_is_registered_by_rerun_and_killed_run_is_marked(tmp_path):
    root = tmp_path / "proj"
    params, _, _ = make_trained_project(root, seed=5)
    adapter_mtime = (root / "models/adapter/adapter_model.safetensors").stat().st_mtime_ns
    token = register.pipeline_token(params.sha256, tracking.read_report(params, "ingest")["md5"],
                                    register.adapter_digest(params, tracking.read_report(params, "train")))
    # A register process that dies (kill -9 style) after creating its run, before registering.
    code = textwrap.dedent(f"""
        import os
        from tasks import registry, tracking
        from tasks.config import load_params
        p = load_params({str(root / 'params.yaml')!r})
        tracking.start_run(p, tags={{registry.TAG_TOKEN: {token!r}}})
        os._exit(9)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60)
    assert proc.returncode == 9
    c = tracking.client(params)
    [dead] = c.search_runs([tracking.experiment_id(params, c)])
    assert dead.info.status == "RUNNING"

    result = register.run(params)
    assert result.created and result.run_id == dead.info.run_id  # the crashed run is resumed, not duplicated
    run = c.get_run(result.run_id)
    assert run.info.status == "FINISHED" and "was gone" in run.data.tags["peftflow.killed_reason"]
    assert (root / "models/adapter/adapter_model.safetensors").stat().st_mtime_ns == adapter_mtime


def test_killed_run_marked_on_next_start(tmp_path):
    params = load_params(make_project(tmp_path / "p") / "params.yaml")
    code = ("import os; from tasks import tracking; from tasks.config import load_params; "
            f"tracking.start_run(load_params({str(params.root / 'params.yaml')!r})); os._exit(9)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60, check=False)
    live = tracking.start_run(params)  # this process is alive: its run must stay RUNNING
    c = tracking.client(params)
    statuses = {r.info.run_id: r.info.status for r in c.search_runs([tracking.experiment_id(params, c)])}
    assert statuses.pop(live) == "RUNNING"
    assert list(statuses.values()) == ["KILLED"]
    tracking.mark_stale_runs(params)
    assert c.get_run(live).info.status == "RUNNING"


def test_concurrent_pipelines_get_distinct_versions(tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    roots = [tmp_path / f"p{i}" for i in range(2)]
    for i, root in enumerate(roots):
        make_trained_project(root, seed=10 + i)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    env = dict(os.environ)  # both start on a fresh store: the schema creation races too
    procs = [subprocess.Popen([sys.executable, "-m", "tasks", "register", "--params", str(r / "params.yaml")],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in roots]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    from mlflow import MlflowClient

    versions = MlflowClient(store, store).search_model_versions("name='peftflow-adapter'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert len({v.tags[registry.TAG_TOKEN] for v in versions}) == 2


def test_adapter_changed_since_training_is_refused(tmp_path):
    params, _, _ = make_trained_project(tmp_path / "proj", seed=7)
    (params.root / "models/adapter/adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="changed since training"):
        register.run(params)


def test_system_metrics_are_sampled_into_the_run(tmp_path):
    params = load_params(make_project(tmp_path / "p") / "params.yaml")
    run_id = tracking.start_run(params)
    with tracking.system_metrics(run_id, params, interval_s=0.5):
        time.sleep(2.0)
    tracking.finish_run(params, run_id)
    assert any(k.startswith("system/") for k in tracking.client(params).get_run(run_id).data.metrics)


def test_unreachable_server_fails_fast(tmp_path, monkeypatch):
    params = parse_params({}, root=tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    t = time.monotonic()
    with pytest.raises(tracking.TrackingError, match="not reachable"):
        tracking.check_reachable(params)
    assert time.monotonic() - t < 30


def test_invalid_model_names_rejected(tmp_path):
    for bad in ("../escape", "a/b", "", "x" * 200, "name with space"):
        with pytest.raises(ConfigError, match="register.model_name"):
            parse_params({"register": {"model_name": bad}}, root=tmp_path)
    (tmp_path / "params.yaml").write_text("model: {base: random:tiny}\n")
    assert promote.main(["--params", str(tmp_path / "params.yaml"), "--model-name", "a/../b", "show"]) == 2
