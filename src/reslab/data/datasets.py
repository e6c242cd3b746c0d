"""Data sources: CIFAR-10 (torchvision's download), scikit-learn's digits, and any image folder.

Every source yields ``Split`` objects: labels and class names, plus either the decoded uint8 images (in memory) or
the image files (streamed through a DataLoader when a folder is too large for memory).
"""

from __future__ import annotations

import os
import pickle
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import DataError
from ..core.log import say
from .folder import CacheUnavailable, decode_images, image_sizes, sample_files, scan_folder
from .labels import listing, read_labels
from .split import SPLIT_FILE, FolderSplit, is_flat

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEMORY_BUDGET_BYTES = 6 * 2**30  # decoded images above this are memory-mapped from the disk cache


def memory_budget() -> int:
    """Bytes of decoded images kept in memory: ``$RESLAB_MEMORY_BUDGET`` (e.g. ``6G``, ``300M``), else 6 GiB."""
    text = os.environ.get("RESLAB_MEMORY_BUDGET", "").strip().upper()
    if not text:
        return MEMORY_BUDGET_BYTES
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)
    except ValueError:
        raise DataError(f"RESLAB_MEMORY_BUDGET={text!r}: give bytes or a size like 300M or 6G") from None


@dataclass
class Split:
    """One split of a dataset: uint8 images (N, H, W, 3) in memory or memory-mapped, or image files to stream.

    A memory-mapped split is never gathered into memory: its subsets keep ``rows`` into the shared map instead.
    """

    labels: torch.Tensor
    classes: list[str]
    images: torch.Tensor | None = None
    paths: list[str] | None = None
    rows: torch.Tensor | None = None  # rows of ``images`` this split uses (memory-mapped subsets); None: all, in order
    histogram: np.ndarray | None = None  # per-channel value counts (3, 256) of the split's images, where known
    mapped: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, index: torch.Tensor) -> torch.Tensor:
        """The uint8 images at ``index`` (positions in this split)."""
        return self.images[index if self.rows is None else self.rows[index]]

    def subset(self, index: torch.Tensor) -> Split:
        paths = None if self.paths is None else [self.paths[i] for i in index.tolist()]
        if self.mapped:
            rows = index if self.rows is None else self.rows[index]
            return replace(self, labels=self.labels[index], paths=paths, rows=rows, histogram=None)
        return replace(self, labels=self.labels[index], paths=paths, histogram=None,
                       images=None if self.images is None else self.images[index])


def balanced_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """A seeded random pick of ``n`` indices, as evenly spread over the classes as the data allows (sorted)."""
    if n >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g).numpy()
    lab = labels.numpy()[perm]
    # Rank of each drawn index within its class; take every class's first draw, then every second, ...
    by_class = np.argsort(lab, kind="stable")
    rank_sorted = np.arange(len(lab)) - np.searchsorted(lab[by_class], lab[by_class], side="left")
    rank = np.empty_like(rank_sorted)
    rank[by_class] = rank_sorted
    order = np.lexsort((np.arange(len(lab)), rank))  # by rank, ties in draw order
    return torch.from_numpy(np.sort(perm[order[:n]]))


