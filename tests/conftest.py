"""Shared fixtures: tiny generated image folders, an isolated cache, the CLI in-process (helpers: helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import make_folder

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg"
@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A cache folder of the test's own (for tests that count or inspect the entries)."""
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path / "cache"))


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
