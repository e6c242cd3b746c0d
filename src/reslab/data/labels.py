"""Labels from a file: one folder of images and a CSV or TSV naming each image's class (the Kaggle layout).

The file has a path column (relative to ``--data``), a label column and, optionally, a split column (``train``,
``val`` or ``test``). A header row is recognised by its column names (``path``/``file``/``image``/``id``, ``label``/
``class``/``category``, ``split``/``set``/``fold``); without one the columns are taken in that order. A path without an
extension (Kaggle's ``id`` columns) is matched to the one image file of that name. Rows that cannot be used are
counted and named, one line per kind, never dropped silently; a file with one class is refused.
"""

from __future__ import annotations

import csv
import functools
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..core.errors import DataError
from ..core.log import say
from .folder import HEIF_MISSING, IMAGE_EXTENSIONS, heif_readable, is_heif, scan_folder

PATH_COLUMNS = {"path", "file", "filename", "file_name", "filepath", "image", "image_path", "img", "id", "image_id",
                "name"}
LABEL_COLUMNS = {"label", "labels", "class", "class_name", "category", "target", "y", "breed", "species"}
SPLIT_COLUMNS = {"split", "set", "subset", "fold", "partition"}
SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
SHOWN = 3  # rows named per kind of bad row


@dataclass(frozen=True)
class LabelTable:
    """The usable rows of a labels file: image paths (under the data folder), their class names and splits (every
    row is ``train`` when the file has no split column)."""

    file: str
    paths: list[str]
    names: list[str]
    classes: list[str]
    splits: list[str]

    def has(self, split: str) -> bool:
        """Whether the file assigns any row to ``split``."""
        return split in self.splits

    def files(self, split: str) -> tuple[list[str], list[str]]:
        """(paths, class names) of the rows of ``split``."""
        rows = [i for i, s in enumerate(self.splits) if s == split]
        return [self.paths[i] for i in rows], [self.names[i] for i in rows]


def listing(root: str | Path, labels: str | None) -> tuple[list[str], list[str], list[str]]:
    """(paths, class names, classes) of the images a split of one folder is drawn from: its class folders, or the
    training rows of a labels file."""
    if labels is None:
        return scan_folder(root)
    table = read_labels(root, labels)
    return (*table.files("train"), table.classes)


