"""Data: sources (CIFAR-10, digits, image folders), the decoded in-memory cache, batched augmentation, batches."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import DataError
from .augment import BatchTransform, channel_stats, pil_transform, store_size
from .datasets import Split, balanced_indices, load_split, typical_image_size
from .folder import channel_histogram, fit_square, load_rgb, sample_histogram
from .loader import Batches, mix_seed

__all__ = ["BatchTransform", "Batches", "DataBundle", "DataError", "Split", "balanced_indices", "channel_stats",
           "fit_square", "load_data", "load_rgb", "load_split", "match_classes", "mix_seed", "pil_transform",
           "store_size", "typical_image_size"]


@dataclass
class DataBundle:
    """The splits of one run and what the model must remember about them."""

    train: Split
    val: Split | None
    test: Split
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def match_classes(split: Split, classes: list[str]) -> Split:
    """Relabel ``split`` to the index of each of its class *names* in ``classes`` (never by folder position)."""
    unknown = [c for c in split.classes if c not in classes]
    if unknown:
        raise DataError(f"classes {unknown} are not among the model's classes {classes}")
    index = torch.tensor([classes.index(c) for c in split.classes])
    return replace(split, labels=index[split.labels], classes=list(classes))


def load_data(data: str, *, augment: str, input_size: int, data_dir: str | None = None, loader: str = "auto",
              train_samples: int | None = None, test_samples: int | None = None, val_split: int = 0,
              seed: int = 0, strict: bool = False) -> DataBundle:
    """Load the train, validation and test splits of ``data`` for an augmentation preset.

    The test (and validation) classes are matched to the training classes by name. Normalisation is 0.5/0.5 for
    the seed preset (as the seed), else the per-channel statistics of the training images.
    """
    size = store_size(augment, input_size)
    kw = dict(store_size=size, data_dir=data_dir, loader=loader, strict=strict)
    train = load_split(data, "train", **kw)
    classes = train.classes
    test = match_classes(load_split(data, "test", **kw), classes)
    val = None
    if val_split:
        held = balanced_indices(train.labels, val_split, seed=mix_seed(seed, 1))
        keep = torch.ones(len(train), dtype=torch.bool)
        keep[held] = False
        val, train = train.subset(held), train.subset(keep.nonzero().squeeze(1))
    elif data not in ("cifar10", "digits"):
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
    return DataBundle(train, val, test, classes, mean, std)


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
