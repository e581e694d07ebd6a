"""Stage `register`: log the pipeline run to MLflow, register the adapter, apply the promotion gate.

Reads: models/adapter/, reports/{ingest,train,evaluate,preprocess}.json (+ everything
tasks.tracking.log_pipeline logs), `register:` and `model:` params.
Writes: one MLflow run (reused on re-runs), one model version of `register.model_name` holding
the adapter only (the base is referenced by path + spec + weights sha256 in the model config and
tags, never copied), aliases `challenger` (the new version) and `champion` (when the gate passes),
reports/register.json.
Raises: PeftflowError subclasses for missing stage outputs, an adapter changed since training,
an unreachable tracking store, or stored adapter bytes that differ from the trained ones.

Idempotency: the pipeline run's token is sha256(params file, data md5, adapter weights). A
version carrying the token in tag `peftflow.run_token` (set atomically at creation) is reused, so
a retry or a re-run never creates a second version; if a race still creates two, the higher one
is deleted. The run is found by the same token (or taken from $PEFTFLOW_MLFLOW_RUN_ID, which a
flow sets). A version whose gate decision is recorded is never re-gated: a re-run does not undo
a later manual alias move.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks import atomic, gate, layout, models, predictions, processed, promote, registry, sharing, tracking
from tasks.adapters import adapter_sha256
from tasks.config import Params
from tasks.errors import ModelError, PeftflowError

log = logging.getLogger(__name__)

TAG_GATE = "peftflow.gate.promote"  # "true" / "false" / "skipped": its presence = registration complete
TAG_GATE_REASON = "peftflow.gate.reason"
TAG_GATE_REFERENCE = "peftflow.gate.reference"
TAG_EVAL_FINGERPRINT = "eval.fingerprint"  # evalset.fingerprint: which rows, scored how
TAG_GATE_IMPROVEMENT = "peftflow.gate.improvement"  # JSON {value, low, high} of the primary metric
MODEL_ARTIFACT = "registered_model"  # where the pyfunc model folder goes inside the run
MODEL_CODE = Path(__file__).with_name("adapter_pyfunc.py")
REQUIREMENTS = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "mlflow", "pandas")


@dataclass(frozen=True)
class RegisterResult:
    run_id: str
    model_name: str
    version: str
    token: str
    adapter_sha256: str
    created: bool  # False when this pipeline run's version already existed
    promoted: bool | None  # None when the gate did not run now (disabled, or decided before)
    reason: str
    champion: str | None


def pipeline_token(params_sha256: str, data_md5: str, adapter_sha256: str) -> str:
    return hashlib.sha256(f"{params_sha256}\n{data_md5}\n{adapter_sha256}".encode()).hexdigest()


def _require(params: Params, stage: str) -> dict:
    report = tracking.read_report(params, stage)
    if report is None:
        raise PeftflowError(f"{layout.report(stage)} is missing; run `python -m tasks {stage}` first")
    return report


def adapter_digest(params: Params, train: dict) -> str:
    """`adapter_sha256` of models/adapter/, checked against what the train stage recorded."""
    folder = Path(params.root) / layout.ADAPTER
    if not (folder / "adapter_config.json").is_file():
        raise ModelError(f"{folder}/adapter_config.json is missing; run `python -m tasks train` first")
    digest = adapter_sha256(folder)
    recorded = train.get("adapter_sha256")
    if recorded and recorded != digest:
        raise ModelError(f"{folder} changed since training (sha256 {digest}, reports/train.json says {recorded}); "
                         f"re-run `python -m tasks train`")
    return digest


def _pip_requirements() -> list[str]:
    reqs = []
    for lib in REQUIREMENTS:
        try:
            reqs.append(f"{lib}=={importlib.metadata.version(lib).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return reqs


def _model_config(params: Params, base: models.BaseModel) -> dict:
    """The pyfunc's `model_config` (keys documented in tasks/adapter_pyfunc.py)."""
    fmt = params.preprocess.format
    classification, chat_format = fmt == "classification", fmt == "chat"
    label_names = ((tracking.read_report(params, "preprocess") or {}).get("label_names")
                   or (tracking.read_report(params, "evaluate") or {}).get("label_names") or [])
    if classification and not label_names:
        raise PeftflowError(f"{layout.report('preprocess')} has no label_names; run `python -m tasks preprocess`")
    config = {
        "base_spec": base.spec, "base_path": base.path, "base_revision": base.revision or "",
        "base_weights_sha256": base.weights_sha256,
        "task": "classification" if classification else "chat" if chat_format else "causal-lm",
        "label_names": list(label_names), "max_new_tokens": params.evaluate.max_new_tokens,
        # chat training always renders the template and keeps each conversation's own system turn
        "chat_template": params.preprocess.chat_template or chat_format,
        "system_prompt": "" if chat_format else params.preprocess.system_prompt or "",
    }
    if not classification:
        from transformers import AutoTokenizer

        from tasks.chat import stop_token_ids

        # The same end-of-turn ids training supervised and evaluation stops at (the adapter's tokenizer).
        tokenizer = AutoTokenizer.from_pretrained(Path(params.root) / layout.ADAPTER)
        config["stop_token_ids"] = [int(i) for i in stop_token_ids(tokenizer)]
    return config


