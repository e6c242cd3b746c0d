"""Pretrained weights for ``--pretrained``: torchvision's ImageNet weights, other tools' files, reslab runs.

Everything but the classifier must load; the classifier (``fc``) is kept when the classes are the same ones, by name,
and replaced by a new head otherwise. Pretrained weights must be fed images normalised the way they were trained, so
the source's mean and std travel with them into the run and its model file.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.errors import ModelError, UserError
from .checkpoint import read_weights, resolve_model_path

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HEAD = ("fc.weight", "fc.bias")
DOWNLOAD_TIMEOUT = 20  # seconds without an answer before a download counts as offline


@dataclass
class Pretrained:
    """Weights from somewhere, and what they say about how to use them."""

    state: dict[str, torch.Tensor]
    source: str  # e.g. "torchvision resnet18 IMAGENET1K_V1"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] | None  # the classifier's class names, when the source records them


def load_pretrained(source: str, arch: str) -> Pretrained:
    """Read ``source``: ``torchvision``, a weights file, or a reslab run directory."""
    if source == "torchvision":
        return _torchvision(arch)
    path = Path(source)
    if not path.exists():
        raise UserError(f"--pretrained {source!r}: not 'torchvision', a weights file or a run directory")
    path = resolve_model_path(path)
    state, meta = read_weights(path)
    if meta.get("mean"):  # a reslab file records its normalisation; others were trained the ImageNet way
        return Pretrained(state, str(path), tuple(meta["mean"]), tuple(meta["std"]), meta.get("classes"))
    return Pretrained(state, str(path), IMAGENET_MEAN, IMAGENET_STD, None)


def _torchvision(arch: str) -> Pretrained:
    from torchvision.models import get_model_weights

    try:
        weights = get_model_weights(arch).DEFAULT
    except (ValueError, KeyError):
        raise UserError(f"torchvision has no pretrained weights for {arch!r} (it has resnet18, resnet34, resnet50, "
                        f"resnet101, resnet152)") from None
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not file.is_file():
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
        try:
            torch.hub.load_state_dict_from_url(weights.url, progress=sys.stderr.isatty(), check_hash=True)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad hash is a RuntimeError
            raise UserError(f"could not download torchvision's {arch} weights ({type(exc).__name__}); offline, put "
                            f"{weights.url} at {file}") from None
        finally:
            socket.setdefaulttimeout(old)
    return Pretrained(read_weights(file)[0], f"torchvision {arch} {weights.name}", IMAGENET_MEAN, IMAGENET_STD,
                      list(weights.meta.get("categories") or []) or None)


def _strip_common_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop a leading ``name.`` shared by every key (a Lightning module's ``model.``) when that makes keys match."""
    while state and not (set(state) & expected):
        heads = {k.split(".", 1)[0] for k in state}
        if len(heads) != 1 or not all("." in k for k in state):
            break
        state = {k.split(".", 1)[1]: v for k, v in state.items()}
    return state


def apply_pretrained(model: nn.Module, pre: Pretrained, classes: list[str]) -> str:
    """Load ``pre`` into ``model`` (built for ``classes``); returns the line that says what happened.

    Raises ``ModelError`` naming the first tensors that are missing or differ in shape, outside the classifier.
    """
    target = model.state_dict()
    state = _strip_common_prefix(pre.state, set(target))
    same_classes = pre.classes is not None and list(pre.classes) == list(classes)
    fits = lambda k: k in state and state[k].shape == target[k].shape
    keep_head = all(fits(k) for k in HEAD if k in target) and (same_classes or pre.classes is None)
    # BatchNorm's step counters are absent from older files (torchvision's own) and unused in training.
    missing = [k for k in target if k not in HEAD and k not in state and not k.endswith("num_batches_tracked")]
    differ = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in target
              if k not in HEAD and k in state and state[k].shape != target[k].shape]
    if missing or differ:
        raise ModelError(f"{pre.source} does not fit this {type(model).__name__}: "
                         + "; ".join(filter(None, [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})"
                                                   if missing else "",
                                                   f"shapes differ: {', '.join(differ[:3])}" if differ else ""])))
    load = {k: v for k, v in state.items() if k in target and (keep_head or k not in HEAD)}
    model.load_state_dict(load, strict=False)
    head = "classifier kept" if keep_head else f"new head for {len(classes)} classes"
    return f"loaded {len(load)} of {len(target)} tensors from {pre.source}; {head}"
