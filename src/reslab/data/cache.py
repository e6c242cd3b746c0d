"""The decoded-image cache: uint8 pixels on disk, read into memory or memory-mapped, shared by concurrent runs.

Where: ``$RESLAB_CACHE``, else ``~/.cache/reslab`` (never next to the data, which may be read-only). One entry per
decoded folder split and size, named by a key that hashes the file list, sizes, modification times and the decode
settings:

- ``<key>.u8``: the images as raw uint8 rows (N, H, W, 3), so they can be memory-mapped with no parsing;
- ``<key>.json``: what the rows are (format, shape, files skipped as unreadable, source folder, pixel histogram).

An entry is written to temporary files, flushed and renamed, the ``.json`` last: an entry with a ``.json`` is
complete. A reader checks the format and that the ``.u8`` has exactly the size the ``.json`` states, so a truncated
or foreign file is decoded again, never used. ``<key>.lock`` (a lock owned by the live process that
decodes, see ``reslab.locks``) makes a second process wait for the first one's decode instead of doing it again; the
temporary files of a writer that was killed are removed by the next one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from ..core import log
from ..core.locks import ProcessLock, pid_alive, writer_pid

FORMAT = 4  # 1-2: one .npz per entry (reslab 0.1); 3: raw .u8 rows + .json; 4: with checksums
CRC_BLOCK = 64 * 2**20  # bytes of pixels per crc32 (~3 GB/s here: 50 ms for CIFAR-10's training images)
SPARE_BYTES = 256 * 2**20  # free space to leave on the cache's disk
# A waiter gives up on a holder whose partial file has not changed for this long (a stopped or hung process): the
# first images of a folder of large photos arrive after a chunk of them is decoded, well within this.
STALL_SECONDS = 300.0
REPORT_SECONDS = 30.0


def cache_dir() -> Path:
    return Path(os.environ.get("RESLAB_CACHE") or Path.home() / ".cache" / "reslab")


def say(message: str) -> None:
    log.say(f"reslab: {message}")


@dataclass
class Hit:
    """A valid cache entry: the images (in memory, or a read-only-to-disk memory map) and what the ``.json`` says."""

    images: np.ndarray
    meta: dict


def read_entry(key: str, mapped: bool, files: int | None = None, quiet: bool = False) -> Hit | None:
    """The entry ``key`` if it is complete and valid (None, with one line when it is damaged or outdated).

    Valid means: every field of the record has its type and agrees with the others (and with ``files``, the number of
    files the caller decodes), the record's own checksum holds (a falsified skipped list or histogram fails it), the
    ``.u8`` has the size the record states, and its pixels match their checksums: all of them when read into memory;
    the first, the last and a few random blocks when memory-mapped (a folder larger than memory is not read whole at
    every start).
    """
    data, meta_file = cache_dir() / f"{key}.u8", cache_dir() / f"{key}.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (FileNotFoundError, NotADirectoryError):  # no entry (or no cache folder) yet
        return None
    except (OSError, ValueError) as exc:
        if not quiet:
            say(f"cache entry {meta_file} is unreadable ({exc}); decoding again")
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        if not quiet:
            found = meta.get("format", "unknown") if isinstance(meta, dict) else "unknown"
            say(f"cache entry {meta_file} was written by an older reslab (format {found}); decoding again")
        return None
    problem = _record_problem(meta, files)
    if problem is None:
        shape = tuple(meta["shape"])
        try:
            size = data.stat().st_size
        except OSError:
            size = -1
        if size != math.prod(shape):
            problem = f"{data.name} has {size} bytes, not the {math.prod(shape)} its record states (truncated?)"
    if problem is None:
        # Copy-on-write mapping: pages are read on demand and shared with other runs; nothing is ever written back.
        images = np.memmap(data, np.uint8, mode="c", shape=shape) if mapped else np.fromfile(data, np.uint8)
        problem = _pixel_problem(images.reshape(-1), meta["crc32"], mapped)
    if problem is not None:
        if not quiet:
            say(f"cache entry {meta_file} is damaged ({problem}); decoding again")
        return None
    return Hit(images.reshape(shape), meta)


def record_checksum(meta: dict) -> int:
    """crc32 of a record's fields (all but itself), in a canonical form."""
    body = {k: v for k, v in meta.items() if k != "record_crc32"}
    return zlib.crc32(json.dumps(body, sort_keys=True).encode())