def read_labels(root: str | Path, file: str | Path) -> LabelTable:
    """The labels ``file`` gives the images under ``root`` (read once per process while the file is unchanged)."""
    path = Path(file)
    if not Path(root).is_dir():
        raise DataError(f"--labels {file}: --data {root} is not a folder (the file's paths are relative to --data)")
    if not path.is_file():
        raise DataError(f"--labels {file}: no such file")
    st = path.stat()
    return _read(str(root), str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _read(root: str, file: str, _mtime: int, _size: int) -> LabelTable:
    rows = _rows(file)
    header, columns = _columns(rows[0] if rows else [], root)
    if header and not {f.strip().lower() for f in rows[0]} & PATH_COLUMNS:  # never a row dropped unsaid
        say(f"{os.path.basename(file)}: its first row {', '.join(rows[0])!r} is read as the header (it names no "
            f"image under {root}); columns: path {columns[0] + 1}, label {columns[1] + 1}")
    body = rows[1:] if header else rows
    bad: dict[str, list[str]] = {}
    paths, names, splits, seen = [], [], [], set()
    for number, row in enumerate(body, start=2 if header else 1):
        kind, value = _row(row, columns, root, seen)
        if kind is not None:
            bad.setdefault(kind, []).append(f"row {number}: {value}")
            continue
        image, label, split = value
        seen.add(image)
        paths.append(image)
        names.append(label)
        splits.append(split)
    name = os.path.basename(file)
    for kind, where in bad.items():
        more = f"; ... {len(where) - SHOWN} more" if len(where) > SHOWN else ""
        say(f"warning: {name}: {len(where)} row(s) {kind}, skipped ({'; '.join(where[:SHOWN])}{more})")
    classes = sorted(set(names))
    if not classes:
        raise DataError(f"--labels {file}: no usable row (a path under {root} and a label on each)")
    if len(classes) == 1:
        raise DataError(f"--labels {file}: every usable row has the label {classes[0]!r}: a classifier needs at least "
                        f"two classes")
    return LabelTable(file, paths, names, classes, splits)


def _rows(file: str) -> list[list[str]]:
    try:
        text = Path(file).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--labels {file}: cannot be read as UTF-8 text ({exc})") from None
    if file.lower().endswith(".tsv"):
        delimiter = "\t"
    elif file.lower().endswith(".csv"):
        delimiter = ","
    else:
        try:
            delimiter = csv.Sniffer().sniff(text[:4096], delimiters=",\t;").delimiter
        except csv.Error:
            delimiter = ","
    return [r for r in csv.reader(text.splitlines(), delimiter=delimiter) if any(f.strip() for f in r)]


def _columns(first: list[str], root: str) -> tuple[bool, tuple[int, int, int | None]]:
    """(whether the first row is a header, the path, label and split column indices)."""
    lower = [f.strip().lower() for f in first]
    known = [next((i for i, f in enumerate(lower) if f in names), None)
             for names in (PATH_COLUMNS, LABEL_COLUMNS, SPLIT_COLUMNS)]
    if known[0] is not None and known[1] is not None:
        return True, (known[0], known[1], known[2])
    split = 2 if len(first) > 2 else None
    if first and _resolve(root, first[0].strip()) is not None:  # no header: the first row is an image
        return False, (0, 1, split if split is not None and lower[2] in SPLITS else None)
    return True, (0, 1, split if known[2] == 2 else None)  # a header with names of its own: columns in order


def _row(row: list[str], columns: tuple[int, int, int | None], root: str,
         seen: set[str]) -> tuple[str | None, object]:
    """(None, (image, label, split)) for a usable row, else (what is wrong with it, what to show)."""
    fields = [f.strip() for f in row]
    at = columns[0]
    rel = fields[at] if at < len(fields) else ""
    label = fields[columns[1]] if columns[1] < len(fields) else ""
    split = "train"
    if columns[2] is not None:
        given = fields[columns[2]].lower() if columns[2] < len(fields) else ""
        if given not in SPLITS:
            return "give a split that is not train, val or test", f"{rel} {given!r}"
        split = SPLITS[given]
    if not label:
        return "have an empty label", rel or "(empty row)"
    image = _resolve(root, rel) if rel else None
    if image is None:
        return "name a file that is not there", rel or "(no path)"
    if image in seen:
        return "repeat an image already labelled (the first row is kept)", rel
    if is_heif(image) and not heif_readable():
        return f"name HEIC/HEIF photos ({HEIF_MISSING})", rel
    if not _readable(image):
        return "name a file that is not a readable image", rel
    return None, (image, label, split)


def _resolve(root: str, rel: str) -> str | None:
    """The image file ``rel`` names under ``root`` (an extensionless name matches ``name.<image extension>``)."""
    path = os.path.join(root, rel)
    if os.path.isfile(path):
        return path
    if os.path.splitext(rel)[1]:
        return None
    folder, stem = os.path.split(path)
    return _stems(folder).get(stem)


@functools.lru_cache(maxsize=64)
def _stems(folder: str) -> dict[str, str]:
    """Image files of ``folder`` by their name without extension (listed once per folder)."""
    try:
        with os.scandir(folder) as entries:
            return {os.path.splitext(e.name)[0]: e.path for e in entries
                    if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS}
    except OSError:
        return {}


def _readable(path: str) -> bool:
    """Whether ``path`` opens as an image (its header only; the decode reports what the header hides)."""
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - the header is read on open
        return True
    except Exception:
        return False
