"""Image folders: scan ``root/<class>/*`` and decode once into a uint8 array, cached in a user cache folder.

The data folder may be read-only (a shared copy), so the decoded array lives under ``$RESLAB_CACHE`` (default
``~/.cache/reslab``), keyed by a hash of the file list, sizes and modification times plus the decode settings.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..core.errors import DataError
from ..core.execution import usable_cores
from ..core.locks import die_with_parent
from ..core.progress import CountProgress
from ..core.version import package_version
from .cache import EntryWriter, cache_dir, entry_lock, read_entry, say

HEIF_EXTENSIONS = {".heic", ".heif"}  # phones' photos; read through pillow-heif (pip install 'reslab[photos]')
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
                    *HEIF_EXTENSIONS}
EXIF_ORIENTATION = 0x0112
HEIF_MISSING = "pip install 'reslab[photos]' (pillow-heif) to read HEIC/HEIF photos"


@functools.cache
def heif_readable() -> bool:
    """Whether HEIC/HEIF files can be read here: pillow-heif is installed (its opener is then registered with PIL,
    once per process: the decode workers register their own)."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def is_heif(path: str | Path) -> bool:
    return os.path.splitext(str(path))[1].lower() in HEIF_EXTENSIONS
# Refuse decompression bombs: no image of ours needs more pixels than this. PIL itself only warns up to twice the
# limit, so ``load_rgb`` checks it, everywhere an image is read (training, eval, audit, predict, serve).
Image.MAX_IMAGE_PIXELS = 64_000_000


class TooManyPixels(DataError):
    """An image larger than ``Image.MAX_IMAGE_PIXELS``: refused before it is decoded."""


def check_pixels(im: Image.Image) -> None:
    """Refuse an opened (not yet decoded) image over ``Image.MAX_IMAGE_PIXELS``."""
    w, h = im.size
    if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
        raise TooManyPixels(f"{w}x{h} is {w * h / 1e6:.0f} megapixels, over the limit of "
                            f"{Image.MAX_IMAGE_PIXELS / 1e6:.0f} (a decompression bomb?): not decoded")


