"""The decoded-image cache: uint8 pixels on disk, read into memory or memory-mapped, shared by concurrent runs.

Where: ``$RESLAB_CACHE``, else ``~/.cache/reslab`` (never next to the data, which may be read-only). One entry per
decoded folder split and size, named by a key that hashes the file list, sizes, modification times and the decode
settings:

- ``<key>.u8``: the images as raw uint8 rows (N, H, W, 3), so they can be memory-mapped with no parsing;
- ``<key>.json``: what the rows are (format, shape, files skipped as unreadable, source folder, pixel histogram).

An entry is written to temporary files, flushed and renamed, the ``.json`` last: an entry with a ``.json`` is
complete. A reader checks the format and that the ``.u8`` has exactly the size the ``.json`` states, so a truncated
or foreign file is decoded again, never used. ``<key>.lock`` (an advisory lock, released by the OS when its holder
dies) makes a second process wait for the first one's decode instead of doing it again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent runs may decode twice, atomic renames keep it correct
    fcntl = None

FORMAT = 3  # 1-2: one .npz per entry (reslab 0.1); 3: raw .u8 rows + .json
SPARE_BYTES = 256 * 2**20  # free space to leave on the cache's disk


def cache_dir() -> Path:
    return Path(os.environ.get("RESLAB_CACHE") or Path.home() / ".cache" / "reslab")


def say(message: str) -> None:
    print(f"reslab: {message}", file=sys.stderr)


@dataclass
class Hit:
    """A valid cache entry: the images (in memory, or a read-only-to-disk memory map) and what the ``.json`` says."""

    images: np.ndarray
    meta: dict


def read_entry(key: str, mapped: bool) -> Hit | None:
    """The entry ``key`` if it is complete and valid (None, with one line when it is damaged or outdated)."""
    data, meta_file = cache_dir() / f"{key}.u8", cache_dir() / f"{key}.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (FileNotFoundError, NotADirectoryError):  # no entry (or no cache folder) yet
        return None
    except (OSError, ValueError) as exc:
        say(f"cache entry {meta_file} is unreadable ({exc}); decoding again")
        return None
    if meta.get("format") != FORMAT:
        say(f"cache entry {meta_file} was written by an older reslab (format {meta.get('format', 'unknown')}); "
            f"decoding again")
        return None
    shape = tuple(meta["shape"])
    try:
        size = data.stat().st_size
    except OSError:
        size = -1
    if size != int(np.prod(shape)):
        say(f"cache entry {data} has {size} bytes, not the {int(np.prod(shape))} its record states (truncated or "
            f"damaged); decoding again")
        return None
    # Copy-on-write mapping: pages are read on demand and shared with other runs; nothing is ever written back.
    images = np.memmap(data, np.uint8, mode="c", shape=shape) if mapped else np.fromfile(data, np.uint8).reshape(shape)
    return Hit(images, meta)


@contextlib.contextmanager
def entry_lock(key: str) -> Iterator[bool]:
    """Hold ``<key>.lock`` while deciding and decoding (waits, with one line, if another process holds it).

    Yields False when no lock can be taken (a read-only or missing cache folder): the caller then decodes without
    writing the cache.
    """
    if fcntl is None:
        yield True
        return
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        f = open(cache_dir() / f"{key}.lock", "a+")  # noqa: SIM115 (closed by the with below)
    except OSError as exc:
        say(f"cannot use the decode cache in {cache_dir()} ({exc.strerror or exc}); decoding without it")
        yield False
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            say("another reslab process is decoding these images; waiting for it to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class EntryWriter:
    """Writes one entry's rows as they are decoded; ``commit`` makes it visible, ``abort`` leaves nothing behind.

    Raises OSError when the disk refuses (checked up front where the space is known to be missing, so a folder too
    large for the disk fails before any decoding, not at the end).
    """

    def __init__(self, key: str, expected_bytes: int) -> None:
        self.key = key
        self.tmp = cache_dir() / f"{key}.tmp{os.getpid()}.u8"
        cache_dir().mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(cache_dir()).free
        if free < expected_bytes + SPARE_BYTES:
            raise OSError(f"{expected_bytes / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free")
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed by commit or abort)
        try:
            if hasattr(os, "posix_fallocate") and expected_bytes:
                os.posix_fallocate(self.file.fileno(), 0, expected_bytes)  # ENOSPC now, not mid-way
        except OSError as exc:
            if exc.errno not in (95, 22):  # EOPNOTSUPP / EINVAL: the filesystem cannot preallocate; write anyway
                self.abort()
                raise

    def write(self, image: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(image).data)

    def commit(self, meta: dict) -> None:
        """Flush the rows (to the exact size) and publish them, then the ``.json`` that makes the entry valid."""
        try:
            self.file.truncate(self.file.tell())  # preallocation may be larger when images were skipped
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, cache_dir() / f"{self.key}.u8")
            meta_tmp = cache_dir() / f"{self.key}.tmp{os.getpid()}.json"
            meta_tmp.write_text(json.dumps({"format": FORMAT, **meta}))
            os.replace(meta_tmp, cache_dir() / f"{self.key}.json")
        except OSError:
            self.abort()
            raise
        (cache_dir() / f"{self.key}.npz").unlink(missing_ok=True)  # this key's entry in the old format

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        self.tmp.unlink(missing_ok=True)
        (cache_dir() / f"{self.key}.tmp{os.getpid()}.json").unlink(missing_ok=True)


@dataclass
class CacheEntry:
    """One decoded folder split in the cache, as ``reslab cache`` lists it."""

    file: str
    bytes: int
    modified: str  # ISO date and time
    source: str | None = None  # the folder split it was decoded from
    images: int | None = None
    store_size: int | None = None  # pixels per side (None: native size)
    format: int | None = None  # FORMAT, or an older one (cleared by --clear, never read)


def list_cache() -> list[CacheEntry]:
    """The cache's entries, newest first (entries of older reslab versions included, with their format)."""
    entries = []
    for f in sorted(cache_dir().glob("*")) if cache_dir().is_dir() else []:
        if ".tmp" in f.name or f.suffix not in (".u8", ".npz"):
            continue
        st = f.stat()
        try:
            info = json.loads(f.with_suffix(".json").read_text())
        except (OSError, ValueError):
            info = {}
        fmt = info.get("format", FORMAT if f.suffix == ".u8" else 2)
        if f.suffix == ".u8" and fmt != FORMAT:
            continue  # an old .json beside a new entry still being written
        entries.append(CacheEntry(str(f), st.st_size, datetime.fromtimestamp(st.st_mtime).isoformat(timespec="seconds"),
                                  info.get("source"), info.get("images"), info.get("store_size"), fmt))
    return sorted(entries, key=lambda e: e.modified, reverse=True)


def clear_cache() -> tuple[int, int]:
    """Delete every cache file (entries of any format, locks, leftovers of interrupted writes): (files, bytes)."""
    files, freed = 0, 0
    folder = cache_dir()
    for f in folder.iterdir() if folder.is_dir() else []:
        if f.is_file() and f.suffix in (".u8", ".npz", ".json", ".lock"):
            freed += f.stat().st_size
            f.unlink()
            files += 1
    return files, freed