def fit_array(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 (N, H, W, 3) arrays to ``size`` x ``size`` (bilinear, antialiased); a no-op at that size."""
    if images.shape[1:3] == (size, size):
        return images
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# --- CIFAR-10 -------------------------------------------------------------------------------------------------------

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles; allow only what a dict of numpy arrays needs, never arbitrary code."""

    ALLOWED: ClassVar = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")
        return super().find_class(module, name)


def _read_batch(path: Path) -> dict:
    with open(path, "rb") as f:
        d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def download_cifar10(root: Path, timeout: float = 15.0) -> None:
    """Download and extract CIFAR-10 (python version) into ``root``; a clear ``DataError`` when offline."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # fail fast offline instead of hanging on a dead connection
    try:
        download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except Exception as exc:
        raise DataError(
            f"CIFAR-10 is not in {root} and could not be downloaded ({type(exc).__name__}). Point --data at a local "
            "image folder with train/ and test/ (e.g. --data ../shared/data/cifar10-jpeg), or put "
            f"cifar-10-batches-py in --data-dir") from None
    finally:
        socket.setdefaulttimeout(old)


def load_cifar10(root: str | Path, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR-10 from torchvision's ``cifar-10-batches-py`` layout under ``root`` (downloaded if missing)."""
    root = Path(root)
    base = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    if not all((base / n).is_file() for n in names):
        download_cifar10(root)
    batches = [_read_batch(base / n) for n in names]
    data = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.concatenate([np.asarray(b["labels"]) for b in batches])
    classes = CIFAR10_CLASSES
    meta = base / "batches.meta"
    if meta.is_file():
        classes = [c.decode() if isinstance(c, bytes) else c for c in _read_batch(meta)["label_names"]]
    return np.ascontiguousarray(data, dtype=np.uint8), labels.astype(np.int64), classes


# --- scikit-learn digits --------------------------------------------------------------------------------------------

def load_digits_split(train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's 1,797 8x8 digits as RGB uint8, with a fixed class-balanced 80/20 train/test split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] == "sklearn":
            raise DataError("--data digits needs scikit-learn: pip install 'reslab[demo]'") from None
        raise DataError(f"--data digits: scikit-learn is installed but failed to import ({exc})") from None
    d = load_digits()
    images = np.repeat((d.images * (255 / 16)).round().astype(np.uint8)[..., None], 3, axis=-1)
    labels = torch.as_tensor(d.target, dtype=torch.long)
    test = balanced_indices(labels, len(labels) // 5, seed=0).numpy()  # fixed: the same test set for every run
    mask = np.zeros(len(labels), bool)
    mask[test] = True
    keep = ~mask if train else mask
    return images[keep], d.target[keep].astype(np.int64), [str(i) for i in range(10)]


# --- choosing and loading -------------------------------------------------------------------------------------------

def default_data_dir() -> Path:
    return Path(os.environ.get("RESLAB_DATA", "./data"))


def folder_split_dir(root: str | Path, split: str) -> Path | None:
    """``root/split`` if it exists (``val`` also accepts ``valid``/``validation``)."""
    names = {"val": ["val", "valid", "validation"]}.get(split, [split])
    for n in names:
        if (Path(root) / n).is_dir():
            return Path(root) / n
    return None


def typical_image_size(data: str, labels: str | None = None) -> tuple[int, int] | None:
    """The median (width, height) of the training images, from up to 256 file headers (None: not found)."""
    if data in ("cifar10", "digits"):
        return (32, 32) if data == "cifar10" else (8, 8)
    if labels is not None:
        sizes = sorted(image_sizes(read_labels(data, labels).files("train")[0]), key=lambda wh: min(wh))
        return sizes[len(sizes) // 2] if sizes else None
    split_dir = folder_split_dir(data, "train") if Path(data).is_dir() else None
    split_dir = split_dir or (Path(data) if is_flat(data) else None)  # one folder of class folders
    if split_dir is None:
        return None
    sizes = sorted(image_sizes(sample_files(split_dir)), key=lambda wh: min(wh))
    return sizes[len(sizes) // 2] if sizes else None


def _folder_files(root: Path, split: str, holdout: FolderSplit | None,
                  labels: str | None = None) -> tuple[list[str], list[str], list[str], Path]:
    """The files of one split of an image folder: ``root/<split>/<class>/``, the rows of ``split`` in a labels file,
    or the held-out part of a folder of class folders or of a labels file's training rows (the other part for
    ``train``), with the classes of the whole folder."""
    table = read_labels(root, labels) if labels is not None else None
    if table is not None and (table.has("test") or split == "val"):
        if not table.has(split):
            raise DataError(f"--labels {labels} assigns no image to {split}"
                            + (": --val-split N holds validation images out of training" if split == "val" else ""))
        return (*table.files(split), table.classes, root)
    if holdout is None and (table is not None or is_flat(str(root))):
        what = f"--labels {labels} assigns no image to test" if table else \
            f"{root} is one folder of class folders (no train/ and test/)"
        raise DataError(f"{what}: its test images are the ones a run held out: evaluate a run trained on it (its "
                        f"{SPLIT_FILE} names them)")
    if holdout is not None:
        if split == "val":
            raise DataError(f"{root} has no val/ folder: --val-split N holds validation images out of training")
        paths, names, classes = listing(root, labels)
        keep = [i for i, p in enumerate(paths) if holdout.holds_out(p, root) == (split == "test")]
        return [paths[i] for i in keep], [names[i] for i in keep], classes, root
    split_dir = folder_split_dir(root, split)
    if split_dir is None:
        raise DataError(f"{root} has no {split}/ folder (expected {root}/{split}/<class>/<images>)")
    return (*scan_folder(split_dir), split_dir)


def load_split(data: str, split: str, *, store_size: int | None, data_dir: str | None = None,
               loader: str = "auto", strict: bool = False, holdout: FolderSplit | None = None,
               labels: str | None = None) -> Split:
    """Load one split (``train``, ``val`` or ``test``) of ``data``.

    Args:
        data: ``cifar10``, ``digits`` or an image-folder root with ``train/``, ``test/`` (optional ``val/``).
        split: which split.
        store_size: square size to keep images at; None keeps the native size when all images share one.
        data_dir: download folder for ``cifar10``.
        loader: ``memory`` (decoded images in memory), ``disk`` (memory-mapped from the decode cache), ``stream``
            (files decoded by a DataLoader every epoch) or ``auto``: memory up to the memory budget, else disk, else
            (no room for the cache) stream.
        strict: make an unreadable image an error instead of a warning.
        holdout: for one folder of class folders (no ``train/``), which of its images are the test split.
        labels: a CSV or TSV naming the class (and optionally the split) of each image under ``data``.
    """
    if data in ("cifar10", "digits"):
        if split not in ("train", "test"):
            raise DataError(f"--data {data} has no {split!r} split (use --val-split to hold out training images)")
        if data == "cifar10":
            images, labels, classes = load_cifar10(data_dir or default_data_dir(), split == "train")
        else:
            images, labels, classes = load_digits_split(split == "train")
        if store_size is not None:
            images = fit_array(images, store_size)
        return Split(torch.from_numpy(labels), classes, images=torch.from_numpy(images))

    root = Path(data)
    if not root.is_dir():
        raise DataError(f"--data {data!r}: not 'cifar10', 'digits' or an existing folder")
    paths, names, classes, split_dir = _folder_files(root, split, holdout, labels)
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[n] for n in names])
    size = side = store_size
    if size is None:
        sizes = set(image_sizes(paths))
        native = next(iter(sizes)) if len(sizes) == 1 else None
        size = None if native and native[0] == native[1] else 64  # mixed sizes: fit to 64 px squares
        side = size or native[0]
    if loader == "stream":
        return Split(labels, classes, paths=paths)
    decoded_bytes, budget = len(paths) * side * side * 3, memory_budget()
    mapped = loader == "disk" or (loader == "auto" and decoded_bytes > budget)
    if mapped and loader == "auto":
        say(f"{split_dir}: {decoded_bytes / 2**20:.0f} MiB decoded, over the {budget / 2**20:.0f} MiB "
            "memory budget ($RESLAB_MEMORY_BUDGET): read from a memory-mapped cache on disk")
    try:
        d = decode_images(paths, size, strict=strict, mapped=mapped)
    except CacheUnavailable:  # the reason was printed
        return Split(labels, classes, paths=paths)
    kept = torch.from_numpy(d.kept)
    return Split(labels[kept], classes, images=torch.from_numpy(d.images), paths=[paths[i] for i in d.kept.tolist()],
                 histogram=d.histogram, mapped=d.mapped)
