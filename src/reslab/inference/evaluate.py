"""Evaluation on an image folder (or CIFAR-10, digits) and prediction on image files.

Classes are matched by *name* between the model and the data: a test folder holding some of the classes, in any
order, is scored correctly (the seed matched by folder index, which silently mislabels such folders).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.distributed import all_sum
from ..core.errors import ConfigError
from ..core.execution import autocast, prepare
from ..core.log import say
from ..core.rundir import SPLIT_FILE, read_config
from ..data import (
    Batches,
    DataError,
    FolderSplit,
    Split,
    balanced_indices,
    eval_batches,
    load_split,
    match_classes,
    needs_split,
    read_split,
    store_size,
)
from ..models.checkpoint import load_model

TTA_VIEWS = {"none": 1, "flip": 2, "flip_shift": 6}


def tta_logits(model: nn.Module, x: Tensor, tta: str = "none", fraction: float = 1.0) -> Tensor:
    """Logits averaged over test-time views: ``flip`` adds the mirror image; ``flip_shift`` also averages both
    flips of the image shifted by one pixel up-left and down-right (reflection padding), weighted as one view.

    ``fraction`` < 1 applies the views only to that fraction of the batch whose plain prediction is least confident
    (lowest top softmax probability); the others keep the plain view's logits. A public CIFAR-10 speedrun after
    airbench94 augmented only the 20 % least-confident test images: confident predictions rarely change.
    """
    if tta not in TTA_VIEWS:
        raise ConfigError(f"tta must be one of {', '.join(TTA_VIEWS)}, got {tta!r}")
    if not 0 < fraction <= 1:
        raise ConfigError(f"the TTA fraction must lie in (0, 1], got {fraction}")
    logits = model(x)
    if tta == "none":
        return logits
    if fraction < 1:
        k = max(1, math.ceil(fraction * len(x)))
        unsure = logits.float().softmax(1).amax(1).topk(k, largest=False).indices
        out = logits.clone()
        out[unsure] = _views(model, x[unsure], tta, logits[unsure]).to(out.dtype)
        return out
    return _views(model, x, tta, logits)


def _views(model: nn.Module, x: Tensor, tta: str, logits: Tensor) -> Tensor:
    """The TTA average of ``x`` (whose plain logits are ``logits``)."""
    logits = 0.5 * (logits + model(x.flip(-1)))
    if tta == "flip":
        return logits
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[..., :h, :w], padded[..., 2:, 2:]]
    shifted_logits = sum(0.5 * (model(s) + model(s.flip(-1))) for s in shifted) / len(shifted)
    return 0.5 * logits + 0.5 * shifted_logits


def tta_cost(tta: str, fraction: float = 1.0) -> float:
    """Forward passes per image of an evaluation with ``tta`` applied to ``fraction`` of the images."""
    return 1 + (TTA_VIEWS[tta] - 1) * fraction


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Batches, device: torch.device, precision: str) -> None:
    """Recompute every BatchNorm's running statistics as the plain average over ``batches`` (train-mode forward
    passes, no gradients, weights untouched)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average, not an exponential one
    model.train()
    for x, _ in batches.epoch(0):
        with autocast(device, precision):
            model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


@dataclass
class Scores:
    """Mean loss, top-1/top-5 accuracy and the confusion matrix (rows: true class, columns: predicted)."""

    loss: float
    accuracy: float
    top5: float | None
    n: int
    confusion: Tensor
    probs: Tensor | None = None  # (n, classes) softmax of every image, in order (with ``probabilities=True``)


