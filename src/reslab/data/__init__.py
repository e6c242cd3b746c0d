"""Data: sources (CIFAR-10, digits, image folders), the decoded in-memory cache, batched augmentation, batches."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..core.errors import DataError
from ..core.log import say
from .augment import BatchTransform, channel_stats, pil_transform, store_size
from .datasets import Split, balanced_indices, load_split, typical_image_size
from .folder import channel_histogram, fit_square, load_rgb, sample_histogram
from .labels import LabelTable, read_labels
from .loader import Batches, eval_batches, mix_seed
from .split import FolderSplit, is_flat, needs_split, read_split, split_folder, split_json

__all__ = ["BatchTransform", "Batches", "DataBundle", "DataError", "FolderSplit", "LabelTable", "Split",
           "balanced_indices", "channel_stats", "data_changes", "eval_batches", "fingerprint", "fit_square", "is_flat",
           "load_data", "load_rgb", "load_split", "match_classes", "mix_seed", "needs_split", "pil_transform",
           "read_labels", "read_split", "split_folder", "split_json", "store_size", "typical_image_size"]


@dataclass
class DataBundle:
    """The splits of one run and what the model must remember about them."""

    train: Split
    val: Split | None
    test: Split
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    holdout: FolderSplit | None = None  # one folder of class folders: which of its images are the test split


def fingerprint(data: DataBundle) -> dict:
    """What a resumed run checks it still trains on: the classes, each split's images per class, and a hash of the
    training files' names and labels (an image swapped for another changes it)."""
    import hashlib

    def counts(split: Split | None) -> list[int] | None:
        return None if split is None else torch.bincount(split.labels, minlength=len(data.classes)).tolist()

    h = hashlib.sha256(data.train.labels.numpy().tobytes())
    for p in data.train.paths or []:
        h.update(os.path.basename(p).encode() + b"\0")
    return {"classes": list(data.classes), "train": counts(data.train), "val": counts(data.val),
            "test": counts(data.test), "train_hash": h.hexdigest()[:16]}


def data_changes(before: dict, now: dict) -> list[str]:
    """What differs between two ``fingerprint``s, in words (empty: the same data)."""
    if before.get("classes") != now["classes"]:
        added = [c for c in now["classes"] if c not in before.get("classes", [])]
        gone = [c for c in before.get("classes", []) if c not in now["classes"]]
        return [f"classes {'added: ' + ', '.join(added) if added else ''}{'; ' if added and gone else ''}"
                f"{'removed: ' + ', '.join(gone) if gone else ''}".strip() or "the classes changed order"]
    changes = []
    for split in ("train", "val", "test"):
        a, b = before.get(split), now[split]
        if a != b:
            if a is None or b is None:
                count = lambda c: "no split" if c is None else sum(c)
                changes.append(f"{split}: {count(a)} -> {count(b)}")
                continue
            diff = ", ".join(f"{c} {x} -> {y}" for c, x, y in zip(now["classes"], a, b) if x != y)
            changes.append(f"{split} images {sum(a)} -> {sum(b)} ({diff})")
    if not changes and before.get("train_hash") != now["train_hash"]:
        changes.append("training files replaced by others (same counts)")
    return changes


def match_classes(split: Split, classes: list[str]) -> Split:
    """Relabel ``split`` to the index of each of its class *names* in ``classes`` (never by folder position)."""
    unknown = [c for c in split.classes if c not in classes]
    if unknown:
        raise DataError(f"classes {unknown} are not among the model's classes {classes}")
    index = torch.tensor([classes.index(c) for c in split.classes])
    return replace(split, labels=index[split.labels], classes=list(classes))


def load_data(data: str, *, augment: str, input_size: int, data_dir: str | None = None, loader: str = "auto",
              train_samples: int | None = None, test_samples: int | None = None, val_split: int = 0,
              seed: int = 0, strict: bool = False, test_split: float = 0.2,
              holdout: FolderSplit | None = None, labels: str | None = None) -> DataBundle:
    """Load the train, validation and test splits of ``data`` for an augmentation preset.

    One folder of class folders (no ``train/``) is split: ``holdout`` (a run's recorded split) or, for a new run,
    ``test_split`` of each class held out by ``split.split_folder``. ``labels`` (a CSV or TSV) names each image's
    class, and optionally its split, instead of class folders.

    The test (and validation) classes are matched to the training classes by name. Normalisation is 0.5/0.5 for
    the seed preset (as the seed), else the per-channel statistics of the training images.
    """
    size = store_size(augment, input_size)
    if holdout is None and data not in ("cifar10", "digits") and needs_split(data, labels):
        holdout = split_folder(data, test_split, labels)
        say(holdout.line())
    kw = dict(store_size=size, data_dir=data_dir, loader=loader, strict=strict, holdout=holdout, labels=labels)
    train = load_split(data, "train", **kw)
    classes = train.classes
    test = match_classes(load_split(data, "test", **kw), classes)
    val = None
    if val_split:
        held = balanced_indices(train.labels, val_split, seed=mix_seed(seed, 1))
        keep = torch.ones(len(train), dtype=torch.bool)
        keep[held] = False
        val, train = train.subset(held), train.subset(keep.nonzero().squeeze(1))
    elif labels is not None:
        if read_labels(data, labels).has("val"):
            val = match_classes(load_split(data, "val", **kw), classes)
    elif data not in ("cifar10", "digits") and holdout is None:
        from .datasets import folder_split_dir
        if folder_split_dir(data, "val") is not None:
            val = match_classes(load_split(data, "val", **kw), classes)
    if train_samples:
        train = train.subset(balanced_indices(train.labels, train_samples, seed))
    if test_samples:
        test = test.subset(balanced_indices(test.labels, test_samples, seed))
    if augment == "seed":
        mean = std = (0.5, 0.5, 0.5)
    else:
        m, s = channel_stats(_histogram(train, size))
        mean, std = tuple(m), tuple(s)
    return DataBundle(train, val, test, classes, mean, std, holdout)


def _histogram(split: Split, size: int | None) -> np.ndarray:
    """Per-channel value counts of the training images: recorded when they were decoded, else counted (a streamed
    split: from an even sample of 2,000 files)."""
    if split.histogram is not None:
        return split.histogram
    if split.images is not None:
        if split.rows is None:
            return channel_histogram(split.images)
        return sum(channel_histogram(split.pixels(split.rows.new_tensor(range(i, min(i + 4096, len(split))))))
                   for i in range(0, len(split), 4096))
    return sample_histogram(split.paths, size or 64)
