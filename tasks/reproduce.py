"""Rebuild a registered model version from the registry alone and say what matched.

Contract of `run(params, model, version, workdir=None, keep=False) -> ReproReport`:
- `params`: the project the command runs in (a clone of the version's git repository); only its
  MLflow store (MLFLOW_TRACKING_URI wins), its git remotes and its DVC remotes are used;
- `version`: a number or `@alias`. The version's tags name the state (`git.state_commit`,
  `git.state_ref`, `git.state_dir`: tasks/sharing.py); a commit the clone lacks is fetched from the git remote;
- a fresh `git worktree add --detach` of that commit under `workdir` (default: a new temporary
  folder), given the project's DVC remotes (`.dvc/config.local`), then `dvc pull` of its `.dvc`
  pointers (checked first: a remote that lacks an object is a DataError naming path, md5, remote),
  then `dvc repro --force` (every stage runs; no run cache);
- compares with the version: data md5, params sha256, base weights sha256, every dvc.lock dep
  (code) and, when the version and the rebuild both trained on CPU, the adapter sha256 byte for
  byte; otherwise every adapter metric must lie in the version's 95% interval (its run's
  `adapter_<metric>_low/_high` metrics);
- sets version tags `peftflow.reproduced_at` (UTC ISO time), `peftflow.reproduced` ("true" or
  "false: <what differed>"; "error: <message>" when it could not rebuild) and
  `peftflow.reproduced.mode`; writes `<workdir>/reproduce.json`;
- removes the worktree when it reproduced (unless keep), keeps it otherwise for inspection.
Raises PeftflowError (one line) when the version has no recorded state, the state or the data
cannot be fetched, or `dvc repro` fails (log in `<workdir>/repro.log`).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from tasks import atomic, layout, models, registry, runstate, sharing, tracking, versioning
from tasks.adapters import adapter_sha256
from tasks.config import Params, load_params
from tasks.errors import DataError, PeftflowError

TAG_AT, TAG_RESULT, TAG_MODE = "peftflow.reproduced_at", "peftflow.reproduced", "peftflow.reproduced.mode"
CPU_MODE, GPU_MODE = "cpu: adapter bytes", "gpu: metric intervals"


@dataclass(frozen=True)
class Check:
    name: str
    expected: str
    actual: str
    ok: bool
    required: bool = True  # False: reported, but does not decide the result


@dataclass(frozen=True)
class ReproReport:
    model_name: str
    version: str
    state_ref: str
    state_commit: str
    workdir: str
    mode: str
    checks: list[Check] = field(default_factory=list)
    reproduced: bool = False
    seconds: float = 0.0

    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.required and not c.ok]


def model_uri(model: str, version: str) -> str:
    return f"models:/{model}{version}" if version.startswith("@") else f"models:/{model}/{version}"


def _state_tags(mv) -> tuple[str, str, str]:
    tags = mv.tags
    commit, ref = tags.get(sharing.TAG_COMMIT), tags.get(sharing.TAG_REF)
    if not commit or not ref:
        raise PeftflowError(f"{mv.name} v{mv.version} has no recorded state (tag {sharing.TAG_COMMIT}): it was "
                            f"registered before states were recorded; re-run the pipeline at its git commit "
                            f"{tags.get('git.commit', '?')} to register a reproducible version")
    sub = tags.get(sharing.TAG_DIR) or "."
    return commit, ref, "" if sub == "." else sub


def checkout(root: Path, commit: str, ref: str, dest: Path) -> Path:
    """A fresh worktree of the state commit at dest (fetching the ref when the clone lacks it)."""
    if not runstate.has_commit(root, commit):
        remote = runstate.git_remote(root)
        if remote is None:
            raise PeftflowError(f"state commit {commit[:12]} ({ref}) is not in {root}'s git repository and it "
                                f"has no git remote to fetch it from; push it from the machine that ran it: "
                                f"`git push <remote> {ref}`")
        try:
            runstate.fetch(root, ref, remote)
        except PeftflowError as err:
            raise PeftflowError(f"state {ref} is not on git remote {remote} ({err}); push it from the machine "
                                f"that ran it: `git push {remote} {ref}`") from None
        if not runstate.has_commit(root, commit):
            raise PeftflowError(f"git remote {remote} has {ref} but not at commit {commit[:12]} (it was moved); "
                                f"the version's state is lost there")
    return runstate.add_worktree(root, dest, commit)


def pull_data(source: Path, project: Path, label: str) -> list[str]:
    """Give the worktree the source project's DVC remotes and pull its `.dvc` pointers' data."""
    versioning.use_remotes_of(source, project)
    pointers = versioning.pointers(project)
    if not pointers:
        return []
    name, url = versioning.remote_url(project)
    missing = versioning.missing_on_remote(project, pointers)
    if missing:
        path, md5 = missing[0]
        raise DataError(f"DVC remote {name} ({url}) lacks {path} md5 {md5}, which {label} needs; push it "
                        f"from a clone that has it: `dvc push {path}.dvc` (then reproduce again)")
    versioning.pull(project, pointers)
    return pointers


def _repro_env(top: Path) -> dict[str, str]:
    # Stage commands are `python -m tasks <stage>`: this interpreter first on PATH, and the
    # worktree's own tasks package (when the repository holds one) before the installed one.
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if (top / "tasks" / "__init__.py").is_file():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(top), env.get("PYTHONPATH")) if p)
    return env


def _lock_deps(text: str | None) -> dict[str, str]:
    lock = yaml.safe_load(text or "") or {}
    return {f"{name}:{d['path']}": str(d.get("md5") or d.get("hash") or "")
            for name, stage in (lock.get("stages") or {}).items() for d in stage.get("deps") or [] if "path" in d}


def _equal(name: str, expected: str | None, actual: str | None, required: bool = True) -> Check:
    return Check(name, str(expected or "–"), str(actual or "–"), bool(expected) and expected == actual, required)


def compare(project: Path, tags: dict[str, str], run_metrics: dict[str, float], recorded_lock: str | None) -> tuple[str, list[Check]]:
    """(mode, checks) of a rebuilt project against the version's tags and run metrics."""
    params = load_params(project / "params.yaml")
    train = json.loads((project / layout.report("train")).read_text())
    evaluation = json.loads((project / layout.report("evaluate")).read_text())
    cpu = str(tags.get("train.device", "")).startswith("cpu") and str(train.get("device", "")).startswith("cpu")
    mode = CPU_MODE if cpu else GPU_MODE
    before, after = _lock_deps(recorded_lock), _lock_deps((project / "dvc.lock").read_text())
    changed = sorted(k for k in before if before[k] != after.get(k))
    checks = [
        _equal("data.md5", tags.get("data.md5"), versioning.recorded_md5(project, layout.RAW_DATA)),
        _equal("params.sha256", tags.get("params.sha256"), params.sha256),
        _equal("base.weights_sha256", tags.get("base.weights_sha256"), models.resolve(params.model).weights_sha256),
        Check("dvc.lock deps", f"{len(before)} deps as recorded", ", ".join(changed) or "all equal", not changed),
        _equal("adapter.sha256", tags.get("adapter.sha256"), adapter_sha256(project / layout.ADAPTER), required=cpu),
    ]
    adapter = tracking.numeric_leaves(evaluation.get("adapter") or {}, "")
    for metric, value in sorted(adapter.items()):
        low, high = run_metrics.get(f"adapter_{metric}_low"), run_metrics.get(f"adapter_{metric}_high")
        if low is None or high is None:
            continue
        checks.append(Check(f"adapter {metric} in interval", f"[{low:.4f}, {high:.4f}] (was "
                            f"{tags.get(f'metric.adapter.{metric}', '?')})", f"{value:.4f}",
                            low <= value <= high, required=not cpu))
    return mode, checks