@dataclass
class EvalResult:
    """What ``evaluate`` reports about a model on one split."""

    accuracy: float  # 0-1
    top5: float | None  # None with fewer than 5 classes
    n: int
    loss: float
    per_class: dict[str, float]  # class name -> accuracy, for the classes present in the split
    confusion: list[list[int]]  # rows: true class, columns: predicted, over the model's classes
    classes: list[str]
    images_per_sec: float


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Batches, device: torch.device, precision: str,
                     num_classes: int, tta: str = "none", tta_fraction: float = 1.0,
                     probabilities: bool = False) -> Scores:
    """Mean loss, top-1/top-5 accuracy and the confusion matrix of ``model`` on ``batches`` (and, with
    ``probabilities``, every image's class probabilities, this process's shard only).

    Under torchrun each rank scores its own shard and the sums are added over ranks: exact, nothing padded.
    """
    kept = []
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct5 = torch.zeros((), dtype=torch.long, device=device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    for x, y in batches.epoch(0):
        with autocast(device, precision):
            logits = tta_logits(model, x, tta, tta_fraction)
        logits = logits.float()
        if probabilities:
            kept.append(logits.softmax(1).cpu())
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        pred = logits.argmax(1)
        correct5 += (logits.topk(min(5, num_classes), 1).indices == y[:, None]).any(1).sum()
        confusion += torch.bincount(y * num_classes + pred, minlength=num_classes**2).view(num_classes, -1)
    loss_sum, correct5, confusion = all_sum(loss_sum, correct5, confusion)
    n = confusion.sum().item()
    return Scores(loss_sum.item() / n, confusion.trace().item() / n,
                  correct5.item() / n if num_classes >= 5 else None, n, confusion.cpu(),
                  torch.cat(kept) if probabilities else None)


def _load(model: str | Path | nn.Module, arch: str | None, device: torch.device):
    if isinstance(model, nn.Module):
        raise TypeError("pass a model file or run directory (its metadata says how to feed it)")
    return load_model(model, arch=arch, device=device)


@dataclass
class SplitScores:
    """An evaluation with what it was made on: the report, the images (matched to the model's classes) and every
    image's class probabilities, for the tools that look at single images (``reslab eval --gallery``)."""

    result: EvalResult
    split: Split
    probs: Tensor


def evaluate(model: str | Path, data: str, *, split: str = "test", arch: str | None = None, device: str = "auto",
             precision: str = "auto", batch_size: int = 256, samples: int | None = None,
             data_dir: str | None = None, tta: str | None = None, tta_fraction: float | None = None,
             labels: str | None = None) -> EvalResult:
    """Accuracy of a saved model on a split of ``data``.

    Args:
        model: run directory, ``model.safetensors``, ``last.pt`` or a bare state_dict (with ``arch``).
        data: ``cifar10``, ``digits`` or an image folder holding ``split/<class>/...``.
        split: ``test``, ``val`` or ``train``.
        arch: architecture of a bare state_dict.
        samples: evaluate a seeded class-balanced subset of this many images.
        tta: test-time augmentation ``none``, ``flip`` or ``flip_shift`` (default: what the model was trained with).
        tta_fraction: apply ``tta`` to this least-confident fraction of the images only (default: as trained).
        labels: a CSV or TSV of the images' classes (default: the run's own, when ``data`` is the folder it
            trained on).

    Returns:
        Accuracy, top-5, loss, per-class accuracy and the confusion matrix.
    """
    return evaluate_split(model, data, split=split, arch=arch, device=device, precision=precision,
                          batch_size=batch_size, samples=samples, data_dir=data_dir, tta=tta,
                          tta_fraction=tta_fraction, labels=labels).result


def evaluate_split(model: str | Path, data: str, *, split: str = "test", arch: str | None = None,
                   device: str = "auto", precision: str = "auto", batch_size: int = 256, samples: int | None = None,
                   data_dir: str | None = None, tta: str | None = None,
                   tta_fraction: float | None = None, labels: str | None = None) -> SplitScores:
    """``evaluate``, keeping the split and every image's probabilities."""
    if batch_size < 1 or (samples is not None and samples < 1):
        raise ConfigError(f"--batch-size and --samples must be at least 1, got {batch_size} and {samples}")
    if tta_fraction is not None and not 0 < tta_fraction <= 1:
        raise ConfigError(f"--tta-fraction is a fraction in (0, 1], got {tta_fraction}")
    dev, prec = prepare(device, precision)
    net, meta = _load(model, arch, dev)
    holdout, labels = recorded_data(model, data, labels)
    s, batches = model_batches(meta, data, split, batch_size, dev, samples=samples, data_dir=data_dir,
                               holdout=holdout, labels=labels)
    classes = s.classes
    t0 = time.perf_counter()
    if tta_fraction is None:  # the trained fraction goes with the trained TTA, not with one asked for here
        tta_fraction = (meta.get("tta_fraction") or 1.0) if tta is None else 1.0
    r = evaluate_batches(net, batches, dev, prec, len(classes), tta or meta.get("tta") or "none",
                         tta_fraction, probabilities=True)
    seconds = time.perf_counter() - t0
    conf = r.confusion
    present = sorted(set(s.labels.tolist()))
    per_class = {classes[c]: conf[c, c].item() / conf[c].sum().item() for c in present}
    result = EvalResult(r.accuracy, r.top5, r.n, r.loss, per_class, conf.tolist(), classes,
                        round(r.n / seconds, 1))
    return SplitScores(result, s, r.probs)


def recorded_data(model: str | Path, data: str, labels: str | None = None) -> tuple[FolderSplit | None, str | None]:
    """The held-out split and labels file a run recorded for ``data``: for the folder it trained on, the labels file
    of its config (unless ``labels`` is given), and for one folder of class folders or a labels file without test
    rows, the images it held out (its test split). (None, labels) for any other data."""
    run = Path(model) if Path(model).is_dir() else Path(model).parent
    if labels is None and data not in ("cifar10", "digits"):
        config = read_config(run)  # None when the model is not in a run directory
        trained = (config or {}).get("data")
        if config and config.get("labels") and trained and Path(trained).resolve() == Path(data).resolve():
            labels = config["labels"]
    if data in ("cifar10", "digits") or not Path(data).is_dir() or not needs_split(data, labels):
        return None, labels
    holdout = read_split(run)
    if holdout is None:
        what = f"--labels {labels} assigns no image to test" if labels else f"{data} is one folder of class folders"
        raise DataError(f"{what}, and {run} records no split of it ({SPLIT_FILE}): evaluate the run that trained on "
                        f"it, or give a folder with test/")
    return holdout, labels


def model_batches(meta: dict[str, Any], data: str, split: str, batch_size: int, device: torch.device, *,
                  samples: int | None = None, data_dir: str | None = None,
                  holdout: FolderSplit | None = None, labels: str | None = None) -> tuple[Split, Batches]:
    """A split of ``data`` as a model with metadata ``meta`` is evaluated on it: its classes matched by name to the
    model's, resized and normalised as the model was trained (optionally a seeded class-balanced subset of
    ``samples`` images). What ``eval``, int8 calibration and the accuracy check of an export all read."""
    classes = meta["classes"]
    input_size = meta.get("input_size") or 32
    s = load_split(data, split, store_size=store_size(meta["augment"], input_size), data_dir=data_dir,
                   holdout=holdout, labels=labels)
    if not meta["recorded_classes"]:
        # A bare state_dict knows no class names: assume the folder's sorted class order, and say so.
        if len(s.classes) != len(classes):
            raise DataError(f"the model has {len(classes)} outputs but {data} has {len(s.classes)} classes; "
                            "a bare state_dict records no class names, so they cannot be matched")
        say("warning: the model file records no class names; assuming the folder's sorted class order")
        classes = s.classes
    s = match_classes(s, classes)
    if samples:
        s = s.subset(balanced_indices(s.labels, samples, seed=0))
    return s, eval_batches(s, meta["augment"], input_size, tuple(meta["mean"]), tuple(meta["std"]), batch_size,
                           device)


def class_metrics(confusion: list[list[int]], classes: list[str]) -> list[dict[str, Any]]:
    """Per-class precision, recall, F1 and support from a confusion matrix (rows: true, columns: predicted); a
    class never predicted has precision ``None`` (undefined), one absent from the data is left out."""
    rows = []
    for c, name in enumerate(classes):
        support = sum(confusion[c])
        if support == 0:
            continue
        predicted = sum(row[c] for row in confusion)
        hit = confusion[c][c]
        precision = hit / predicted if predicted else None
        recall = hit / support
        f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
        rows.append({"class": name, "precision": precision, "recall": recall, "f1": f1, "support": support})
    return rows
