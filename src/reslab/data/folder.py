"""Image folders: scan ``root/<class>/*`` and decode once into a uint8 array, cached in a user cache folder.

The data folder may be read-only (a shared copy), so the decoded array lives under ``$RESLAB_CACHE`` (default
``~/.cache/reslab``), keyed by a hash of the file list, sizes and modification times plus the decode settings.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from ..runtime import usable_cores
from .cache import cache_dir, write_sidecar

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
# Refuse decompression bombs: no image of ours needs more pixels than this.
Image.MAX_IMAGE_PIXELS = 64_000_000


def scan_folder(root: str | Path) -> tuple[list[Path], list[str], list[str]]:
    """Files of an image-folder split ``root/<class>/<file>``.

    Returns:
        (paths, class name of each path, sorted class names). Files are sorted, so the order is reproducible.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {root} (expected {root}/<class>/<image files>)")
    paths, names = [], []
    for c in classes:
        files = sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        paths += files
        names += [c] * len(files)
    if not paths:
        raise DataError(f"no images found under {root}")
    return paths, names, classes


def sample_files(root: Path, limit: int = 256) -> list[Path]:
    """Up to ``limit`` image files of a split, spread over its classes, without listing and stat-ing every file."""
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = max(1, limit // max(1, len(classes)))
    files = []
    for c in classes:
        with os.scandir(c) as entries:  # directory entries carry their type: no stat() per file
            names = sorted(e.name for e in entries if e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS)
        files += [c / n for n in names[:per_class]]
    return files


def load_rgb(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Open an image as 8-bit RGB, whatever its mode (grayscale, palette, RGBA, CMYK, 16-bit).

    With ``min_side``, a JPEG is decoded at the smallest of libjpeg's 1/2, 1/4, 1/8 scales whose shorter side is still
    at least ``min_side`` (PIL's ``draft``): a 12-megapixel photo needed at 256 px costs a fraction of a full decode.
    """
    with Image.open(path) as im:
        if min_side is not None and im.format == "JPEG":
            w, h = im.size
            scale = min_side / min(w, h)
            if scale < 1:
                im.draft(im.mode, (math.ceil(w * scale), math.ceil(h * scale)))
        im.load()
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
            # Between 1x and 2x MAX_IMAGE_PIXELS PIL only warns: treat that as the decompression bomb it may be.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = load_rgb(path, min_side=size)
        if size is not None:
            im = fit_square(im, size)
        return np.asarray(im, dtype=np.uint8)
    except Exception as exc:  # a bad file is reported by the caller, never fatal on its own
        return f"{type(exc).__name__}: {exc}"


def _fingerprint(paths: list[Path], size: int | None) -> str:
    h = hashlib.sha256(f"v2 size={size}\n".encode())  # v2: JPEGs decoded at a reduced scale
    for p in paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def decode_images(paths: list[Path], size: int | None, *, workers: int | None = None, cache: bool = True,
                  strict: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``paths`` into one uint8 array (N, H, W, 3).

    Args:
        paths: image files.
        size: square size to fit every image to; None keeps the native size, which must then be the same for all.
        workers: decoding processes (default: the usable cores).
        cache: read/write the decoded array in the user cache folder.
        strict: raise on the first unreadable file instead of skipping it with a warning.

    Returns:
        (images, indices into ``paths`` of the images kept).
    """
    key = _fingerprint(paths, size)
    cache_file = cache_dir() / f"{key}.npz"
    if cache and cache_file.is_file():
        try:
            with np.load(cache_file) as z:
                images, kept = z["images"], z["kept"]
            if images.ndim == 4 and len(images) == len(kept) and images.shape[-1] == 3:
                if strict and len(kept) < len(paths):
                    first_bad = sorted(set(range(len(paths))) - set(kept.tolist()))[0]
                    raise DataError(f"cannot read image {paths[first_bad]} (--strict)")
                return images, kept
        except DataError:
            raise
        except Exception:
            pass  # a damaged cache is rebuilt below, never used
    jobs = [(str(p), size) for p in paths]
    n_workers = workers or usable_cores()
    if len(jobs) < 2000 or n_workers <= 1:
        results = [_decode_one(j) for j in jobs]
    else:
        with ProcessPoolExecutor(n_workers) as pool:
            results = list(pool.map(_decode_one, jobs, chunksize=512))
    bad = [(paths[i], r) for i, r in enumerate(results) if isinstance(r, str)]
    if bad and strict:
        raise DataError(f"cannot read image {bad[0][0]}: {bad[0][1]}")
    if bad:
        shown = ", ".join(str(p) for p, _ in bad[:5]) + (" ..." if len(bad) > 5 else "")
        warnings.warn(f"skipped {len(bad)} unreadable image file(s): {shown}", stacklevel=2)
    kept = np.array([i for i, r in enumerate(results) if not isinstance(r, str)], dtype=np.int64)
    if len(kept) == 0:
        raise DataError(f"no usable images among {len(paths)} files (first error: {bad[0][1]})")
    arrays = [results[i] for i in kept]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"images have different sizes {sorted(shapes)[:3]}...; decode them with a fixed size")
    images = np.stack(arrays)
    if _fingerprint(paths, size) != key:  # a file was replaced or rewritten while it was being read
        raise DataError(f"image files under {Path(paths[0]).parent.parent} changed while they were decoded; nothing "
                        f"was kept: run again once the folder is stable")
    if cache and _write_cache(cache_file, images, kept):
        write_sidecar(cache_file, str(Path(paths[0]).parent.parent), len(kept), size)
    return images, kept


def _write_cache(cache_file: Path, images: np.ndarray, kept: np.ndarray) -> bool:
    """Write the entry atomically; False (and one line) when the disk refuses."""
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}.npz")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, images=images, kept=kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cache_file)
        return True
    except OSError as exc:  # a cache is an optimisation: a full or read-only disk must not stop training
        tmp.unlink(missing_ok=True)
        print(f"reslab: could not write the decode cache ({exc}); continuing without it", file=sys.stderr)
        return False


def image_sizes(paths: list[Path], limit: int = 256) -> list[tuple[int, int]]:
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
