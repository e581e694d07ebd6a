"""Views of the params schema: the dotted-key view of one `Params` (logged to MLflow) and the
markdown reference of every key (`python -m tasks params-doc`, docs/params.md).

Contract: both are pure functions of the schema in tasks/config.py (plus, for `flatten`, one
loaded `Params`); excluded fields (root, sha256, path) never appear.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tasks.config import Params, Section


def flatten(params: Params) -> dict[str, Any]:
    """Dotted-key view of every param (for MLflow), e.g. {"train.peft.r": 16}."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    walk("", params.model_dump(mode="json"))
    return out


def params_reference() -> str:
    """Markdown reference of every key, generated from the schema (docs/params.md is this text)."""
    lines = [
        "# params.yaml reference",
        "",
        "Generated from `tasks/config.py` by `python -m tasks params-doc > docs/params.md`;",
        "a unit test fails when this file is out of date. Unknown keys are errors.",
        "",
    ]

    def section(prefix: str, model: type[BaseModel]) -> None:
        rows = []
        nested = []
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, Section):
                nested.append((f"{prefix}.{name}" if prefix else name, ann))
                continue
            default = field.get_default(call_default_factory=True)
            symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "min length"}
            limits = [f"{sym} {getattr(m, attr)}" for m in field.metadata for attr, sym in symbols.items()
                      if hasattr(m, attr)]
            type_name = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
            meaning = (field.description or "") + (f" ({', '.join(limits)})" if limits else "")
            cells = [f"`{prefix}.{name}`", f"`{type_name}`", f"`{default!r}`", meaning]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        if rows:
            lines.extend([f"## `{prefix}`", "", (model.__doc__ or "").strip(), "",
                          "| key | type | default | meaning |", "|---|---|---|---|", *rows, ""])
        for p, m in nested:
            section(p, m)

    for name, field in Params.model_fields.items():
        if not field.exclude:
            section(name, field.annotation)
    return "\n".join(lines)
