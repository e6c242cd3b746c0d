"""``reslab audit DATA``: the classic mistakes of an image folder, found before (or after) training.

Checked: files that do not decode, odd modes, EXIF orientations (reslab applies them), images far off the folder's
typical size; class counts, imbalance, near-empty and missing classes; exact and near-duplicate images within a
split and across splits (train/test leakage); and, with predicted probabilities that did not see the image
(``--folds K`` trains K reslab models on the other folds; ``--run RUN`` uses a trained model, out of sample on the
test split only), likely mislabeled images by confident learning (Northcutt et al. 2021, through cleanlab).

Near-duplicates: two images whose 64-bit difference hashes (dHash of the 9x8 grayscale image) differ in at most
``HASH_BITS`` bits *and* whose 32x32 pixels differ by at most ``PIXEL_MAD`` on average (0-1 scale); exact: identical
32x32 pixels. The audit never moves, renames or deletes a file: each finding says what to do and names the files.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..config.schema import TrainConfig
from ..core.errors import DataError, UserError, first_line
from ..core.log import say
from ..core.progress import CountProgress
from ..data import Split, load_split
from ..data.datasets import folder_split_dir
from ..data.duplicates import HASH_BITS, PIXEL_MAD, dhash, near_pairs
from ..data.folder import EXIF_ORIENTATION, TooManyPixels, check_pixels, list_images
from ..data.labels import listing, read_labels
from ..data.split import FolderSplit, needs_split, read_split, split_folder

SIZE_FACTOR = 4  # an image whose shorter side is this many times off the folder's median is flagged
NEAR_EMPTY = 10  # a class with fewer training images than this (or than 5 % of the median class) is near-empty
IMBALANCE = 3.0  # largest class over smallest above this: imbalance worth acting on


@dataclass
class Finding:
    """One problem of the folder, with what to do about it and the files it concerns."""

    kind: str
    severity: str  # error, warning or info
    message: str
    advice: str
    files: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class AuditReport:
    """Everything the audit found (``findings``), and the counts it was made from."""

    data: str
    splits: dict[str, int]
    counts: dict[str, dict[str, int]]  # split -> class -> images
    findings: list[Finding]
    thresholds: dict[str, Any]
    labels_checked: str  # how the label check was made, or why not


# --- files ----------------------------------------------------------------------------------------------------------

def _holdout(root: Path, run: str | Path | None, labels: str | None) -> FolderSplit | None:
    """One folder of class folders (or a labels file without test rows) is audited as training splits it: the run's
    recorded split, else the split a new run would make (the default --test-split, duplicate groups on one side)."""
    if not needs_split(str(root), labels):
        return None
    recorded = read_split(Path(run) if Path(run).is_dir() else Path(run).parent) if run is not None else None
    return recorded or split_folder(str(root), TrainConfig.test_split, labels)


def _list_files(root: Path, holdout: FolderSplit | None = None,
                labels: str | None = None) -> tuple[dict[str, list[tuple[str, str]]], list[Finding]]:
    """split -> [(path, class)] of every file training would read (its own listing: image extensions, links
    followed once), and the findings of the listing itself: class folders without images, links leaving the
    folder."""
    out, empty, outside = {}, [], []
    real_root = os.path.realpath(root)
    table = read_labels(root, labels) if labels is not None else None
    if holdout is not None:
        paths, names, _ = listing(root, labels)
        out["train"] = [(p, c) for p, c in zip(paths, names) if not holdout.holds_out(p, root)]
        out["test"] = [(p, c) for p, c in zip(paths, names) if holdout.holds_out(p, root)]
    if table is not None:
        out.update({split: list(zip(*table.files(split))) for split in ("train", "val", "test")
                    if table.has(split) and (holdout is None or split == "val")})
    for split in ("train", "val", "test") if holdout is None and table is None else ():
        d = folder_split_dir(root, split)
        if d is None:
            continue
        rows = []
        for c in sorted(x.name for x in d.iterdir() if x.is_dir() and not x.name.startswith(".")):
            found = list_images(str(d / c))
            if not found:
                empty.append(f"{split}/{c}")
            rows += [(p, c) for p in found]
            outside += [p for p in found if not os.path.realpath(p).startswith(real_root + os.sep)]
        out[split] = rows
    if "train" not in out:
        raise DataError(f"{root} has no train/ folder (expected {root}/train/<class>/<images>)")
    findings = []
    if empty:
        findings.append(Finding("empty_class", "warning", f"{len(empty)} class folders hold no images: "
                                f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}",
                                "training ignores them (a class it cannot learn or score): add images, or remove "
                                "the folder", [str(root / e) for e in empty]))
    if outside:
        findings.append(Finding("outside_link", "warning", f"{len(outside)} files are reached through links that "
                                f"lead outside {root}", "training reads them as part of the folder: check that "
                                "they belong to it (a copy of the folder will not hold them)", outside,
                                {"targets": {p: os.path.realpath(p) for p in outside}}))
    return out, findings


def _file_findings(files: dict[str, list[tuple[str, str]]]) -> list[Finding]:
    """Unreadable files, odd modes, EXIF orientations and sizes far off the median (from the file headers)."""
    everything = [p for rows in files.values() for p, _ in rows]
    bad, modes, rotated, sizes, huge = [], {}, [], {}, []
    bar = CountProgress(len(everything), "audit: reading file headers")
    for i, path in enumerate(everything, 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    check_pixels(im)  # what every reader refuses, before any decode
                    im.verify()  # the whole file, not only the header (truncated files fail here)
            with Image.open(path) as im:
                sizes[path] = im.size
                if im.mode != "RGB":
                    modes.setdefault(im.mode, []).append(path)
                if im.getexif().get(EXIF_ORIENTATION, 1) != 1:
                    rotated.append(path)
        except (TooManyPixels, Image.DecompressionBombError) as exc:
            huge.append((path, first_line(exc)))
        except Exception as exc:  # any failure to decode is the finding
            bad.append((path, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
        bar.update(i)
    bar.done()
    findings = []
    if huge:
        findings.append(Finding("too_large", "error", f"{len(huge)} images are over the "
                                f"{Image.MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel limit: training, eval, predict and "
                                f"serve refuse them (a decompression bomb, or a scan far larger than needed)",
                                "downscale them (a few thousand pixels on the longer side is plenty) or remove them",
                                [p for p, _ in huge], {"errors": dict(huge)}))
    if bad:
        findings.append(Finding("unreadable", "error", f"{len(bad)} files do not decode as images",
                                "replace or remove them (training skips them with a warning; --strict stops)",
                                [p for p, _ in bad], {"errors": dict(bad)}))
    for mode, paths in sorted(modes.items()):
        findings.append(Finding("mode", "info", f"{len(paths)} images are {mode}, not RGB",
                                "nothing to do: reslab converts them to RGB (transparency on white, 16-bit scaled)",
                                paths))
    if rotated:
        findings.append(Finding("exif_rotation", "info", f"{len(rotated)} images carry an EXIF orientation tag",
                                "nothing to do: reslab turns them upright as it reads them (training, eval, predict "
                                "and serve alike); other tools (torchvision's ImageFolder) may not", rotated))
    if sizes:
        shorter = np.array([min(wh) for wh in sizes.values()])
        median = float(np.median(shorter))
        odd = [p for p, wh in sizes.items() if min(wh) * SIZE_FACTOR < median or min(wh) > median * SIZE_FACTOR]
        if odd:
            findings.append(Finding("odd_size", "warning", f"{len(odd)} images are over {SIZE_FACTOR}x off the "
                                    f"folder's median shorter side ({median:.0f} px)",
                                    "check them: thumbnails, icons or scans often do not belong to the class", odd,
                                    {"median_shorter_side": median, "sizes": {p: sizes[p] for p in odd}}))
    return findings


def _class_findings(counts: dict[str, dict[str, int]]) -> list[Finding]:
    """Near-empty classes, imbalance, and classes in one split but not another."""
    train = counts["train"]
    findings = []
    if len(train) < 2:
        findings.append(Finding("one_class", "error", f"train/ has {len(train)} class folder with images "
                                f"({', '.join(train) or 'none'})", "a classifier needs at least two classes: add a "
                                "folder of images per class under train/", details={"classes": sorted(train)}))
        return findings
    median = float(np.median(list(train.values())))
    small = {c: n for c, n in train.items() if n < NEAR_EMPTY or n < 0.05 * median}
    if small:
        findings.append(Finding("near_empty", "warning", f"{len(small)} classes have very few training images: "
                                + ", ".join(f"{c} ({n})" for c, n in small.items()),
                                "add images, merge the class into a neighbour, or drop it; with fine-tuning "
                                "(--pretrained) a few dozen per class is a workable minimum", details=small))
    ratio = max(train.values()) / max(1, min(train.values()))
    if ratio > IMBALANCE:
        findings.append(Finding("imbalance", "warning", f"the largest class has {ratio:.1f}x the images of the "
                                f"smallest ({max(train, key=train.get)} {max(train.values())}, "
                                f"{min(train, key=train.get)} {min(train.values())})",
                                "train with --balance loss (the loss weighted by inverse class frequency), or "
                                "collect more of the small classes", details={"ratio": ratio}))
    for split, seen in counts.items():
        if split == "train":
            continue
        missing, extra = sorted(set(train) - set(seen)), sorted(set(seen) - set(train))
        if missing:
            findings.append(Finding("missing_class", "warning", f"{split}/ has no images of {', '.join(missing)}",
                                    f"add {split} images of these classes, or their accuracy is never measured",
                                    details={"split": split, "classes": missing}))
        if extra:
            findings.append(Finding("unknown_class", "error", f"{split}/ has classes that train/ lacks: "
                                    f"{', '.join(extra)}", "a model cannot predict a class it never saw: add "
                                    "training images of them or remove the folders", details={"classes": extra}))
    return findings


# --- duplicates -----------------------------------------------------------------------------------------------------

def _pixels(split: Split, idx: list[int]) -> torch.Tensor:
    return split.pixels(torch.tensor(idx, dtype=torch.long)).float() / 255


def _duplicate_findings(splits: dict[str, Split]) -> list[Finding]:
    """Exact and near duplicates within train, within test, and across train and each other split."""
    hashes = {name: dhash(s.images) for name, s in splits.items()}
    findings = []
    checks = [("train", "train")] + [(o, o) for o in splits if o != "train"] + [("train", o) for o in splits
                                                                                   if o != "train"]
    for first, second in checks:
        pairs = near_pairs(hashes[first], hashes[second], same=first == second)
        if pairs:
            left, right = zip(*pairs)
            mad = (_pixels(splits[first], list(left)) - _pixels(splits[second], list(right))).abs().mean((1, 2, 3))
        exact, near = [], []
        for (i, j), d in zip(pairs, mad.tolist() if pairs else []):
            if d <= PIXEL_MAD:
                row = (_name(splits[first], i), _name(splits[second], j), round(d, 4))
                (exact if d == 0 else near).append(row)
        for kind, rows in (("exact", exact), ("near", near)):
            if rows:
                findings.append(_duplicate_finding(kind, first, second, rows, splits))
    return findings


def _name(split: Split, i: int) -> str:
    return split.paths[i] if split.paths else f"#{i}"


def _duplicate_finding(kind: str, first: str, second: str, rows: list[tuple], splits: dict[str, Split]) -> Finding:
    what = "identical" if kind == "exact" else "near-duplicate"
    classes = {p: splits[first].classes[lab] for p, lab in zip(splits[first].paths or [], splits[first].labels)}
    classes.update({p: splits[second].classes[lab] for p, lab in zip(splits[second].paths or [],
                                                                      splits[second].labels)})
    conflicting = [(a, b) for a, b, _ in rows if classes.get(a) != classes.get(b)]
    pairs = [{"a": a, "b": b, "pixel_difference": d, "classes": [classes.get(a), classes.get(b)]} for a, b, d in rows]
    files = sorted({p for a, b, _ in rows for p in (a, b)})
    if first != second:
        return Finding("leak", "error", f"{len(rows)} {first}/{second} image pairs are {what}: the {second} "
                       f"accuracy partly measures memory, not generalisation",
                       f"remove the {second} copy of each pair (or move it to {first}/)", files,
                       {"kind": kind, "pairs": pairs, "conflicting_labels": len(conflicting)})
    return Finding("duplicate", "warning", f"{len(rows)} image pairs within {first}/ are {what}"
                   + (f", {len(conflicting)} of them under different classes" if conflicting else ""),
                   "keep one of each pair (duplicates weigh those images more; a copy under another class "
                   "is a label error)", files, {"kind": kind, "pairs": pairs, "conflicting_labels": len(conflicting)})


# --- labels ---------------------------------------------------------------------------------------------------------

def _label_finding(split: Split, probs: np.ndarray, where: str, how: str,
                   scored: np.ndarray | None = None) -> Finding | None:
    """Likely label errors of ``split`` from out-of-sample probabilities (cleanlab's confident learning); only the
    images in ``scored`` (default: all) take part."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        raise UserError("the label check needs cleanlab: pip install 'reslab[audit]'") from None
    labels = split.labels.numpy()
    index = np.flatnonzero(scored) if scored is not None else np.arange(len(labels))
    present = np.unique(labels[index])  # cleanlab wants every class it is given to appear among the labels
    remap = {c: k for k, c in enumerate(present)}
    sub = probs[index][:, present]
    sub = sub / np.maximum(sub.sum(1, keepdims=True), 1e-12)
    issues = find_label_issues(np.array([remap[c] for c in labels[index]]), sub,
                               return_indices_ranked_by="self_confidence")
    ranked = index[issues]
    if len(ranked) == 0:
        return None
    rows = [{"file": _name(split, i), "label": split.classes[labels[i]],
             "suggested": split.classes[int(probs[i].argmax())], "label_probability": round(float(probs[i, labels[i]]),
                                                                                            4)} for i in ranked]
    return Finding("mislabeled", "warning", f"{len(rows)} {where} images are likely mislabeled ({how})",
                   "look at each (most likely first): move it to the suggested class folder if it belongs there, "
                   "or remove it if it fits no class", [r["file"] for r in rows], {"images": rows})


def _fold_probabilities(files: list[tuple[str, str]], classes: list[str], folds: int, epochs: float,
                        seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-sample probabilities of the training images: ``folds`` reslab runs (the fast preset), each trained on
    the other folds (symbolic links in a temporary folder; the user's files are never touched). Folds are drawn
    per class; an image whose class has no image in the other folds is not scored (the mask says which are)."""
    from ..inference.evaluate import evaluate_split
    from ..training.train import train

    rng = np.random.default_rng(seed)
    fold_of = np.zeros(len(files), dtype=int)
    for c in classes:  # stratified: each class spread over the folds
        members = [n for n, (_, name) in enumerate(files) if name == c]
        fold_of[rng.permutation(members)] = np.arange(len(members)) % folds
    probs = np.zeros((len(files), len(classes)), dtype=np.float32)
    scored = np.zeros(len(files), dtype=bool)
    with tempfile.TemporaryDirectory(prefix="reslab-audit-") as tmp:
        for k in range(folds):
            fold = Path(tmp) / f"fold{k}"
            trained = {c for n, (_, c) in enumerate(files) if fold_of[n] != k}
            for n, (path, c) in enumerate(files):
                split = "train" if fold_of[n] != k else "test" if c in trained else None
                if split:
                    (fold / split / c).mkdir(parents=True, exist_ok=True)
                    os.symlink(os.path.abspath(path), fold / split / c / f"{n:07d}{Path(path).suffix.lower()}")
            say(f"audit: fold {k + 1} of {folds}: training on {int((fold_of != k).sum())} images")
            run = train(preset="fast", data=str(fold), epochs=epochs, out=str(fold / "run"), seed=seed,
                        eval_every=0, accuracy_marks=[], log_every=10**9)
            scores = evaluate_split(run.out, str(fold), split="test")
            columns = [classes.index(c) for c in scores.result.classes]
            for row, path in zip(scores.probs.numpy(), scores.split.paths):
                n = int(Path(path).stem)
                probs[n, columns] = row
                scored[n] = True
    return probs, scored


# --- the audit ------------------------------------------------------------------------------------------------------

def audit(data: str | Path, *, run: str | Path | None = None, folds: int = 0, fold_epochs: float = 8,
          seed: int = 0, labels: str | None = None) -> AuditReport:
    """Audit the image folder ``data`` (``train/``, optional ``val/`` and ``test/``; one folder of class folders;
    or images whose classes the CSV/TSV ``labels`` gives). See the module's docstring."""
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder (reslab audit reads an image folder with train/ and test/)")
    if folds == 1 or folds < 0:
        raise DataError(f"--folds must be 0 (no cross-validated label check) or at least 2, got {folds}")
    holdout = _holdout(root, run, labels)
    files, findings = _list_files(root, holdout, labels)
    counts = {s: dict(Counter(c for _, c in rows)) for s, rows in files.items()}
    findings += _file_findings(files)
    findings += _class_findings(counts)
    splits = {name: load_split(str(root), name, store_size=32, loader="memory", holdout=holdout, labels=labels)
              for name in files if files[name]}
    findings += _duplicate_findings(splits)
    labels_checked = "not checked: give --folds K (cross-validated reslab runs) or --run RUN"
    if folds and len(counts["train"]) < 2:
        labels_checked = "not checked: one class (nothing to confuse it with)"
    elif folds:
        train_rows = list(zip(splits["train"].paths, [splits["train"].classes[i] for i in splits["train"].labels]))
        probs, scored = _fold_probabilities(train_rows, splits["train"].classes, folds, fold_epochs, seed)
        how = f"{folds}-fold cross-validated predictions of the fast preset, {fold_epochs:g} epochs each"
        findings.append(_label_finding(splits["train"], probs, "training", how, scored))
        labels_checked = how
    if run is not None and "test" in splits:
        from ..inference.evaluate import evaluate_split

        scores = evaluate_split(run, str(root), split="test", labels=labels)
        findings.append(_label_finding(scores.split, scores.probs.numpy(), "test",
                                       f"predictions of {run}, which never trained on them"))
        labels_checked = (labels_checked + "; " if folds else "") + f"test/ by {run}"
    order = {"error": 0, "warning": 1, "info": 2}
    findings = sorted((f for f in findings if f is not None), key=lambda f: order[f.severity])
    return AuditReport(str(root), {s: len(r) for s, r in files.items()}, counts, findings,
                       {"hash_bits": HASH_BITS, "pixel_mad": PIXEL_MAD, "size_factor": SIZE_FACTOR,
                        "near_empty": NEAR_EMPTY, "imbalance": IMBALANCE}, labels_checked)


def as_dict(report: AuditReport) -> dict[str, Any]:
    return asdict(report)
