"""``reslab eval --gallery OUT``: where a model errs, in pictures (after fastai's ``ClassificationInterpretation``:
top losses, most confused).

Three PNGs and one JSON of the same rows: ``mistakes.png``, the most confident mistakes (image, true class,
predicted class and its probability); ``confused.png``, the most-confused class pairs (true -> predicted, how often)
with their most confident examples; ``per_class.png``, precision, recall and F1 of every class; ``gallery.json``.
Images are shown as stored (the evaluated pixels before normalisation), files named by their paths where known.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import DataError
from ..data import Split, load_rgb
from ..inference.evaluate import EvalResult, class_metrics, evaluate_split

PAIRS = 6  # class pairs shown
PER_PAIR = 6  # examples per pair
THUMB = 96  # pixels of the longer side of a file's thumbnail


@dataclass
class Gallery:
    """What ``gallery`` drew, as rows."""

    result: EvalResult
    mistakes: list[dict[str, Any]]
    pairs: list[dict[str, Any]]
    per_class: list[dict[str, Any]]
    files: list[str] = field(default_factory=list)


def image_name(split: Split, i: int) -> str:
    """How the ``i``-th image is named to the user: its file, else its position in the split."""
    return split.paths[i] if split.paths else f"#{i}"


def thumbnail(split: Split, i: int) -> np.ndarray:
    """The ``i``-th image as uint8 (H, W, 3): the stored pixels, or the file shrunk to ``THUMB`` px."""
    if split.images is not None:
        return split.pixels(torch.tensor([i]))[0].numpy()
    im = load_rgb(split.paths[i])
    im.thumbnail((THUMB, THUMB))
    return np.asarray(im)


def _mistake_rows(split: Split, probs: torch.Tensor, classes: list[str]) -> list[dict[str, Any]]:
    """Every mistake, the most confident first."""
    labels = split.labels
    conf, pred = probs.max(1)
    wrong = (pred != labels).nonzero().flatten()
    order = wrong[conf[wrong].argsort(descending=True, stable=True)].tolist()
    return [{"index": i, "image": image_name(split, i), "true": classes[labels[i]], "predicted": classes[pred[i]],
             "probability": round(conf[i].item(), 4), "true_probability": round(probs[i, labels[i]].item(), 4)}
            for i in order]


def _pair_rows(confusion: list[list[int]], classes: list[str], mistakes: list[dict[str, Any]]) -> list[dict]:
    """The most-confused (true, predicted) pairs, each with its most confident examples."""
    cells = sorted(((n, t, p) for t, row in enumerate(confusion) for p, n in enumerate(row) if t != p and n),
                   key=lambda c: (-c[0], c[1], c[2]))[:PAIRS]
    pairs = []
    for n, t, p in cells:
        examples = [m for m in mistakes if m["true"] == classes[t] and m["predicted"] == classes[p]][:PER_PAIR]
        support = sum(confusion[t])
        pairs.append({"true": classes[t], "predicted": classes[p], "count": n, "share_of_true": round(n / support, 4),
                      "examples": [m["image"] for m in examples], "_rows": examples})
    return pairs


def gallery(model: str | Path, data: str, out: str | Path, *, size: int = 24, **evaluate_kwargs: Any) -> Gallery:
    """Evaluate ``model`` on ``data`` and draw its mistakes into the folder ``out`` (see the module's docstring)."""
    from .plots import plot_class_metrics, plot_image_grid

    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"--gallery {folder} is a file; the gallery is a folder of PNGs and a JSON")
    if size < 1:
        raise DataError(f"--gallery-size must be at least 1, got {size}")
    scores = evaluate_split(model, data, **evaluate_kwargs)
    r, split = scores.result, scores.split
    mistakes = _mistake_rows(split, scores.probs, r.classes)
    pairs = _pair_rows(r.confusion, r.classes, mistakes)
    per_class = class_metrics(r.confusion, r.classes)
    folder.mkdir(parents=True, exist_ok=True)
    shown = mistakes[:size]
    files = [plot_image_grid([(thumbnail(split, m["index"]), f"{m['true']} -> {m['predicted']}\n{m['probability']:.2f}")
                              for m in shown], folder / "mistakes.png",
                             f"the {len(shown)} most confident of {len(mistakes)} mistakes (true -> predicted, "
                             f"probability)" if mistakes else "no mistakes on these images")]
    tiles = []  # one row per pair, padded with blanks
    for pair in pairs:
        row = [(thumbnail(split, m["index"]), f"{m['true']} -> {m['predicted']}\n{m['probability']:.2f}")
               for m in pair["_rows"]]
        tiles += row + [None] * (PER_PAIR - len(row))
    files.append(plot_image_grid(tiles, folder / "confused.png", "most-confused pairs: " + "; ".join(
        f"{p['true']} -> {p['predicted']} x{p['count']}" for p in pairs[:3]) if pairs else "no confused pairs",
        columns=PER_PAIR))
    files.append(plot_class_metrics(per_class, folder / "per_class.png"))
    for p in pairs:
        del p["_rows"]
    rows = Gallery(r, mistakes, pairs, per_class, [str(f) for f in files] + [str(folder / "gallery.json")])
    report = {k: v for k, v in asdict(rows).items() if k != "result"}
    report["accuracy"], report["n"], report["classes"] = r.accuracy, r.n, r.classes
    (folder / "gallery.json").write_text(json.dumps(report, indent=1))
    return rows
