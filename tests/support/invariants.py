"""The one invariant checker every chaos test ends with.

`check(...)` inspects the real stores after a scenario (registry, MLflow runs, Prefect flow runs,
DVC cache and remote, the project folder) and returns a `Report`; `Report.assert_ok()` fails the
test with every violated invariant listed. The invariants (docs/reliability.md):

1. registry: at most one version per pipeline run (tag `peftflow.run_token`); versions unique
   and dense (1..N, unless `dense=False` where a test makes MLflow retry a creation, which the
   pipeline then deletes: the gap is reported, not hidden); every version carries its lineage tags
   and its stored adapter bytes hash to its `adapter.sha256` tag;
2. aliases: unchanged by failed runs (`aliases_before`), and each points at a live version;
3. DVC: `dvc status -c` clean (local cache == remote for every tracked output), and every object
   in the local cache and a local remote hashes to its own name (no partial object);
4. runs: no MLflow run (and no Prefect flow run, when a Prefect API is given) left RUNNING;
5. files: no `.<name>.*.tmp` / `.<name>.old-*` leftovers of tasks/atomic.py, every JSON report
   parses, every safetensors file under a final name opens, every checkpoint folder is sealed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

LINEAGE_TAGS = ("peftflow.run_token", "adapter.sha256", "base.spec", "base.weights_sha256", "data.md5",
                "params.sha256")
_SKIP_DIRS = {".git", "__pycache__", "mlartifacts"}


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    tokens: dict[str, list[int]] = field(default_factory=dict)  # run token -> versions
    aliases: dict[str, str] = field(default_factory=dict)
    verified_adapters: int = 0
    checked_objects: int = 0

    @property
    def duplicates(self) -> int:
        """Versions beyond the first of a pipeline run."""
        return sum(len(v) - 1 for v in self.tokens.values() if len(v) > 1)

    def assert_ok(self) -> "Report":
        assert not self.problems, "invariants violated:\n- " + "\n- ".join(self.problems)
        return self


# ---------------------------------------------------------------- registry and runs


def registry_snapshot(client, name: str) -> dict:
    """{"versions": {v: token}, "aliases": {alias: v}}: what a failed run must leave unchanged."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
    except MlflowException:
        return {"versions": {}, "aliases": {}}
    versions = {str(v.version): v.tags.get("peftflow.run_token") for v in client.search_model_versions(f"name='{name}'")}
    return {"versions": versions, "aliases": aliases}


def _check_registry(report: Report, client, tracking_uri: str, name: str, *, dense: bool, verify_bytes: bool,
                    aliases_before: dict | None) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    from tasks import registry
    from tasks.adapters import adapter_sha256

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        return  # nothing registered: nothing can be duplicated
    versions = client.search_model_versions(f"name='{name}'")
    numbers = sorted(int(v.version) for v in versions)
    report.versions = numbers
    if len(set(numbers)) != len(numbers):
        report.problems.append(f"version numbers not unique: {numbers}")
    if dense and numbers != list(range(1, len(numbers) + 1)):
        report.problems.append(f"version numbers not dense: {numbers}")
    for v in versions:
        token = v.tags.get("peftflow.run_token")
        report.tokens.setdefault(str(token), []).append(int(v.version))
        missing = [t for t in LINEAGE_TAGS if not v.tags.get(t)]
        if missing:
            report.problems.append(f"version {v.version} lacks lineage tags {missing}")
        if verify_bytes and v.tags.get("adapter.sha256"):
            with tempfile.TemporaryDirectory() as tmp:
                uri = client.get_model_version_download_uri(name, v.version)
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp,
                                                                 tracking_uri=tracking_uri))
                stored = adapter_sha256(registry.artifact_adapter_dir(local))
            if stored != v.tags["adapter.sha256"]:
                report.problems.append(f"version {v.version}: stored adapter sha256 {stored} != tag "
                                       f"{v.tags['adapter.sha256']}")
            report.verified_adapters += 1
    for token, vs in report.tokens.items():
        if len(vs) > 1:
            report.problems.append(f"pipeline run {token[:12]} has {len(vs)} versions {sorted(vs)}")
    report.aliases = {k: str(v) for k, v in model.aliases.items()}
    for alias, v in report.aliases.items():
        if int(v) not in numbers:
            report.problems.append(f"alias {alias} points at missing version {v}")
    if aliases_before is not None and report.aliases != aliases_before:
        report.problems.append(f"aliases changed by a failed run: {aliases_before} -> {report.aliases}")


