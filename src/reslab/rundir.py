"""The run directory: its file names, and reading and writing them. Everything that reads a run goes through here.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line per epoch, then one line of
accuracy marks), ``last.pt`` (everything needed to resume) and, at the end, ``model.safetensors`` (the weights and
what is needed to use them).
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

CONFIG_FILE, METRICS_FILE = "config.yaml", "metrics.jsonl"
CHECKPOINT_FILE, MODEL_FILE = "last.pt", "model.safetensors"


def package_version() -> str:
    """reslab's version, from the installed package metadata ("unknown" when run from a bare source tree)."""
    try:
        return metadata.version("reslab")
    except metadata.PackageNotFoundError:
        return "unknown"


def is_finished(run: str | Path) -> bool:
    """Whether the run wrote its final model."""
    return (Path(run) / MODEL_FILE).is_file()


def has_checkpoint(run: str | Path) -> bool:
    """Whether the run can be resumed (or was started)."""
    return (Path(run) / CHECKPOINT_FILE).is_file()


def write_config(run: str | Path, config: dict[str, Any]) -> None:
    Path(run, CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))


def read_config(run: str | Path) -> dict[str, Any] | None:
    """The run's resolved config, or None when it has none."""
    path = Path(run) / CONFIG_FILE
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def append_metrics(run: str | Path, row: dict[str, Any]) -> None:
    """Add one line to ``metrics.jsonl``."""
    with open(Path(run) / METRICS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")


def _metric_lines(run: str | Path) -> list[dict[str, Any]]:
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The per-epoch lines of ``metrics.jsonl``, by epoch (the last line of an epoch, if a resume repeated one)."""
    by_epoch = {row["epoch"]: row for row in _metric_lines(run) if "epoch" in row}
    return [by_epoch[e] for e in sorted(by_epoch)]


def read_marks(run: str | Path) -> dict[str, Any]:
    """The accuracy marks the run recorded (mark -> seconds, step, test_acc), or {}."""
    marks = [row["accuracy_marks"] for row in _metric_lines(run) if "accuracy_marks" in row]
    return marks[-1] if marks else {}


def read_model_meta(run: str | Path) -> dict[str, Any]:
    """The metadata saved with the run's model (arch, classes, normalisation, ...), without loading the weights."""
    from safetensors import safe_open

    with safe_open(str(Path(run) / MODEL_FILE), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("reslab", "{}"))
