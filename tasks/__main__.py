"""`python -m tasks <stage> [--params PATH]`: run one stage alone (this is what dvc.yaml calls).

User errors (bad params, bad data, unsafe model files, a full disk) print one clear message and
exit 2, without a traceback; anything else is a bug and keeps its traceback (tasks/cli.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import asdict, is_dataclass

from tasks import cli

STAGES = {
    "ingest": "fetch the data source, write data/raw/, `dvc add` + push it",
    "preprocess": "map columns, format, split and tokenise into data/processed/",
    "train": "train the PEFT adapter into models/adapter/ (resumes from checkpoints/)",
    "evaluate": "score base model and adapter on the test split into reports/evaluate.json",
    "merge": "merge the adapter into the base weights into models/merged/ with a parity check",
    "register": "log the run to MLflow and register the adapter as a model version",
}
MODEL_STAGES = ("preprocess", "train", "evaluate", "merge")  # the stages that load the base model


@cli.main_guard
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tasks",
        description="Run one peftflow stage. Stages read params.yaml and pass files to each other.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="stages:\n" + "\n".join(f"  {k:<11} {v}" for k, v in STAGES.items())
        + "\n  params-doc  print the reference of every params.yaml key (docs/params.md)",
    )
    parser.add_argument("stage", choices=[*STAGES, "params-doc"], metavar="STAGE", help="stage to run (see below)")
    parser.add_argument("--params", default="params.yaml", help="params file; its folder is the project root")
    args = parser.parse_args(argv)

    cli.apply_env_defaults()  # before the stage's libraries read the environment
    from tasks.config import load_params
    from tasks.params_doc import params_reference

    if args.stage == "params-doc":
        sys.stdout.write(params_reference())
        return 0
    with cli.stage_outputs(args.stage):
        params = load_params(args.params)
        if args.stage in MODEL_STAGES:  # settings that do not fit the model fail here, naming the value to set
            from tasks import model_checks

            model_checks.check(params)
        result = importlib.import_module(f"tasks.{args.stage}").run(params)
    if is_dataclass(result) and "WORLD_SIZE" not in os.environ:  # a training worker: its launcher prints
        print(json.dumps(asdict(result), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