def _signature(params: Params):
    """Classifiers take one string column. Causal-LM and chat versions take prompt strings OR chat
    requests, so they have no input schema (params schema only): with MLflow 3.17 an unnamed string
    column refuses `{"messages": [...]}`, and named optional columns (`prompt`: string, `messages`:
    Array(Object(role, content))) silently turn a plain list of strings into an empty DataFrame, drop
    `tools`, and reject messages with other keys (tool_calls) or several conversations under
    `inputs`. adapter_pyfunc checks the input itself and answers bad shapes with a 400."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string")]) if params.preprocess.format == "classification" else None
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec("max_new_tokens", "long", params.evaluate.max_new_tokens)]))


def _version_tags(params: Params, token: str, adapter_sha: str, lineage: dict, evaluation: dict) -> dict[str, str]:
    tags = {registry.TAG_TOKEN: token, "adapter.sha256": adapter_sha}
    for key in ("base.spec", "base.revision", "base.weights_sha256", "data.md5", "data.source", "params.sha256",
                "git.commit", "git.dirty", "train.device", "train.tokens_trained"):
        if lineage.get(key):
            tags[key] = lineage[key]
    for section in ("base", "adapter", "lift"):
        for k, v in tracking.numeric_leaves(evaluation.get(section) or {}, "").items():
            tags[f"metric.{section}.{k}"] = repr(v)
    if evaluation.get("fingerprint"):
        tags[TAG_EVAL_FINGERPRINT] = evaluation["fingerprint"]
    hours = _require(params, "train").get("device_hours")  # absent in reports of older runs
    if hours is not None:
        tags["peftflow.device_hours"] = f"{hours:.6g}"
        if params.register.cost(hours) is not None:
            tags["peftflow.cost"] = f"{params.register.cost(hours):.6g}"
    # The run's exact state on a git ref, and whether teammates can get it (flags, never silent).
    tags.update(sharing.record_for_version(params.root, params.register.model_name, token))
    return tags


def _create_version(client, params: Params, run_id: str, name: str, tags: dict, description: str) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    base = models.resolve(params.model)
    adapter = Path(params.root) / layout.ADAPTER
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / MODEL_ARTIFACT
        mlflow.pyfunc.save_model(
            str(model_dir), python_model=str(MODEL_CODE), artifacts={"adapter": str(adapter)},
            model_config=_model_config(params, base), signature=_signature(params),
            pip_requirements=_pip_requirements(), metadata={"peftflow.run_token": tags[registry.TAG_TOKEN]},
        )
        client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
    try:
        client.create_registered_model(name, description="PEFT adapters trained by peftflow (adapter only; "
                                       "the base model is referenced by path and weights sha256).")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
    return str(client.create_model_version(name, source, run_id=run_id, tags=tags, description=description).version)


def _verify_stored(params: Params, name: str, version: str, adapter_sha: str) -> None:
    """Download the version and check that its adapter folder hashes to what was trained."""
    with tempfile.TemporaryDirectory() as tmp:
        local = registry.download_model(f"models:/{name}/{version}", params, Path(tmp))
        stored = adapter_sha256(registry.artifact_adapter_dir(local))
    if stored != adapter_sha:
        raise ModelError(f"model version {name}/{version} holds adapter weights sha256 {stored}, "
                         f"expected {adapter_sha}; the version was deleted, re-run `python -m tasks register`")


@dataclass(frozen=True)
class GateOutcome:
    promoted: bool
    reason: str
    reference: str  # what the candidate was compared with ("champion v3", "base (calibrated)", ...)
    improvement: tuple[float, float | None, float | None] | None  # primary metric, higher = better


def _champion_table(client, params: Params, name: str, current: str, rows: list[int], fingerprint: str | None):
    """The champion's per-row table on this run's rows, or (None, why it cannot be compared).

    When the champion was evaluated with this run's fingerprint (same rows, base and settings),
    its recorded table (its run's reports/predictions.csv) IS its table on these rows; otherwise
    the champion is downloaded (hash-checked) and scored on them now.
    """
    import mlflow

    from tasks import judge

    mv = client.get_model_version(name, current)
    with tempfile.TemporaryDirectory() as tmp:
        if fingerprint and mv.tags.get(TAG_EVAL_FINGERPRINT) == fingerprint and mv.run_id:
            local = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=str(layout.PREDICTIONS),
                                                        dst_path=tmp, tracking_uri=tracking.tracking_uri(params))
            recorded_rows, _, table = predictions.read(Path(local))
            if recorded_rows == rows:
                return table, ""
        try:
            adapter, config = registry.download_adapter(f"models:/{name}/{current}", params, Path(tmp))
            names = processed.label_names(params.root)
            if list(config.get("label_names") or []) != names:
                return None, f"its label names {config.get('label_names')} differ from this run's {names}"
            return judge.champion_rows(params, adapter, rows), ""
        except ModelError as err:
            return None, str(err)


def _gate(client, params: Params, name: str, version: str, evaluation: dict) -> GateOutcome:
    """Apply the promotion gate to `version`: candidate vs the champion re-scored on this run's
    test rows (or vs the strongest base reference when there is no champion), paired intervals."""
    from tasks import judge

    cfg = params.register
    rows, base_cols, candidate = predictions.read(Path(params.root) / layout.PREDICTIONS)
    n_classes = max(len(processed.label_names(params.root)), 1)
    current = promote.alias_version(client, name, promote.CHAMPION)
    reference, ref_name = base_cols, None
    if current and current != version:
        reference, why = _champion_table(client, params, name, current, rows, evaluation.get("fingerprint"))
        if reference is None:
            return GateOutcome(False, f"champion v{current} cannot be scored on this run's test rows ({why}); "
                               f"compare and promote by hand (`python -m tasks.promote promote {version}`)",
                               f"champion v{current}", None)
        ref_name = f"champion v{current}"
    primary, guards, ref_label = judge.comparisons(params, candidate, reference, ref_name, n_classes)
    decision = gate.decide(primary, guards, ref_label, cfg.min_delta, dict(cfg.guards))
    reason = decision.reason if current else f"no champion yet: {decision.reason}"
    promoted = False
    if decision.promote and cfg.approval == "manual":
        reason += (f"; not applied: register.approval is manual, so champion is left for a person to move "
                   f"(challenger = v{version})")
    elif decision.promote:
        move = promote.move_champion(client, name, version, current, reason)
        promoted = move.moved
        if not move.moved:
            reason += f"; not applied: {move.note}"
    return GateOutcome(promoted, reason, ref_label, decision.improvement)


def _record_gate(client, params: Params, name: str, version: str, outcome: GateOutcome | None, reason: str) -> None:
    """The decision on the version: reason, verdict, reference and the interval of the improvement."""
    tags = {TAG_GATE_REASON: reason[:5000], TAG_GATE: "skipped" if outcome is None else str(outcome.promoted).lower()}
    if outcome is not None:
        tags[TAG_GATE_REFERENCE] = outcome.reference
        if outcome.improvement is not None:
            tags[TAG_GATE_IMPROVEMENT] = json.dumps(dict(zip(("value", "low", "high"), outcome.improvement)))
    for key in (TAG_GATE_REFERENCE, TAG_GATE_IMPROVEMENT, TAG_GATE_REASON, TAG_GATE):  # TAG_GATE last: "complete"
        if key in tags:
            client.set_model_version_tag(name, version, key, tags[key])


def _pipeline_run(params: Params, client, token: str, run_id: str | None) -> tuple[str, bool]:
    """(run id, whether this call owns it): the given run, the flow's ($PEFTFLOW_MLFLOW_RUN_ID), the
    one an earlier attempt of this pipeline run left (by token), or a new one."""
    run_id = run_id or os.environ.get(tracking.ENV_RUN_ID) or tracking.find_run(params, registry.TAG_TOKEN, token)
    owns_run = run_id is None or client.get_run(run_id).info.status != "RUNNING"
    if run_id is None:
        run_id = tracking.start_run(params, run_name=f"peftflow-{token[:8]}", tags={registry.TAG_TOKEN: token})
    elif owns_run:
        tracking.adopt_run(params, run_id)  # a re-run resuming a finished/failed run of the same pipeline
    return run_id, owns_run


def _registered_version(client, params: Params, run_id: str, token: str, adapter_sha: str,
                        evaluation: dict) -> tuple[str, bool]:
    """(version, created): this pipeline run's version, created if absent, deduplicated and checked
    byte for byte against the trained adapter. Call under the registry lock."""
    cfg = params.register
    existing = registry.find_version(client, cfg.model_name, token)
    if existing:
        return existing[0], False
    lineage = client.get_run(run_id).data.tags
    description = (f"Adapter on {lineage.get('base.spec')} (weights sha256 {lineage.get('base.weights_sha256')}); "
                   f"data {lineage.get('data.source')} md5 {lineage.get('data.md5')}; "
                   f"{cfg.primary_metric}: adapter {evaluation.get('adapter', {}).get(cfg.primary_metric)}, "
                   f"base {evaluation.get('base', {}).get(cfg.primary_metric)}")
    ours = _create_version(client, params, run_id, cfg.model_name,
                           _version_tags(params, token, adapter_sha, lineage, evaluation), description)
    # A request the client retried after a lost answer may have created another version
    # with our token (all ours, under the lock): keep the lowest, delete the others.
    versions = registry.find_version(client, cfg.model_name, token)
    for extra in versions[1:]:
        log.warning("register: deleting version %s of %s, a duplicate of version %s (token %s)",
                    extra, cfg.model_name, versions[0], token[:12])
        client.delete_model_version(cfg.model_name, extra)
    version = versions[0] if versions else ours
    try:
        _verify_stored(params, cfg.model_name, version, adapter_sha)
    except ModelError:
        log.warning("register: deleting version %s of %s: its stored adapter is not the trained one",
                    version, cfg.model_name)
        client.delete_model_version(cfg.model_name, version)
        raise
    return version, True


def _apply_gate(client, params: Params, version: str, evaluation: dict) -> tuple[GateOutcome | None, str]:
    """Set `challenger` and run the gate once per version; (outcome, reason). A version whose
    decision is recorded keeps it (outcome None). Call under the registry lock."""
    cfg = params.register
    mv = client.get_model_version(cfg.model_name, version)
    if TAG_GATE in mv.tags:  # registration of this version completed before: keep its decision
        return None, mv.tags.get(TAG_GATE_REASON, "")
    client.set_registered_model_alias(cfg.model_name, promote.CHALLENGER, version)
    outcome: GateOutcome | None = None
    if cfg.promote:
        outcome = _gate(client, params, cfg.model_name, version, evaluation)
        reason = outcome.reason
    else:
        reason = "gate disabled (register.promote: false)"
    _record_gate(client, params, cfg.model_name, version, outcome, reason)
    return outcome, reason


def _log_result(client, params: Params, result: RegisterResult, outcome: GateOutcome | None) -> None:
    """Gate metrics and registration tags on the run; reports/register.json (also as an artifact)."""
    from mlflow.entities import Metric, RunTag

    gate_metrics = {"gate_promoted": float(bool(result.promoted))} if result.promoted is not None else {}
    if outcome is not None and outcome.improvement is not None:
        gate_metrics.update({f"gate_improvement{suffix}": v for suffix, v in
                             zip(("", "_low", "_high"), outcome.improvement) if v is not None})
    client.log_batch(result.run_id, metrics=[Metric(k, v, tracking.now_ms(), 0) for k, v in gate_metrics.items()],
                     tags=[RunTag("registered.model", result.model_name), RunTag("registered.version", result.version),
                           RunTag("gate.reason", result.reason[:5000])])
    report = Path(params.root) / layout.report("register")
    atomic.write_json(report, asdict(result))
    client.log_artifact(result.run_id, str(report), "reports")


def run(params: Params, run_id: str | None = None) -> RegisterResult:
    """Log, register (idempotently), set `challenger`, gate `champion`; see the module docstring."""
    cfg = params.register
    ingest, train, evaluation = _require(params, "ingest"), _require(params, "train"), _require(params, "evaluate")
    if not ingest.get("md5"):
        raise PeftflowError(f"{layout.report('ingest')} has no md5; re-run `python -m tasks ingest`")
    adapter_sha = adapter_digest(params, train)
    token = pipeline_token(params.sha256, ingest["md5"], adapter_sha)

    # Training is done and its outputs are on disk: wait out a tracking server restart rather than fail.
    tracking.check_reachable(params, timeout_s=cfg.server_wait_s)
    client = tracking.client(params)
    tracking.mark_stale_runs(params, client)
    run_id, owns_run = _pipeline_run(params, client, token, run_id)
    try:
        client.set_tag(run_id, registry.TAG_TOKEN, token)
        # One registration of this model at a time (across processes and machines): twins of one
        # pipeline run then find each other's points and version instead of both logging and creating
        # them (no doubled curve, versions stay dense), and the gate's read-decide-move of
        # `champion` cannot interleave with another's.
        with registry.registry_lock(client, cfg.model_name):
            tracking.log_pipeline(run_id, params)
            version, created = _registered_version(client, params, run_id, token, adapter_sha, evaluation)
            outcome, reason = _apply_gate(client, params, version, evaluation)
        champion = promote.alias_version(client, cfg.model_name, promote.CHAMPION)
        result = RegisterResult(run_id, cfg.model_name, version, token, adapter_sha, created,
                                None if outcome is None else outcome.promoted, reason, champion)
        _log_result(client, params, result, outcome)
    except BaseException:
        if owns_run:
            tracking.finish_run(params, run_id, "FAILED")
        raise
    if owns_run:
        tracking.finish_run(params, run_id, "FINISHED")
    return result