def scan_folder(root: str | Path) -> tuple[list[str], list[str], list[str]]:
    """Files of an image-folder split ``root/<class>/<file>``.

    Returns:
        (paths, class name of each path, sorted class names). Files are sorted, so the order is reproducible; paths
        are strings (60,000 ``Path`` objects would cost 0.2 s of every start).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise DataError(f"no class folders in {root} (expected {root}/<class>/<image files>)")
    paths, names, classes, empty = [], [], [], []
    for c in folders:
        files = list_images(str(root / c))
        if not files:  # not a class: nothing could be learned or scored for it
            empty.append(c)
            continue
        classes.append(c)
        paths += files
        names += [c] * len(files)
    if any(is_heif(f) for f in paths) and not heif_readable():  # pillow-heif imported only when needed
        kept = [i for i, f in enumerate(paths) if not is_heif(f)]
        say(f"warning: {root}: {len(paths) - len(kept)} HEIC/HEIF photos skipped: {HEIF_MISSING}")
        paths, names = [paths[i] for i in kept], [names[i] for i in kept]
        classes = sorted(set(names))
    if not paths:
        raise DataError(f"no images found under {root}")
    if empty:
        say(f"warning: {root}: ignored {len(empty)} class folder(s) without images: {', '.join(empty[:5])}"
            f"{' ...' if len(empty) > 5 else ''}")
    return paths, names, classes


def list_images(folder: str, _seen: set | None = None) -> list[str]:
    """Image files under ``folder`` (recursively, following links once: a link loop is listed once, with a
    warning), sorted as paths sort. Directory entries carry their type, so listing 60,000 files costs no ``stat``
    each (0.1 s instead of 0.6 s with ``Path.rglob`` + ``is_file``)."""
    seen = _seen if _seen is not None else set()
    try:
        return _listed(folder, seen)
    except PermissionError as exc:
        raise DataError(f"cannot read the folder {exc.filename or folder}: {exc.strerror}") from None


def _listed(folder: str, seen: set) -> list[str]:
    st = os.stat(folder)
    if (st.st_dev, st.st_ino) in seen:
        say(f"warning: {folder} links back to a folder already listed: skipped")
        return []
    seen.add((st.st_dev, st.st_ino))
    files, nested = [], False
    with os.scandir(folder) as entries:
        for e in entries:
            if e.is_dir():
                files += _listed(e.path, seen)
                nested = True
            elif e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                files.append(e.path)
    # Sorted as Paths sort (component by component); for one flat folder that is a plain string sort.
    return sorted(files, key=lambda f: f.split(os.sep)) if nested else sorted(files)


def sample_files(root: Path, limit: int = 256) -> list[Path]:
    """Up to ``limit`` image files of a split, spread over its classes, without listing and stat-ing every file."""
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = max(1, limit // max(1, len(classes)))
    return [Path(f) for c in classes for f in list_images(str(c))[:per_class]]


def decode_bytes(im: Image.Image, min_side: int | None = None) -> int:
    """About the most memory ``load_rgb`` takes to decode the opened image ``im`` (its header read, no pixels):
    the decoded pixels at the scale ``min_side`` lets a JPEG decode at, plus what each conversion to RGB holds."""
    w, h = im.size
    if min_side is not None and im.format == "JPEG":
        r = next((r for r in (8, 4, 2) if min(w, h) / r >= min_side), 1)
        w, h = -(-w // r), -(-h // r)
    per = {"1": 1, "L": 1, "P": 1, "LA": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3}.get(im.mode, 4)
    extra = 17 if im.mode in ("I;16", "I;16B", "I;16L", "I") else 8 if im.mode in ("RGBA", "LA", "PA", "P") else 0
    return w * h * (per + 3 + extra)  # 16-bit: a float64 copy, clipped; alpha: a white RGBA to composite on


def load_rgb(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Open an image as 8-bit RGB, whatever its mode (grayscale, palette, RGBA, CMYK, 16-bit), upright by its EXIF
    orientation; HEIC/HEIF through pillow-heif where it is installed.

    With ``min_side``, a JPEG is decoded at the smallest of libjpeg's 1/2, 1/4, 1/8 scales whose shorter side is still
    at least ``min_side`` (PIL's ``draft``): a 12-megapixel photo needed at 256 px costs a fraction of a full decode.
    """
    if is_heif(path) and not heif_readable():
        raise DataError(f"{path} is a HEIC/HEIF photo: {HEIF_MISSING}")
    with Image.open(path) as im:
        check_pixels(im)
        # A phone stores the photo as its sensor saw it and the way up in EXIF: apply it, so the model sees the
        # picture upright whichever way the phone was held (torchvision's ImageFolder does not).
        rotated = im.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)
        if min_side is not None and im.format == "JPEG":
            w, h = im.size
            scale = min_side / min(w, h)
            if scale < 1:
                im.draft(im.mode, (math.ceil(w * scale), math.ceil(h * scale)))
        im.load()
        if rotated:
            im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grayscale: scale to 8 bits rather than clip (PIL's convert would saturate).
            arr = np.asarray(im, dtype=np.float64)
            arr = arr / 257.0 if arr.max() > 255 else arr
            im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, im)  # transparent pixels become white, not black
        return im.convert("RGB")


