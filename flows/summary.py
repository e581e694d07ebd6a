"""The end-of-run summary: one record, rendered as a Prefect artifact and as a terminal table.

Contract:
- `RunSummary`: what a finetune run did (stages run/skipped, metrics, lift, version, alias, link).
- `markdown(summary) -> str`: the Prefect markdown artifact `finetune-summary`.
- `predictions_table(root, limit) -> list[dict]`: readable rows of reports/predictions.csv (table artifact).
- `print_table(summary, console=None)`: the rich table printed by `python -m flows.finetune`,
  with how to open the UIs and what to type next.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks import layout

NEXT_STEPS = (
    ("make ui", "MLflow UI (runs, model versions, aliases): http://127.0.0.1:5000"),
    ("make prefect-ui", "Prefect server + UI (flow runs, artifacts): http://127.0.0.1:4200"),
    ("dvc metrics show", "metrics of every stage (reports/*.json)"),
    ("dvc plots show", "loss curve and confusion matrix as HTML (dvc_plots/index.html)"),
    ("dvc repro", "rebuild from params.yaml + versioned data (nothing to do right after a run)"),
)


@dataclass(frozen=True)
class RunSummary:
    project: str
    data_md5: str
    data_rows: int
    stages: dict[str, str]  # stage -> "ran 12.3 s" | "skipped (up to date)"
    base_metrics: dict[str, float] = field(default_factory=dict)
    adapter_metrics: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # section -> metric -> [low, high]
    n_rows: int = 0  # test rows scored
    model_name: str = ""
    version: str | None = None  # registered model version (None: nothing new registered)
    alias: str | None = None  # alias the version holds after the gate (champion / challenger)
    gate: str = ""  # the gate's one-line reason
    run_url: str | None = None  # MLflow run link
    registered_new: bool = False
    # why the version cannot be reproduced by a teammate (state or data not on a remote): tasks/sharing.py
    warnings: list[str] = field(default_factory=list)
    device_hours: float | None = None  # train stage wall time x devices (the version's peftflow.device_hours)
    cost: float | None = None  # device_hours x register.cost_per_device_hour (peftflow.cost); None: no rate

    @property
    def lift(self) -> dict[str, float]:
        """adapter - base for every metric both have."""
        return {k: self.adapter_metrics[k] - v for k, v in self.base_metrics.items()
                if k in self.adapter_metrics and _number(v) and _number(self.adapter_metrics[k])}


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if _number(v) and isinstance(v, float) else str(v)


def _ci(s: RunSummary, section: str, metric: str, signed: bool = False) -> str:
    low, high = (s.intervals.get(section) or {}).get(metric) or (None, None)
    if not (_number(low) and _number(high)):
        return ""
    return f" [{low:+.3f}, {high:+.3f}]" if signed else f" [{low:.3f}, {high:.3f}]"


def _metric_rows(s: RunSummary) -> list[tuple[str, str, str, str]]:
    """(metric, base, adapter, lift), each figure with its 95% interval."""
    names = [k for k in s.adapter_metrics if _number(s.adapter_metrics[k])]
    lift = s.lift
    return [(k, _fmt(s.base_metrics.get(k, "–")) + _ci(s, "base", k), _fmt(s.adapter_metrics[k]) + _ci(s, "adapter", k),
             f"{lift[k]:+.4f}{_ci(s, 'lift', k, signed=True)}" if k in lift else "–") for k in names]


def _metric_title(s: RunSummary) -> str:
    return f"metrics on {s.n_rows} test rows, [95% bootstrap interval]" if s.n_rows else "metrics"


def _cost(s: RunSummary) -> str:
    return f"{s.device_hours:.4g} device-hours" + (f", cost {s.cost:.4g}" if s.cost is not None else "")


def markdown(s: RunSummary) -> str:
    lines = [f"# peftflow finetune: `{s.model_name}` version {s.version or '–'}", ""]
    if s.version:
        new = "registered by this run" if s.registered_new else "already registered (nothing changed)"
        lines.append(f"**Version {s.version}** ({new}), alias **{s.alias or 'none'}**. Gate: {s.gate or '–'}")
    lines += [f"\n**Warning:** {w}" for w in s.warnings]
    if s.run_url:
        lines.append(f"\nMLflow run: [{s.run_url}]({s.run_url})")
    lines += ["", f"Data: `{layout.RAW_DATA}` md5 `{s.data_md5}`, {s.data_rows} rows. Project: `{s.project}`", "",
              f"{_metric_title(s)}:", "", "| metric | base | adapter | lift |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in _metric_rows(s)]
    lines += ["", "| stage | this run |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in s.stages.items()]
    if s.device_hours is not None:
        lines += ["", f"Training: {_cost(s)}"]
    lines += ["", "Next: " + ", ".join(f"`{cmd}`" for cmd, _ in NEXT_STEPS)]
    return "\n".join(lines) + "\n"


SHOWN_SCORES = ("exact_match", "token_f1", "rouge_l", "chrf", "embedding_similarity")


def predictions_table(root: Path, limit: int = 50, width: int = 300) -> list[dict[str, str]]:
    """The first `limit` rows of reports/predictions.csv for people: texts (cut to `width`
    characters), predicted labels and per-row generative scores; the gate's columns left out."""
    path = Path(root) / layout.PREDICTIONS
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = [row for _, row in zip(range(limit), csv.DictReader(f), strict=False)]
    keep = [k for k in (rows[0] if rows else []) if "." not in k or k.split(".", 1)[1] in SHOWN_SCORES]
    return [{k: r[k] if len(r[k]) <= width else r[k][: width - 1] + "…" for k in keep if k not in ("label", "majority")}
            for r in rows]


def print_table(s: RunSummary, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    metrics = Table(title=f"peftflow: {s.model_name} v{s.version or '–'} · alias {s.alias or 'none'}",
                    caption=_metric_title(s))
    for col in ("metric", "base", "adapter", "lift"):
        metrics.add_column(col, justify="left" if col == "metric" else "right")
    for row in _metric_rows(s):
        metrics.add_row(*row)
    console.print(metrics)

    facts = Table(show_header=False, box=None)
    facts.add_column(style="bold")
    facts.add_column()
    new = " (new)" if s.registered_new else " (unchanged, already registered)"
    facts.add_row("model version", f"{s.model_name} v{s.version or '–'}{new if s.version else ''}")
    facts.add_row("alias", s.alias or "none")
    facts.add_row("gate", s.gate or "–")
    for w in s.warnings:
        facts.add_row("[yellow]warning[/]", escape(w))  # a message may hold [brackets]
    if s.run_url:
        facts.add_row("MLflow run", s.run_url)
    facts.add_row("data", f"md5 {s.data_md5}, {s.data_rows} rows")
    facts.add_row("stages", ", ".join(f"{k} {v}" for k, v in s.stages.items()))
    if s.device_hours is not None:
        facts.add_row("training", _cost(s))
    console.print(facts)

    steps = Table(title="next", show_header=False, box=None)
    steps.add_column(style="bold cyan")
    steps.add_column()
    for cmd, what in NEXT_STEPS:
        steps.add_row(cmd, what)
    console.print(steps)