def _record_problem(meta: dict, files: int | None) -> str | None:
    """What is wrong with an entry's record, or None."""
    def ints(v: object) -> bool:
        return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)

    shape, skipped, hist, crcs = meta.get("shape"), meta.get("skipped"), meta.get("histogram"), meta.get("crc32")
    if not (ints(shape) and len(shape) == 4 and shape[3] == 3 and min(shape) > 0):
        return f"shape {shape!r} is not [images, height, width, 3]"
    if meta.get("store_size") is not None and (meta["store_size"], meta["store_size"]) != (shape[1], shape[2]):
        return f"shape {shape} does not hold images of {meta['store_size']} px"
    if not (ints(skipped) and len(set(skipped)) == len(skipped)):
        return "its list of skipped files is not a list of distinct indices"
    if not isinstance(meta.get("files"), int) or meta["files"] != shape[0] + len(skipped):
        return f"{meta.get('files')!r} files do not make {shape[0]} images and {len(skipped)} skipped"
    if files is not None and meta["files"] != files:
        return f"it holds {meta['files']} files, not {files}"
    if skipped and not 0 <= min(skipped) <= max(skipped) < meta["files"]:
        return "a skipped index is outside the file list"
    if not (isinstance(hist, list) and len(hist) == 3 and all(ints(h) and len(h) == 256 for h in hist)
            and all(sum(h) == shape[0] * shape[1] * shape[2] for h in hist)):
        return "its pixel histogram does not count its pixels"
    if not (ints(crcs) and len(crcs) == math.ceil(math.prod(shape) / CRC_BLOCK)):
        return "no pixel checksums"
    if meta.get("record_crc32") != record_checksum(meta):
        return "its record does not match its checksum"
    return None


def _pixel_problem(flat: np.ndarray, crcs: list[int], mapped: bool) -> str | None:
    blocks = range(len(crcs))
    if mapped and len(crcs) > 6:
        rng = np.random.default_rng()
        blocks = sorted({0, len(crcs) - 1, *rng.choice(len(crcs), 4, replace=False).tolist()})
    for b in blocks:
        if zlib.crc32(flat[b * CRC_BLOCK:(b + 1) * CRC_BLOCK]) != crcs[b]:
            return f"the pixels of block {b} do not match their checksum"
    return None


@contextlib.contextmanager
def entry_lock(key: str) -> Iterator[bool]:
    """Hold ``<key>.lock`` while deciding and decoding; waits (one line, then one every 30 s) while another live
    process holds it.

    Yields False when no lock can be taken (a read-only or missing cache folder) or the holder stopped making progress:
    the caller then decodes without writing the cache.
    """
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        lock = ProcessLock(cache_dir() / f"{key}.lock")
        got = lock.acquire()
    except OSError as exc:
        say(f"cannot use the decode cache in {cache_dir()} ({exc.strerror or exc}); decoding without it")
        yield False
        return
    if not got and not _wait_for(lock, key):
        yield False
        return
    with lock:
        if lock.previous is not None and lock.previous.pid != os.getpid():
            freed = remove_partial(key, lock.previous.pid)
            say(f"took over the decode lock of {lock.previous}, which ended without releasing it (killed?)"
                + (f"; removed its partial file ({freed / 2**20:.1f} MiB)" if freed else ""))
        yield True


def _wait_for(lock: ProcessLock, key: str) -> bool:
    """Wait until ``lock`` is free and take it (True), or give up when its holder's partial file has not changed for
    ``STALL_SECONDS`` (False: a stopped or hung holder must not hold every later run)."""
    holder = lock.holder()
    if holder is None:  # taken a moment ago: its record follows at once
        time.sleep(0.05)
        holder = lock.holder()
    say(f"another reslab process ({holder or 'PID unknown'}) is decoding these images; waiting for it to finish")
    start = last_report = last_change = time.monotonic()
    last_seen = None
    while not lock.acquire():
        time.sleep(0.2)
        holder = lock.holder() or holder
        seen = _partial_state(key, holder.pid) if holder else None
        now = time.monotonic()
        if seen != last_seen:
            last_seen, last_change = seen, now
        elif now - last_change > STALL_SECONDS:
            say(f"{holder} wrote nothing for {STALL_SECONDS:.0f} s; decoding without the cache")
            return False
        if now - last_report > REPORT_SECONDS:
            say(f"still waiting for {holder or 'the other process'} after {now - start:.0f} s "
                f"(it last wrote {now - last_change:.0f} s ago)")
            last_report = now
    return True


