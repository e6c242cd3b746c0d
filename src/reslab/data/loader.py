"""Batches for training and evaluation.

Every batch is a pure function of (seed, epoch, batch index): the epoch's order comes from a generator seeded with
(seed, epoch) and each batch's augmentation from one seeded with (seed, epoch, index). So a resumed run draws
exactly the batches an uninterrupted one would, with no generator state to save.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..core.errors import ConfigError, DataError
from .augment import BatchTransform, pil_transform, store_size
from .datasets import Split
from .folder import load_rgb


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), so nearby inputs give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class Batches:
    """Shuffled (or ordered) batches of a split, as normalised float tensors on ``device``.

    Uses the in-memory images when the split has them (whole-batch augmentation on the device), else streams
    files through a DataLoader with the per-image PIL transforms.
    """

    def __init__(self, split: Split, transform: BatchTransform, batch_size: int, *, shuffle: bool, drop_last: bool,
                 seed: int, device: torch.device, workers: int = 2, rank: int = 0, world: int = 1,
                 alternate_flips: bool = False) -> None:
        if batch_size % world:
            raise ConfigError(f"the global batch size {batch_size} must be divisible by the {world} processes")
        self.split, self.transform, self.batch_size = split, transform, batch_size
        self.rank, self.world, self.local = rank, world, batch_size // world
        self.shuffle, self.drop_last, self.seed, self.device, self.workers = shuffle, drop_last, seed, device, workers
        if len(split) == 0:
            raise DataError("empty split: no images to make batches of")
        if drop_last and len(split) < batch_size:
            raise ConfigError(f"--batch-size {batch_size} is larger than the {len(split)} training images")
        self.pixels = split.pixels  # gathers images by position (rows of a memory map stay on disk until read)
        if split.images is not None and device.type == "cuda" and not split.mapped:
            on_gpu = split.images.to(device)  # CIFAR-10 is 150 MB as uint8: keep it on the GPU
            self.pixels = lambda idx: on_gpu[idx] if split.rows is None else on_gpu[split.rows.to(device)[idx]]
        self.labels = split.labels.to(device)
        # Alternating flips (Jordan 2024, airbench): a random half of the images is flipped in even epochs, the other
        # half in odd ones, so every image is seen both ways in any two consecutive epochs; random flips repeat
        # a view half the time, which costs accuracy when a run lasts only a few epochs.
        self.first_flips = (torch.rand(len(split), generator=torch.Generator().manual_seed(mix_seed(seed, 0xF11B)))
                            < 0.5) if alternate_flips else None

    def __len__(self) -> int:
        n = len(self.split) / self.batch_size
        return math.floor(n) if self.drop_last else math.ceil(n)

    def order(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(len(self.split))
        return torch.randperm(len(self.split), generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)))

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches ``start, start+1, ...`` of ``epoch`` as (images, labels) on the device."""
        order = self.order(epoch)
        if self.split.images is None:
            yield from self._stream(epoch, order, start)
            return
        for i in range(start, len(self)):
            idx = self._mine(order[i * self.batch_size:(i + 1) * self.batch_size])
            # Under torchrun each rank augments its own slice of the global batch with its own stream.
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, i, *((self.rank,) if self.world > 1 else ())))
            x = self.pixels(idx).to(self.device, non_blocking=True)
            flip = None if self.first_flips is None else self.first_flips[idx] ^ bool(epoch % 2)
            yield self.transform(x, g, flip), self.labels[idx.to(self.device)]

    def _mine(self, batch: Tensor) -> Tensor:
        """This rank's contiguous slice of a global batch (all of it in a single process)."""
        return batch if self.world == 1 else batch[self.rank * self.local:(self.rank + 1) * self.local]

    def _stream(self, epoch: int, order: Tensor, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        t = self.transform
        ds = _FileDataset(self.split, pil_transform(t.augment, t.train, t.input_size, t.mean, t.std, t.auto_augment,
                                                    t.erasing), min_side=store_size(t.augment, t.input_size))
        indices = [j for i in range(start, len(self))
                   for j in self._mine(order[i * self.batch_size:(i + 1) * self.batch_size]).tolist()]
        # Augmentation seeds follow (seed, epoch, start): exact data order on resume, not the exact same draws.
        loader = DataLoader(ds, batch_size=self.local, sampler=indices, num_workers=self.workers,
                            generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch, start, self.rank)),
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def endless(batches: Batches | Any) -> Iterator:
    """Batches without end: epoch after epoch of a ``Batches`` (each epoch its own order), or any re-iterable."""
    epoch = 0
    while True:
        yield from batches.epoch(epoch) if hasattr(batches, "epoch") else batches
        epoch += 1


def eval_batches(split: Split, augment: str | None, input_size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], batch_size: int, device: torch.device, workers: int = 2) -> Batches:
    """``split`` as evaluation sees it: every image once, in order, resized and normalised without augmentation
    (training's evaluations, ``reslab eval`` and ``reslab bench`` all read it this way)."""
    return Batches(split, BatchTransform(augment, False, input_size, mean, std), batch_size, shuffle=False,
                   drop_last=False, seed=0, device=device, workers=workers)


class _FileDataset(Dataset):
    """Image files through PIL transforms; JPEGs decoded at a reduced scale when ``min_side`` pixels suffice."""

    def __init__(self, split: Split, transform, min_side: int | None = None) -> None:
        self.paths, self.labels, self.transform, self.min_side = split.paths, split.labels, transform, min_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(load_rgb(self.paths[i], self.min_side)), self.labels[i]