def _check_mlflow_runs(report: Report, client) -> None:
    from mlflow.entities import ViewType

    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    if not exps:
        return
    running = client.search_runs(exps, filter_string="attributes.status = 'RUNNING'", run_view_type=ViewType.ALL)
    for r in running:
        report.problems.append(f"MLflow run {r.info.run_id} ({r.info.run_name}) left RUNNING")


def _check_prefect_runs(report: Report, api_url: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as c:
        runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))))
    for r in runs:
        report.problems.append(f"Prefect flow run {r.id} ({r.name}) left {r.state_type.value}")


# ---------------------------------------------------------------- DVC and files


def dvc_objects(folder: Path) -> list[Path]:
    """Object files of a DVC cache or local remote (`files/md5/ab/cdef...`)."""
    base = Path(folder) / "files" / "md5"
    return sorted(p for p in base.glob("*/*") if p.is_file() and not p.name.endswith(".tmp")) if base.is_dir() else []


def object_is_whole(obj: Path) -> bool:
    """A DVC object's md5 is its name (`.dir` listings: md5 of the file bytes too)."""
    expected = obj.parent.name + obj.name.removesuffix(".dir")
    return hashlib.md5(obj.read_bytes()).hexdigest() == expected


def _check_dvc(report: Report, root: Path, remote: Path | None) -> None:
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "-c", "--json"], cwd=root, capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        report.problems.append(f"`dvc status -c` failed: {out.stderr.strip()[-500:]}")
    elif json.loads(out.stdout or "{}"):
        report.problems.append(f"`dvc status -c` not clean: {out.stdout.strip()[:500]}")
    for store in (root / ".dvc" / "cache", remote):
        for obj in dvc_objects(store) if store else []:
            report.checked_objects += 1
            if not object_is_whole(obj):
                report.problems.append(f"DVC object {obj} does not hash to its name (partial or corrupt)")


def _check_files(report: Report, root: Path) -> None:
    from safetensors import safe_open

    from tasks import checkpoints, layout

    stack = [Path(root)]
    while stack:
        folder = stack.pop()
        for p in folder.iterdir():
            if p.name.startswith(".") and (p.name.endswith(".tmp") or ".old-" in p.name):
                report.problems.append(f"leftover of an interrupted write: {p}")
            elif p.is_dir() and p.name not in _SKIP_DIRS and not (folder == root and p.name in {".dvc", ".dvc-storage"}):
                stack.append(p)
            elif p.suffix == ".json" and folder.name == "reports":
                try:
                    json.loads(p.read_text())
                except ValueError as err:
                    report.problems.append(f"{p} is not whole JSON: {err}")
            elif p.suffix == ".safetensors":
                try:
                    with safe_open(str(p), "pt") as f:
                        list(f.keys())
                except Exception as err:  # noqa: BLE001 - any failure means a partial file
                    report.problems.append(f"{p} does not open as safetensors: {err}")
    for ckpt in (Path(root) / layout.CHECKPOINTS).glob("*/checkpoint-*"):
        if not checkpoints.verify(ckpt):
            report.problems.append(f"unsealed checkpoint left after the run finished: {ckpt}")


# ---------------------------------------------------------------- entry point


def check(*, root: Path | None = None, tracking_uri: str | None = None, model_name: str = "peftflow-adapter",
          dense: bool = True, verify_bytes: bool = True, aliases_before: dict | None = None,
          dvc: bool = True, dvc_remote: Path | None = None, prefect_api: str | None = None,
          files: bool = True) -> Report:
    """Check every invariant that applies to what is given; see the module docstring."""
    report = Report()
    if tracking_uri:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        _check_registry(report, client, tracking_uri, model_name, dense=dense, verify_bytes=verify_bytes,
                        aliases_before=aliases_before)
        _check_mlflow_runs(report, client)
    if prefect_api:
        _check_prefect_runs(report, prefect_api)
    if root is not None:
        root = Path(root)
        if dvc and (root / ".dvc").is_dir():
            remote = dvc_remote if dvc_remote is not None else (root / ".dvc-storage")
            _check_dvc(report, root, remote if remote.is_dir() else None)
        if files:
            _check_files(report, root)
    return report
