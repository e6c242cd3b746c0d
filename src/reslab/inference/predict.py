"""Prediction on image files, from a handful to a folder of 100,000: batched, decoded in parallel, streamed.

Images are decoded by DataLoader workers at libjpeg's reduced scale where the model's input allows (``load_rgb``),
centre-squared and normalised exactly as ``reslab eval`` feeds them; rows come out in input order, a batch at a time,
so a caller can write them as they are made. A file that cannot be read costs its own row (with the reason), not
the run.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..core.errors import ConfigError, first_line
from ..core.execution import autocast, inference_channels_last, prepare, usable_cores
from ..core.progress import CountProgress
from ..data import BatchTransform, DataError, fit_square, load_rgb, store_size
from ..data.folder import IMAGE_EXTENSIONS
from ..models.checkpoint import load_model
from .rowfile import RowWriter  # noqa: F401  (re-exported: predictions written to a file)


def image_files(inputs: list[str | Path]) -> list[Path]:
    """The image files among ``inputs``: files as given, folders searched recursively (sorted)."""
    files = []
    for given in inputs:
        if not str(given).strip():
            raise DataError("an empty path among the inputs (it would mean the current folder): give '.' for that")
        p = Path(given)
        if p.is_dir():
            try:
                os.scandir(p).close()
            except OSError as exc:
                raise DataError(f"cannot read the folder {p}: {exc.strerror or exc}") from None
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"no such file or folder: {p}")
    if not files:
        raise DataError(f"no image files in {', '.join(map(str, inputs))}")
    return files


class ModelInput:
    """How a model's metadata says an image becomes its input: decode scale, centre square, resize, normalise."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.size = meta.get("input_size") or 32
        self.keep = store_size(meta["augment"], self.size)
        self.transform = BatchTransform(meta["augment"], False, self.size, tuple(meta["mean"]), tuple(meta["std"]))

    def __call__(self, image) -> torch.Tensor:
        """One image (PIL) as a (3, size, size) float tensor on the CPU."""
        im = fit_square(image, self.keep or min(image.size))  # seed: the centre square; its resize does the rest
        return self.transform(torch.from_numpy(np.array(im, dtype=np.uint8)).unsqueeze(0))[0]

    def read(self, path: str | Path) -> torch.Tensor:
        return self(load_rgb(path, min_side=self.keep))


class _Files(Dataset):
    def __init__(self, files: list[Path], model_input: ModelInput) -> None:
        self.files, self.input = files, model_input

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.input.read(self.files[i]), None
        except Exception as exc:  # one bad file costs its own prediction, not the others'
            return i, None, f"{type(exc).__name__}: {first_line(exc)}"


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # a decoding worker: the cores' threads belong to the model's forward pass


def top_rows(probs: torch.Tensor, classes: list[str], topk: int) -> list[list[dict[str, Any]]]:
    """The ``topk`` classes and probabilities of each row of ``probs``."""
    top = probs.topk(min(topk, len(classes)), 1)
    return [[{"class": classes[j], "prob": round(q, 6)} for q, j in zip(p, c)]
            for p, c in zip(top.values.tolist(), top.indices.tolist())]


RUNTIME_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}  # what ``reslab export`` writes in a run


