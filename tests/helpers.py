"""What the tests share besides fixtures: tiny generated image folders, the reslab command line for subprocesses,
and reading a run's metrics."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

COLOURS = {"blue": (40, 60, 200), "green": (40, 190, 60), "red": (210, 40, 40)}


def make_folder(root: Path, per_class: int = 24, size: int = 32, classes=COLOURS, splits=("train", "test"),
                seed: int = 0, ext: str = "png") -> Path:
    """An image-folder dataset whose classes differ by colour (learnable in a few steps), with noise."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for name in classes:
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.array(classes[name], dtype=np.float64)
                img = base + rng.normal(0, 25, (size, size, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:04d}.{ext}")
    return root


def reslab_cmd(*args: Any) -> list[str]:
    """``python -m reslab ARGS`` for a subprocess (this interpreter, every argument a string)."""
    return [sys.executable, "-m", "reslab", *map(str, args)]


def metrics(run: Path) -> list[dict[str, Any]]:
    """The epochs of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
