"""The `promote` flow: move the `champion` alias by hand (or roll it back), recorded in Prefect.

`python -m flows.promote VERSION [--params PATH]`   make VERSION the champion (no gate)
`python -m flows.promote --rollback [--params PATH]` move champion back to the version it replaced

Contract of `promote(version=None, rollback=False, params="params.yaml") -> dict`: loads the
params (first task), calls `tasks.promote.promote` or `tasks.promote.rollback` (compare-and-set on
the alias; see that module), publishes the markdown artifact `champion-move`, and returns the
AliasMove as a dict. Raises PeftflowError for an unknown version or no previous champion, and
ValueError when neither or both of `version` and `rollback` are given.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from tasks import cli

cli.apply_env_defaults()  # before prefect reads the environment

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows import runtime, stages  # noqa: E402
from tasks import promote as alias  # noqa: E402
from tasks.config import Params  # noqa: E402


@task(name="move-champion", task_run_name="move-champion · {params.register.model_name}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5, retry_condition_fn=stages._retry_unless_user_error)
def move_champion(params: Params, version: str | None, rollback: bool) -> alias.AliasMove:
    name = params.register.model_name
    move = alias.rollback(name, params) if rollback else alias.promote(name, str(version), params)
    get_run_logger().info("%s: champion %s -> %s (%s)", name, move.previous, move.champion, move.note)
    return move


@flow(name="promote", log_prints=True)
def promote(version: str | None = None, rollback: bool = False, params: str = "params.yaml") -> dict:
    if (version is None) == (not rollback):
        raise ValueError("give exactly one of: a version to promote, or rollback=True")
    cfg = stages.load_config(params)
    move = move_champion(cfg, version, rollback)
    what = "rollback" if rollback else f"promote v{version}"
    create_markdown_artifact(
        key="champion-move",
        markdown=(f"# {cfg.register.model_name}: {what}\n\n"
                  f"champion: **{move.previous or 'none'} → {move.champion or 'none'}** "
                  f"({'moved' if move.moved else 'not moved'})\n\n{move.note}\n"),
        description="A hand move of the champion alias")
    return asdict(move)


@cli.main_guard
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.promote",
                                     description="Move the `champion` alias of the registered adapter model.")
    parser.add_argument("version", nargs="?", help="model version to make champion")
    parser.add_argument("--rollback", action="store_true", help="move champion back to the version it replaced")
    parser.add_argument("--params", default="params.yaml", help="params file (tracking store and model name)")
    runtime.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    if (args.version is None) == (not args.rollback):
        parser.error("give a VERSION or --rollback (not both)")
    result = runtime.run_flow(promote, {"version": args.version, "rollback": args.rollback, "params": args.params},
                              args.verbose)
    print(f"champion: {result['previous']} -> {result['champion']} ({result['note']})")
    return 0 if result["moved"] else 1


if __name__ == "__main__":
    sys.exit(main())