def inference_model(model: str | Path, runtime: str = "eager", arch: str | None = None,
                    device: torch.device | None = None,
                    precision: str = "fp32") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network of ``model`` in ``runtime`` (``eager``: PyTorch, in the layout ``inference_channels_last``
    picks; ``onnx``, ``onnx-int8``: ONNX Runtime on the run's exported ``model.onnx`` / ``model.int8.onnx``), in eval
    mode, with its metadata. Feed it through ``to_layout``."""
    if runtime not in ("eager", *RUNTIME_FILES):
        raise ConfigError(f"--runtime must be eager, onnx or onnx-int8, got {runtime!r}")
    device = device or torch.device("cpu")
    net, meta = load_model(model, arch=arch, device=device)
    if runtime == "eager" and inference_channels_last(device, precision, meta.get("input_size") or 32):
        net = net.to(memory_format=torch.channels_last)
    if runtime != "eager":
        from .backends import OnnxModule

        base = Path(model) if Path(model).is_dir() else Path(model).parent
        path = base / RUNTIME_FILES[runtime]
        how = "--quantize int8" if runtime == "onnx-int8" else "--format onnx"
        if not path.is_file():
            raise DataError(f"--runtime {runtime} runs {path}, which does not exist: make it with reslab export "
                            f"{base} {how}")
        net = OnnxModule(path)
        net.check_made_from(meta, f"reslab export {base} {how}")
    return net.eval(), meta


def to_layout(x: torch.Tensor, net: torch.nn.Module) -> torch.Tensor:
    """``x`` in the memory layout of ``net``'s weights (channels-last where ``inference_model`` chose it)."""
    weight = next((p for p in net.parameters() if p.dim() == 4), None)
    if weight is not None and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        return x.contiguous(memory_format=torch.channels_last)
    return x


def predict_rows(model: str | Path, files: list[Path], *, topk: int = 5, arch: str | None = None,
                 device: str = "auto", precision: str = "fp32", batch_size: int = 64, workers: int | None = None,
                 cam: str | Path | None = None, progress: bool = False,
                 runtime: str = "eager") -> Iterator[dict[str, Any]]:
    """One row per file, in order, a batch at a time: ``{"path", "top": [{"class", "prob"}, ...]}``, or
    ``{"path", "error"}`` for a file that cannot be read. ``workers``: decoding processes (default: the usable
    cores, none for a single batch); ``runtime``: see ``inference_model``."""
    if topk < 1 or batch_size < 1 or (workers is not None and workers < 0):
        raise ConfigError(f"--topk and --batch-size must be at least 1 and --workers at least 0, got {topk}, "
                          f"{batch_size} and {workers}")
    if cam is not None and runtime != "eager":
        raise ConfigError("--cam needs the PyTorch model's gradients: use it with --runtime eager")
    dev, prec = prepare(device, precision)
    net, meta = inference_model(model, runtime, arch, dev, prec)
    classes = meta["classes"]
    if workers is None:
        workers = 0 if len(files) <= batch_size else min(usable_cores(), 8)
    loader = DataLoader(_Files(files, ModelInput(meta)), batch_size=batch_size, num_workers=workers,
                        collate_fn=list, worker_init_fn=_one_thread, persistent_workers=False)
    meter = CountProgress(len(files), "predicting") if progress else None
    check_cam_folder(cam)
    names = cam_names(files) if cam is not None else []
    done = 0
    for batch in loader:
        good = [(i, x) for i, x, _ in batch if x is not None]
        rows: dict[int, dict[str, Any]] = {i: {"path": str(files[i]), "error": e} for i, x, e in batch if x is None}
        if good:
            xs = to_layout(torch.stack([x for _, x in good]).to(dev), net)
            with torch.no_grad(), autocast(dev, prec):
                probs = net(xs).float().softmax(1)
            for (i, x), top in zip(good, top_rows(probs, classes, topk)):
                rows[i] = {"path": str(files[i]), "top": top}
                if cam is not None:
                    from .cam import save_cam

                    rows[i]["cam"] = str(Path(cam) / names[i])
                    save_cam(net, x.unsqueeze(0).to(dev), classes.index(top[0]["class"]), tuple(meta["mean"]),
                             tuple(meta["std"]), Path(rows[i]["cam"]))
        yield from (rows[i] for i, _, _ in batch)
        done += len(batch)
        if meter is not None:
            meter.update(done)
    if meter is not None:
        meter.done()


def predict(model: str | Path, inputs: list[str | Path], *, topk: int = 5, arch: str | None = None,
            device: str = "auto", batch_size: int = 64, cam: str | Path | None = None,
            precision: str = "fp32", workers: int | None = None, runtime: str = "eager") -> list[dict[str, Any]]:
    """Top-``topk`` classes and probabilities for each image file (folders are searched recursively).

    ``cam``: also write a Grad-CAM overlay of each image's top class into this folder (``<stem>.cam.png``, from the
    input exactly as the model saw it; ``cam_names`` where stems repeat); each row then names its file under
    ``"cam"``.

    Returns:
        One ``{"path": ..., "top": [{"class": ..., "prob": ...}, ...]}`` per image, in input order; an image that
        cannot be read gets ``{"path": ..., "error": "..."}`` instead (a ``DataError`` only when none can be read).
    """
    check_cam_folder(cam)
    files = image_files(inputs)
    results = list(predict_rows(model, files, topk=topk, arch=arch, device=device, precision=precision,
                                batch_size=batch_size, workers=workers, cam=cam, runtime=runtime))
    if all("error" in r for r in results):
        raise DataError(f"none of the {len(files)} image files could be read (first: {results[0]['path']}: "
                        f"{results[0]['error']})")
    return results


def cam_names(files: list[Path]) -> list[str]:
    """The overlay file of each input: ``<stem>.cam.png`` where its stem is unique among ``files``; otherwise its path
    below the inputs' common folder with its extension kept (``a/x.png`` -> ``a/x.png.cam.png``), so that no two
    overlays share a name (compared without case, as macOS and Windows compare them)."""
    stems = Counter(f.stem for f in files)
    repeated = any(n > 1 for n in stems.values())
    full = [f.resolve() for f in files] if repeated else files  # paths resolved only where a stem repeats
    base = Path(os.path.commonpath([p.parent for p in full])) if repeated else Path()
    names: list[str] = []
    used: set[str] = set()
    for f, p in zip(files, full):
        name = f"{f.stem}.cam.png" if stems[f.stem] == 1 else f"{p.relative_to(base).as_posix()}.cam.png"
        unique, k = name, 2
        while unique.lower() in used:  # the same file given twice
            unique, k = f"{name[:-len('.cam.png')]}-{k}.cam.png", k + 1
        used.add(unique.lower())
        names.append(unique)
    return names


def check_cam_folder(cam: str | Path | None) -> None:
    """Refuse a ``--cam`` that cannot be the maps' folder, before any work."""
    if cam is None:
        return
    cam = Path(cam)
    if cam.exists() and not cam.is_dir():
        raise DataError(f"--cam {cam} is a file; the maps go into a folder")
    if not cam.exists() and cam.suffix.lower() in IMAGE_EXTENSIONS:
        raise DataError(f"--cam {cam} looks like an image file name; the maps go into a folder: give its name")
    try:
        cam.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot make the --cam folder {cam}: {exc.strerror or exc}") from None
    if not os.access(cam, os.W_OK):
        raise DataError(f"cannot write into the --cam folder {cam}: permission denied")
