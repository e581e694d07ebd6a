"""Where every stage reads and writes, relative to the project root.

Fixed here, not in params.yaml, because dvc.yaml must name outputs statically and every
layer (DVC, Prefect, MLflow artifacts) should agree on one path per thing.
"""

from pathlib import Path

RAW_DATA = Path("data/raw/dataset.parquet")
PROCESSED = Path("data/processed")  # datasets.save_to_disk folder, one sub-folder per split
ADAPTER = Path("models/adapter")
MERGED = Path("models/merged")
CHECKPOINTS = Path("checkpoints")  # resumable train state; not a DVC output (DVC deletes outs)
REPORTS = Path("reports")
TRAIN_LOG = REPORTS / "train_log.csv"
LOSS_CURVE = REPORTS / "loss_curve.png"
CONFUSION_MATRIX = REPORTS / "confusion_matrix.png"
PREDICTIONS = REPORTS / "predictions.csv"


def report(stage: str) -> Path:
    """reports/<stage>.json: the machine-readable summary of one stage."""
    return REPORTS / f"{stage}.json"
