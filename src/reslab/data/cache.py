"""The decoded-image cache: where it lives (``$RESLAB_CACHE``, else ``~/.cache/reslab``), what it holds, clearing it.

Each entry is ``<key>.npz`` (the uint8 images and the indices of the files kept) with a ``<key>.json`` beside it
that says which folder and size it was decoded from; the key hashes the file list, sizes, modification times and
the decode settings, so a changed folder gets a new entry and old ones are only disk space until cleared.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("RESLAB_CACHE") or Path.home() / ".cache" / "reslab")


@dataclass
class CacheEntry:
    """One decoded folder split in the cache."""

    file: str
    bytes: int
    modified: str  # ISO date and time
    source: str | None = None  # the folder split it was decoded from (None for entries written before reslab 0.1.1)
    images: int | None = None
    store_size: int | None = None  # pixels per side (None: native size)


def write_sidecar(cache_file: Path, source: str, images: int, store_size: int | None) -> None:
    """Record what ``cache_file`` holds (best effort: the cache works without it)."""
    with contextlib.suppress(OSError):
        cache_file.with_suffix(".json").write_text(json.dumps({"source": source, "images": images,
                                                               "store_size": store_size}))


def list_cache() -> list[CacheEntry]:
    """The cache's entries, newest first."""
    entries = []
    for f in cache_dir().glob("*.npz") if cache_dir().is_dir() else []:
        if ".tmp" in f.name:
            continue
        st = f.stat()
        side = f.with_suffix(".json")
        info = json.loads(side.read_text()) if side.is_file() else {}
        entries.append(CacheEntry(str(f), st.st_size, datetime.fromtimestamp(st.st_mtime).isoformat(timespec="seconds"),
                                  info.get("source"), info.get("images"), info.get("store_size")))
    return sorted(entries, key=lambda e: e.modified, reverse=True)


def clear_cache() -> tuple[int, int]:
    """Delete every cache entry (and leftovers of interrupted writes); returns (files removed, bytes freed)."""
    files, freed = 0, 0
    folder = cache_dir()
    for f in list(folder.glob("*.npz")) + list(folder.glob("*.json")) if folder.is_dir() else []:
        freed += f.stat().st_size
        f.unlink()
        files += 1
    return files, freed
