"""Moves of the `champion` alias: by the gate, by hand (`promote VERSION`), and `rollback`.

`python -m tasks.promote [--params P] [--model-name N] promote VERSION | rollback | show`

Contract:
- `move_champion(client, name, version, expected, reason)`: compare-and-set. Re-reads the alias
  right before setting it; if it is no longer `expected` (someone moved it, e.g. in the MLflow
  UI), nothing is changed and the returned AliasMove says so. After setting, re-reads to verify.
  The new champion version is tagged with the version it replaced (`peftflow.previous_champion`),
  which is the history `rollback` walks back.
- `promote(model_name, version, params)`, `rollback(model_name, params)` -> AliasMove; raise
  PeftflowError for an unknown model/version or when there is no previous champion.

MLflow has no server-side compare-and-set for aliases: the re-read/verify narrows the window of a
lost update to the time between two requests and detects it afterwards; it cannot close it.
This module holds no MLflow import: it works on the client that tasks.tracking builds.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from tasks.cli import apply_env_defaults, main_guard
from tasks.errors import ConfigError, PeftflowError

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_PREVIOUS = "peftflow.previous_champion"


@dataclass(frozen=True)
class AliasMove:
    moved: bool
    champion: str | None  # the champion version after the call
    previous: str | None  # the champion version before the call
    note: str


def alias_version(client, name: str, alias: str) -> str | None:
    """Version that `alias` points at, or None (the registered model must exist)."""
    version = client.get_registered_model(name).aliases.get(alias)
    return None if version is None else str(version)


def _versions(client, name: str) -> set[str]:
    return {str(v.version) for v in client.search_model_versions(f"name='{name}'")}


def move_champion(client, name: str, version: str, expected: str | None, reason: str,
                  record_previous: bool = True) -> AliasMove:
    """Point `champion` at `version` if it still points at `expected` (None = unset)."""
    version = str(version)
    current = alias_version(client, name, CHAMPION)
    if current != expected:
        return AliasMove(False, current, current,
                         f"champion was moved from {expected} to {current} meanwhile (by hand?); left as is")
    if current == version:
        return AliasMove(False, current, current, f"version {version} is already champion")
    if record_previous and current is not None:
        client.set_model_version_tag(name, version, TAG_PREVIOUS, current)
    client.set_registered_model_alias(name, CHAMPION, version)
    after = alias_version(client, name, CHAMPION)
    if after != version:
        return AliasMove(False, after, current,
                         f"champion is {after} right after setting it to {version}: a concurrent move won; left as is")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    client.set_model_version_tag(name, version, "peftflow.champion_since", now)
    client.set_model_version_tag(name, version, "peftflow.champion_reason", reason[:5000])
    return AliasMove(True, version, current, reason)


def promote(model_name: str, version: str, params) -> AliasMove:
    """Make `version` the champion (by hand: no gate), recording the one it replaces."""
    from tasks import tracking

    c = tracking.client(params)
    if str(version) not in _versions(c, model_name):
        raise PeftflowError(f"registered model '{model_name}' has no version {version} (see `show`)")
    current = alias_version(c, model_name, CHAMPION)
    return move_champion(c, model_name, str(version), current, f"promoted by hand from {current}")


def rollback(model_name: str, params) -> AliasMove:
    """Move `champion` back to the version it replaced; the rolled-back version keeps its history."""
    from tasks import tracking

    c = tracking.client(params)
    current = alias_version(c, model_name, CHAMPION) if _versions(c, model_name) else None
    if current is None:
        raise PeftflowError(f"registered model '{model_name}' has no champion to roll back")
    previous = c.get_model_version(model_name, current).tags.get(TAG_PREVIOUS)
    if not previous:
        raise PeftflowError(f"champion version {current} of '{model_name}' records no previous champion; "
                            f"use `promote VERSION` to choose one")
    if previous not in _versions(c, model_name):
        raise PeftflowError(f"previous champion version {previous} of '{model_name}' was deleted; "
                            f"use `promote VERSION` to choose one")
    move = move_champion(c, model_name, previous, current, f"rolled back from {current}", record_previous=False)
    if move.moved:
        c.set_model_version_tag(model_name, current, "peftflow.rolled_back_at",
                                datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return move


@main_guard
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.promote",
                                     description="Move the `champion` alias of the registered adapter model.")
    parser.add_argument("--params", default="params.yaml", help="params file (tracking store and model name)")
    parser.add_argument("--model-name", help="registered model (default: register.model_name from params)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("promote", help="make VERSION the champion (records the current one for rollback)")
    p.add_argument("version")
    sub.add_parser("rollback", help="move champion back to the version it replaced")
    sub.add_parser("show", help="print the versions and aliases")
    args = parser.parse_args(argv)

    apply_env_defaults()  # before mlflow is imported: it reads the environment at import
    from tasks import tracking
    from tasks.config import RegisterConfig, load_params

    params = load_params(args.params)
    try:
        name = RegisterConfig(model_name=args.model_name).model_name if args.model_name else params.register.model_name
    except ValueError as err:  # pydantic's ValidationError for a bad --model-name
        raise ConfigError(f"--model-name: {err.errors()[0]['msg'] if hasattr(err, 'errors') else err}") from None
    tracking.check_reachable(params)
    if args.command == "show":
        c = tracking.client(params)
        aliases = c.get_registered_model(name).aliases if _versions(c, name) else {}
        for v in sorted(_versions(c, name), key=int):
            marks = ",".join(a for a, ver in aliases.items() if str(ver) == v)
            print(f"{v}\t{marks}")
        return 0
    move = promote(name, args.version, params) if args.command == "promote" else rollback(name, params)
    print(asdict(move))
    return 0 if move.moved else 1


if __name__ == "__main__":
    sys.exit(main())
