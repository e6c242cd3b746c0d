"""Shared fixtures: tiny generated image folders, an isolated cache, the CLI in-process."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg"
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


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "data")


@pytest.fixture
def cifar_dir() -> Path:
    path = Path(os.environ.get("RESLAB_CIFAR10_DIR", SHARED_CIFAR))
    if not (path / "train").is_dir():
        pytest.skip(f"no CIFAR-10 image folder at {path} (set RESLAB_CIFAR10_DIR)")
    return path


@pytest.fixture
def cli(capsys):
    """Run ``reslab ARGS`` in-process; returns (exit status, stdout, stderr)."""
    from reslab.cli.commands import main

    def run(*args: str):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