def _partial_state(key: str, pid: int) -> tuple[int, int] | None:
    try:
        st = (cache_dir() / f"{key}.tmp{pid}.u8").stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def remove_partial(key: str, pid: int) -> int:
    """Delete the temporary files a writer ``pid`` left for ``key``; returns the bytes freed."""
    freed = 0
    for f in cache_dir().glob(f"{key}.tmp{pid}.*"):
        with contextlib.suppress(OSError):
            size = f.stat().st_size
            f.unlink()
            freed += size
    return freed


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
        self.crcs: list[int] = []
        self.crc, self.filled = 0, 0
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed by commit or abort)
        try:
            if hasattr(os, "posix_fallocate") and expected_bytes:
                os.posix_fallocate(self.file.fileno(), 0, expected_bytes)  # ENOSPC now, not mid-way
        except OSError as exc:
            if exc.errno not in (95, 22):  # EOPNOTSUPP / EINVAL: the filesystem cannot preallocate; write anyway
                self.abort()
                raise

    def write(self, image: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(image)).cast("B")
        self.file.write(data)
        while len(data):  # crc32 per CRC_BLOCK bytes, so a memory-mapped reader can check a sample of blocks
            part, data = data[:CRC_BLOCK - self.filled], data[CRC_BLOCK - self.filled:]
            self.crc, self.filled = zlib.crc32(part, self.crc), self.filled + len(part)
            if self.filled == CRC_BLOCK:
                self.crcs.append(self.crc)
                self.crc, self.filled = 0, 0

    def commit(self, meta: dict) -> None:
        """Flush the rows (to the exact size) and publish them, then the ``.json`` that makes the entry valid."""
        try:
            self.file.truncate(self.file.tell())  # preallocation may be larger when images were skipped
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, cache_dir() / f"{self.key}.u8")
            meta_tmp = cache_dir() / f"{self.key}.tmp{os.getpid()}.json"
            record = {"format": FORMAT, **meta, "crc32": self.crcs + ([self.crc] if self.filled else [])}
            meta_tmp.write_text(json.dumps({**record, "record_crc32": record_checksum(record)}))
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
    """One decoded folder split in the cache, as ``reslab cache`` lists it (or a writer's partial file)."""

    file: str
    bytes: int
    modified: str  # ISO date and time
    source: str | None = None  # the folder split it was decoded from
    images: int | None = None
    store_size: int | None = None  # pixels per side (None: native size)
    format: int | None = None  # FORMAT, or an older one (cleared by --clear, never read)
    writer: int | None = None  # a partial file: the PID writing it
    writer_alive: bool | None = None  # ... and whether that process still runs (a dead one's file is debris)


def _typed(record: dict, key: str, kind: type) -> object:
    value = record.get(key)
    return value if isinstance(value, kind) else None


def list_cache() -> list[CacheEntry]:
    """The cache's entries and partial files, newest first (entries of older reslab versions included)."""
    entries = []
    for f in sorted(cache_dir().glob("*")) if cache_dir().is_dir() else []:
        pid = writer_pid(f.name)
        if f.suffix not in (".u8", ".npz") and pid is None:
            continue
        try:
            st = f.stat()
        except OSError:  # a dangling link, or removed meanwhile
            continue
        when = datetime.fromtimestamp(st.st_mtime).isoformat(timespec="seconds")
        if pid is not None:
            entries.append(CacheEntry(str(f), st.st_size, when, writer=pid, writer_alive=pid_alive(pid)))
            continue
        try:
            info = json.loads(f.with_suffix(".json").read_text())
        except (OSError, ValueError):
            info = {}
        info = info if isinstance(info, dict) else {}
        fmt = info.get("format", FORMAT if f.suffix == ".u8" else 2)
        if f.suffix == ".u8" and fmt != FORMAT:
            continue  # an old .json beside a new entry still being written
        entries.append(CacheEntry(str(f), st.st_size, when, _typed(info, "source", str), _typed(info, "images", int),
                                  _typed(info, "store_size", int), fmt if isinstance(fmt, int) else None))
    return sorted(entries, key=lambda e: e.modified, reverse=True)


def clear_cache() -> tuple[int, int]:
    """Delete every cache file (entries of any format, locks, partial files of killed writers), except the partial
    files of writers still running: (files, bytes). Raises OSError when the cache folder refuses."""
    files, freed = 0, 0
    folder = cache_dir()
    for f in folder.iterdir() if folder.is_dir() else []:
        pid = writer_pid(f.name)
        if pid is not None and pid_alive(pid):
            continue
        if (f.is_file() or f.is_symlink()) and (f.suffix in (".u8", ".npz", ".json", ".lock") or pid is not None):
            size = f.lstat().st_size
            f.unlink()
            freed += size
            files += 1
    return files, freed