def fit_square(im: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and centre-crop a ``size`` x ``size`` square."""
    w, h = im.size
    if (w, h) == (size, size):
        return im
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def _decode_one(args: tuple[str, int | None]) -> np.ndarray | str:
    path, size = args
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # load_rgb refuses it in one line
            im = load_rgb(path, min_side=size)
        if size is not None:
            im = fit_square(im, size)
        return np.asarray(im, dtype=np.uint8)
    except Exception as exc:  # a bad file is reported by the caller, never fatal on its own
        return f"{type(exc).__name__}: {exc}"


def _fingerprint(paths: list[str], size: int | None) -> str:
    """Key of a decoded entry: every file's path, size and modification time (a file rewritten in place changes
    them), and the decode settings. One ``stat`` per file: ~0.1 s for 60,000 files."""
    h = hashlib.sha256(f"v3 size={size}\n".encode())  # v2: JPEGs decoded at a reduced scale; v3: EXIF upright
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def channel_histogram(images: np.ndarray | torch.Tensor, chunk: int = 4096) -> np.ndarray:
    """Counts of each uint8 value per channel, (3, 256), of images (N, H, W, 3): exact normalisation statistics in
    one pass, also over a memory map (read in chunks)."""
    hist = np.zeros((3, 256), np.int64)
    for i in range(0, len(images), chunk):
        x = torch.as_tensor(np.asarray(images[i:i + chunk])).reshape(-1, 3)
        for c in range(3):
            hist[c] += torch.bincount(x[:, c].contiguous(), minlength=256).numpy()
    return hist


def sample_histogram(paths: list[str], size: int, n: int = 2000) -> np.ndarray:
    """``channel_histogram`` of an even sample of ``n`` files, decoded as the cache decodes them (for a streamed split,
    whose images are never all decoded at once)."""
    sample = [_decode_one((p, size)) for p in paths[::max(1, len(paths) // n)]]
    return channel_histogram(np.stack([a for a in sample if not isinstance(a, str)]))


@dataclass
class Decoded:
    """Images decoded from a list of files: in memory, or memory-mapped from the cache."""

    images: np.ndarray
    kept: np.ndarray  # indices into the file list of the images (unreadable files are skipped)
    histogram: np.ndarray  # channel_histogram(images)
    mapped: bool = False


class CacheUnavailable(Exception):
    """A memory-mapped decode was asked for and the cache cannot hold it (the caller streams instead)."""


def decode_images(paths: list[str], size: int | None, *, workers: int | None = None, strict: bool = False,
                  mapped: bool = False) -> Decoded:
    """Decode ``paths`` into uint8 images (N, H, W, 3), once: later calls read them from the cache.

    Args:
        paths: image files.
        size: square size to fit every image to; None keeps the native size, which must then be the same for all.
        workers: decoding processes (default: the usable cores).
        strict: raise on the first unreadable file instead of skipping it with a warning.
        mapped: memory-map the cached images instead of reading them into memory (for folders larger than memory);
            raises ``CacheUnavailable`` when they cannot be cached.
    """
    key = _fingerprint(paths, size)
    hit = read_entry(key, mapped, len(paths))
    if hit is None:
        with entry_lock(key) as locked:
            # another process may have written it meanwhile
            hit = read_entry(key, mapped, len(paths), quiet=True) if locked else None
            if hit is None:
                writer = _open_writer(key, len(paths), size, mapped) if locked else None
                if mapped and writer is None:
                    raise CacheUnavailable
                return _decode(paths, size, key, writer, workers, strict, mapped)
    skipped = hit.meta.get("skipped", [])
    if strict and skipped:
        raise DataError(f"cannot read image {paths[skipped[0]]} (--strict)")
    if skipped:
        _warn_skipped([paths[i] for i in skipped], "when first decoded")
    kept = np.setdiff1d(np.arange(len(paths)), np.asarray(skipped, dtype=np.int64))
    return Decoded(hit.images, kept, np.asarray(hit.meta["histogram"], np.int64), mapped)


def _warn_skipped(files: list[str], when: str = "", stacklevel: int = 4) -> None:
    shown = ", ".join(files[:5]) + (" ..." if len(files) > 5 else "")
    warnings.warn(f"skipped {len(files)} unreadable image file(s){' (' + when + ')' if when else ''}: {shown}",
                  stacklevel=stacklevel)


def _open_writer(key: str, n: int, size: int | None, mapped: bool) -> EntryWriter | None:
    side = size or 32  # native sizes are only known after decoding; the up-front space check then assumes CIFAR's
    try:
        return EntryWriter(key, n * side * side * 3)
    except OSError as exc:
        then = "streaming the images from their files instead" if mapped else "continuing without it"
        say(f"cannot write the decode cache in {cache_dir()} ({exc.strerror or exc}); {then}")
        return None


class _Rows:
    """The decoded images as they arrive, in file order: kept in memory (unless mapped), written to the cache entry,
    counted into the pixel histogram; unreadable files are remembered."""

    def __init__(self, paths: list[str], writer: EntryWriter | None, strict: bool, mapped: bool) -> None:
        self.paths, self.writer, self.strict, self.mapped = paths, writer, strict, mapped
        self.arrays: list[np.ndarray] = []
        self.kept: list[int] = []
        self.bad: list[tuple[int, str]] = []
        self.shape: tuple[int, ...] | None = None
        self.pending: list[np.ndarray] = []
        self.hist = np.zeros((3, 256), np.int64)

    def add(self, i: int, r: np.ndarray | str) -> None:
        if isinstance(r, str):
            if self.strict:
                raise DataError(f"cannot read image {self.paths[i]}: {r}")
            self.bad.append((i, r))
            return
        if self.shape is None:
            self.shape = r.shape
        elif r.shape != self.shape:
            raise DataError(f"images have different sizes ({self.shape[:2]} and {r.shape[:2]} at {self.paths[i]}); "
                            "decode them with a fixed size")
        self.kept.append(i)
        if self.writer is not None:
            try:
                self.writer.write(r)
            except OSError as exc:
                self.writer = _give_up(self.writer, exc, self.mapped)
        if not self.mapped:
            self.arrays.append(r)
        self.pending.append(r)
        if len(self.pending) == 1024:  # histograms in batches: per image they would cost as much as decoding
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.hist += channel_histogram(np.stack(self.pending))
            self.pending.clear()


def _decode(paths: list[str], size: int | None, key: str, writer: EntryWriter | None, workers: int | None,
            strict: bool, mapped: bool) -> Decoded:
    """Decode in parallel, in file order, into ``writer`` (and memory, unless ``mapped``); commit the entry."""
    jobs = [(p, size) for p in paths]
    n_workers = min(workers or usable_cores(), max(1, len(jobs) // 64))
    progress = CountProgress(len(jobs), f"decoding {len(jobs)} images of {Path(paths[0]).parent.parent}")
    rows = _Rows(paths, writer, strict, mapped)
    try:
        with contextlib.ExitStack() as stack:
            if n_workers > 1:
                # Workers die with this process: orphans would keep decoding into a pipe nobody reads.
                pool = stack.enter_context(ProcessPoolExecutor(n_workers, initializer=die_with_parent,
                                                               initargs=(os.getpid(),)))
                results = pool.map(_decode_one, jobs, chunksize=max(1, min(256, len(jobs) // (8 * n_workers))))
            else:
                results = map(_decode_one, jobs)
            for i, r in enumerate(results):
                progress.update(i + 1)
                rows.add(i, r)
        rows.flush()
        progress.done()
        _check_result(rows, paths, size, key)
        meta = {"source": str(Path(paths[0]).parent.parent), "files": len(paths), "images": len(rows.kept),
                "store_size": size, "shape": [len(rows.kept), *rows.shape], "skipped": [i for i, _ in rows.bad],
                "histogram": rows.hist.tolist(), "reslab": package_version()}
        if rows.writer is not None:
            try:
                rows.writer.commit(meta)
            except OSError as exc:
                rows.writer = _give_up(rows.writer, exc, mapped)
            else:
                rows.writer = None
    finally:
        if rows.writer is not None:
            rows.writer.abort()
    kept = np.asarray(rows.kept, np.int64)
    if mapped:
        hit = read_entry(key, mapped=True, files=len(paths))
        if hit is None:
            raise CacheUnavailable
        return Decoded(hit.images, kept, rows.hist, mapped=True)
    return Decoded(np.stack(rows.arrays), kept, rows.hist)


def _check_result(rows: _Rows, paths: list[str], size: int | None, key: str) -> None:
    """Something usable was decoded, skipped files are said, and no file changed while it was read."""
    if not rows.kept:
        raise DataError(f"no usable images among {len(paths)} files (first error: {rows.bad[0][1]})")
    if rows.bad:
        _warn_skipped([paths[i] for i, _ in rows.bad], stacklevel=5)
    if _fingerprint(paths, size) != key:  # a file was replaced or rewritten while it was being read
        raise DataError(f"image files under {Path(paths[0]).parent.parent} changed while they were decoded; "
                        "nothing was kept: run again once the folder is stable")


def _give_up(writer: EntryWriter, exc: OSError, mapped: bool) -> None:
    """A cache is an optimisation: a full disk stops the writing (one line), not the training."""
    writer.abort()
    if mapped:
        say(f"could not write the decode cache ({exc.strerror or exc}); streaming the images from their files instead")
        raise CacheUnavailable from exc
    say(f"could not write the decode cache ({exc.strerror or exc}); continuing without it")


def image_sizes(paths: list[str], limit: int = 256) -> list[tuple[int, int]]:
    """Sizes (w, h) of up to ``limit`` evenly spaced files, read from their headers only."""
    step = max(1, len(paths) // limit)
    sizes = []
    for p in paths[::step]:
        try:
            with Image.open(p) as im:
                sizes.append(im.size)
        except Exception:
            continue
    return sizes