def markdown(report: ReproReport) -> str:
    verdict = "reproduced" if report.reproduced else "NOT reproduced"
    lines = [f"# {report.model_name} v{report.version}: {verdict}", "",
             f"State `{report.state_ref}` (commit `{report.state_commit[:12]}`), compared by {report.mode}, "
             f"in {report.seconds:.0f} s. Worktree: `{report.workdir}`", "",
             "| check | expected | rebuilt | result |", "|---|---|---|---|"]
    for c in report.checks:
        result = "match" if c.ok else ("MISMATCH" if c.required else "differs (informative)")
        lines.append(f"| {c.name} | {c.expected} | {c.actual} | {result} |")
    return "\n".join(lines) + "\n"


def _tag(client, mv, result: str, mode: str = "") -> None:
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    for key, value in ((TAG_AT, now), (TAG_RESULT, result[:5000]), (TAG_MODE, mode)):
        if value:
            client.set_model_version_tag(mv.name, mv.version, key, value)


def _workdir(workdir: Path | None, mv) -> Path:
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        return Path(workdir).resolve()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", mv.name)
    return Path(tempfile.mkdtemp(prefix=f"peftflow-reproduce-{slug}-v{mv.version}-")).resolve()


def _rebuild(params: Params, mv, work: Path) -> ReproReport:
    commit, ref, sub = _state_tags(mv)
    start = time.monotonic()
    tree = checkout(Path(params.root), commit, ref, work / "worktree")
    project = tree / sub if sub else tree
    pull_data(Path(params.root), project, f"{mv.name} v{mv.version}")
    versioning.repro(project, work / "repro.log", _repro_env(tree))
    run_metrics = tracking.client(params).get_run(mv.run_id).data.metrics if mv.run_id else {}
    mode, checks = compare(project, mv.tags, run_metrics, runstate.show(Path(params.root), commit,
                                                                        f"{sub + '/' if sub else ''}dvc.lock"))
    reproduced = not any(c.required and not c.ok for c in checks)
    return ReproReport(mv.name, str(mv.version), ref, commit, str(tree), mode, checks, reproduced,
                       time.monotonic() - start)


def run(params: Params, model: str, version: str, workdir: Path | None = None, keep: bool = False) -> ReproReport:
    """Rebuild `model` `version` (or `@alias`) from its recorded state; see the module docstring."""
    client = tracking.client(params)
    mv = registry.resolve_version(client, model_uri(model, version))
    work = _workdir(workdir, mv)
    try:
        report = _rebuild(params, mv, work)
    except PeftflowError as err:
        _tag(client, mv, f"error: {err}")
        if not keep and (work / "worktree").exists():
            runstate.remove_worktree(Path(params.root), work / "worktree")
        raise
    failed = report.failed()
    _tag(client, mv, "true" if report.reproduced else "false: " + "; ".join(
        f"{c.name} {c.actual} != {c.expected}" for c in failed), report.mode)
    atomic.write_json(work / "reproduce.json", asdict(report))
    if report.reproduced and not keep:
        runstate.remove_worktree(Path(params.root), Path(report.workdir))
    return report
