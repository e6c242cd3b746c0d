"""One folder of class folders (``photos/cat/*.jpg``, ``photos/dog/*.jpg``: what torchvision's ``ImageFolder``, Keras'
``validation_split`` and fastai's ``valid_pct`` take) split into training and test images for the user.

The split is stratified (each class loses the same fraction) and seeded with a fixed seed, not the run's ``--seed``, so
every run of one folder (a comparison's included) holds out the same images. Exact and near duplicates (the audit's
hash groups: a photo re-saved, resized or shot in a burst) go to one side as a unit, so no copy of a test image is
trained on. The held-out files are recorded in the run (``split.json``: names and a digest), and ``reslab eval RUN
--data FOLDER`` scores exactly them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.errors import DataError
from ..core.rundir import SPLIT_FILE
from .duplicates import duplicate_groups
from .folder import decode_images
from .labels import listing, read_labels

SPLIT_FOLDERS = {"train", "test", "val", "valid", "validation"}  # a folder holding one of these is already split
SPLIT_SEED = 0  # fixed: the same folder gives the same split whatever the run's --seed


@dataclass
class FolderSplit:
    """Which images of a one-folder dataset are held out for testing."""

    root: str
    fraction: float
    test: list[str]  # paths relative to root, with "/" separators
    images: int
    groups_kept: int  # duplicate groups assigned to one side as a unit
    digest: str  # sha256 over the sorted held-out paths
    labels: str | None = None  # the labels file the images and classes came from, if any

    def holds_out(self, path: str, root: str | Path) -> bool:
        """Whether ``path`` (a file under ``root``, the folder as spelled now) is a held-out image."""
        return _relative(path, str(root)) in self._test

    def __post_init__(self) -> None:
        self._test = frozenset(self.test)

    def line(self) -> str:
        why = (f"{self.labels} assigns no image to test" if self.labels else
               f"{self.root} has no train/ and test/ folders")
        return (f"{why}: {len(self.test)} of its {self.images} images "
                f"({self.fraction:.0%} of each class, seed {SPLIT_SEED}) are held out as the test set, never trained "
                f"on; {self.groups_kept} groups of duplicate images kept on one side; the list is in the run's "
                f"{SPLIT_FILE} (reslab eval RUN --data {self.root} scores exactly these)")


def is_flat(data: str) -> bool:
    """Whether ``data`` is one folder of class folders (no ``train/``, ``test/`` or ``val/`` split folder)."""
    root = Path(data)
    if not root.is_dir():
        return False
    folders = {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    return bool(folders) and not folders & SPLIT_FOLDERS


def needs_split(data: str, labels: str | None = None) -> bool:
    """Whether the test images of ``data`` are ones reslab holds out: one folder of class folders, or a labels file
    that assigns no image to ``test``."""
    if labels is not None:
        return not read_labels(data, labels).has("test")
    return is_flat(data)


def _relative(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def split_folder(root: str, fraction: float, labels: str | None = None) -> FolderSplit:
    """Hold out ``fraction`` of each class of ``root`` (its class folders, or the training rows of ``labels``),
    keeping duplicate groups together (decodes every image at 32x32 once, through the decode cache, to find them)."""
    paths, names, classes = listing(root, labels)
    decoded = decode_images(paths, 32)
    kept = decoded.kept.tolist()
    groups = [[kept[i] for i in g] for g in duplicate_groups(torch.from_numpy(decoded.images))]
    test = hold_out([classes.index(n) for n in names], groups, fraction)
    files = sorted(_relative(paths[i], root) for i in test)
    return FolderSplit(str(root), fraction, files, len(paths), len(groups), _digest(files), labels)


def hold_out(labels: list[int], groups: list[list[int]], fraction: float, seed: int = SPLIT_SEED) -> list[int]:
    """Indices to hold out: per class, whole units (a duplicate group, else one image; a group counts for its
    most common class) in a seeded order until the class's share reaches ``fraction``; at least one image of a class
    with two or more stays on each side."""
    grouped = {i for g in groups for i in g}
    units = list(groups) + [[i] for i in range(len(labels)) if i not in grouped]
    by_class: dict[int, list[list[int]]] = {}
    for u in units:
        by_class.setdefault(int(np.bincount([labels[i] for i in u]).argmax()), []).append(u)
    rng = np.random.default_rng(seed)
    held = []
    for c in sorted(by_class):
        class_units = by_class[c]
        total = sum(len(u) for u in class_units)
        want = min(total - 1, max(1, round(fraction * total))) if total > 1 else 0
        taken = 0
        for k in rng.permutation(len(class_units)):
            if taken >= want:
                break
            if taken + len(class_units[k]) > want and taken > 0:
                continue  # a large group would overshoot: leave it in training
            held += class_units[k]
            taken += len(class_units[k])
    return sorted(held)


def _digest(files: list[str]) -> str:
    return hashlib.sha256("\n".join(files).encode()).hexdigest()[:16]


def split_json(split: FolderSplit) -> bytes:
    """What ``RUN/split.json`` holds (written atomically by the run, read back by ``read_split``)."""
    return json.dumps(asdict(split), indent=1).encode()


def read_split(run: str | Path) -> FolderSplit | None:
    """The split a run recorded (None when it holds none); refused when edited (its digest no longer matches)."""
    path = Path(run) / SPLIT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        split = FolderSplit(**record)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path} is not a split reslab wrote: {exc}") from None
    if _digest(sorted(split.test)) != split.digest:
        raise DataError(f"{path} was edited: its list of held-out images no longer matches its digest")
    return split
