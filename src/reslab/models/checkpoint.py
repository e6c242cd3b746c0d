"""Saving and loading: atomic writes, safe loading, self-describing model files, other tools' checkpoints.

Two kinds of file:
- ``model.safetensors``: the weights plus metadata (architecture, its kwargs, class names, input size,
  normalisation), enough to use the model with nothing else;
- ``last.pt``: everything needed to resume (model, optimizer, step, RNG states, config), loaded with
  ``weights_only=True`` so a file cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config.schema import MAX_IMAGE_SIZE
from ..core.errors import CheckpointError, ModelError, first_line
from ..core.rundir import CHECKPOINT_FILE, MODEL_FILE
from . import create_model, list_models

__all__ = ["CHECKPOINT_FILE", "MODEL_FILE", "atomic_write", "clean_state_dict", "load_checkpoint", "load_model",
           "model_digest", "read_safetensors", "read_weights", "resolve_model_path", "save_checkpoint", "save_model",
           "unwrap_model", "weights_digest", "write_failed"]


def write_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed write (disk full, a file-size limit), also as PyTorch's C++ writers report it."""
    return isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and any(
        s in str(exc) for s in ("No space left", "file write failed", "File too large", "unexpected pos")))


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file in the same folder, fsync, then rename.

    A kill at any moment leaves either the old file or the new one, never a torn one (a killed writer's temporary
    file is removed when the run directory is next taken, see ``rundir.own``). A full disk is one line.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if write_failed(exc):
            raise CheckpointError(f"cannot write {path}: {getattr(exc, 'strerror', None) or first_line(exc)} "
                                  f"(disk full?); {'the previous one is kept' if path.exists() else 'nothing written'}"
                                  ) from None
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DDP/DataParallel and torch.compile wrappers (what gets saved)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def clean_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Weights from any common checkpoint layout: nested under ``state_dict``/``model``/``net``, keys prefixed
    ``module.`` (DataParallel/DDP) or ``_orig_mod.`` (torch.compile)."""
    for key in ("state_dict", "model", "net", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("the file holds no model weights (expected a state_dict of tensors)")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def save_model(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write the weights of ``model`` and its ``meta`` to a safetensors file, atomically."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in unwrap_model(model).state_dict().items()}
    data = save(state, metadata={"reslab": json.dumps(meta)})
    atomic_write(path, lambda f: f.write(data))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` of plain containers and tensors, atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a torch checkpoint without unpickling arbitrary objects; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip archive, or a legacy pickle
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch.save archive nor a pickle): "
                              f"damaged, or another kind of file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            unsupported = next((ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln), "")
            raise CheckpointError(f"{path}: refused to load: the file holds objects other than weights, which could "
                                  f"run code ({unsupported[:160]})") from None
        raise CheckpointError(f"{path}: not a readable checkpoint: {first_line(exc)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): "
                              f"{first_line(exc)}") from None



def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("reslab", "{}"))
            if not isinstance(meta, dict):
                raise CheckpointError(f"{path}: its metadata is damaged: a {type(meta).__name__}, not an object")
            return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file: {first_line(exc)}") from None


def resolve_model_path(path: str | Path) -> Path:
    """A run directory resolves to its ``model.safetensors`` (or ``last.pt`` while it is still training)."""
    path = Path(path)
    if path.is_dir():
        for name in (MODEL_FILE, CHECKPOINT_FILE):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: no {MODEL_FILE} or {CHECKPOINT_FILE} in this folder")
    if not path.is_file():
        raise CheckpointError(f"model not found: {path}")
    return path


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state_dict and reslab metadata (empty if none) of a run directory, safetensors file or torch file."""
    path = resolve_model_path(path)
    if path.suffix == ".safetensors":
        state, meta = read_safetensors(path)
    else:
        obj = load_checkpoint(path)
        meta = dict(obj["meta"]) if isinstance(obj, dict) and isinstance(obj.get("meta"), dict) else {}
        state = clean_state_dict(obj)
    fc = state.get("fc.weight")
    return state, check_meta(meta, path, fc.shape[0] if isinstance(fc, torch.Tensor) and fc.dim() == 2 else None)


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """A short digest of weights (names, dtypes, shapes, values), whatever file holds them: what ties an exported
    model or a predictions file to the weights that made it."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def model_digest(path: str | Path) -> str:
    """``weights_digest`` of the model at ``path`` (run directory, model file or state_dict)."""
    return weights_digest(read_weights(path)[0])


MAX_INPUT_SIZE = MAX_IMAGE_SIZE  # a model file may not ask for more (a forward pass at 100,000 px needs terabytes)


def check_meta(meta: Any, path: Path, outputs: int | None) -> dict[str, Any]:
    """The metadata of a model file, checked against its weights (``outputs`` classes) and sane bounds: one line for
    the first problem (a hand-edited or foreign file must not reach an allocation of terabytes or a wrong label)."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: its metadata is damaged: {what}")

    if not isinstance(meta, dict):
        raise bad(f"a {type(meta).__name__}, not an object")
    if "arch" in meta and not isinstance(meta["arch"], str):
        raise bad(f"arch {meta['arch']!r} is not a name")
    if not isinstance(meta.get("model_kwargs", {}), dict):
        raise bad(f"model_kwargs {meta['model_kwargs']!r} is not an object")
    problem = _classes_problem(meta.get("classes"), outputs) or _inputs_problem(meta)
    if problem:
        raise bad(problem)
    return meta


def _classes_problem(classes: Any, outputs: int | None) -> str | None:
    if classes is None:
        return None
    if not (isinstance(classes, list) and all(isinstance(c, str) and c for c in classes)):
        return "classes is not a list of names"
    if outputs is not None and len(classes) != outputs:
        return f"{len(classes)} class names for the {outputs} outputs of its weights"
    if len(set(classes)) != len(classes):
        return f"duplicate class names ({next(c for c in classes if classes.count(c) > 1)!r})"
    return None


def _inputs_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with how the file says its inputs are fed (size, augmentation, TTA, normalisation), or None."""
    from typing import get_args

    from ..config.schema import TTA, Augment

    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    size, fraction = meta.get("input_size"), meta.get("tta_fraction")
    if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= MAX_INPUT_SIZE):
        return f"input_size {size!r} is not a size in pixels from 1 to {MAX_INPUT_SIZE}"
    if meta.get("augment") is not None and meta["augment"] not in get_args(Augment):
        return f"augment {meta['augment']!r} is not one of {', '.join(get_args(Augment))}"
    if meta.get("tta") is not None and meta["tta"] not in get_args(TTA):
        return f"tta {meta['tta']!r} is not one of {', '.join(get_args(TTA))}"
    if fraction is not None and not (number(fraction) and 0 < fraction <= 1):
        return f"tta_fraction {fraction!r} is not a fraction in (0, 1]"
    for key in ("mean", "std"):
        v = meta.get(key)
        if v is not None and not (isinstance(v, list) and len(v) == 3 and all(number(x) for x in v)):
            return f"{key} {v!r} is not three numbers (one per colour channel)"
    if meta.get("std") is not None and min(meta["std"]) <= 0:
        return f"std {meta['std']} has a value that is not positive"
    return None


def load_model(path: str | Path, arch: str | None = None, num_classes: int | None = None,
               device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a model from a run directory, ``model.safetensors``, ``last.pt`` or a bare state_dict ``.pth``.

    Args:
        path: the file or run directory.
        arch: architecture, needed for files that do not record it (a bare state_dict).
        num_classes: expected classes; by default read from the file.
        device: where to put the model.

    Returns:
        (model in eval mode, metadata: arch, model_kwargs, classes, input_size, augment, mean, std).
    """
    path = resolve_model_path(path)
    state, meta = read_weights(path)
    arch = arch or meta.get("arch")
    if arch is None:
        raise ModelError(f"{path} does not record its architecture: pass --arch (one of {', '.join(list_models())})")
    if arch not in list_models():
        raise ModelError(f"unknown model {arch!r}; known: {', '.join(list_models())}")
    if "fc.weight" not in state:
        raise ModelError(f"{path}: no 'fc.weight' in the weights: not a reslab/torchvision ResNet checkpoint")
    n = state["fc.weight"].shape[0]
    if num_classes is not None and num_classes != n:
        raise ModelError(f"{path} has {n} output classes, expected {num_classes}")
    kwargs = dict(meta.get("model_kwargs", {}))
    try:
        model = create_model(arch, num_classes=n, **kwargs)
    except (TypeError, ValueError) as exc:  # ModelError is a UserError already
        raise CheckpointError(f"{path}: its metadata is damaged: model_kwargs {kwargs} do not build {arch} "
                              f"({first_line(exc)})") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ModelError(f"{path} does not match architecture {arch} {kwargs or ''}: "
                        f"{len(missing)} missing keys (e.g. {missing[:2]}), "
                        f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    for k, v in expected.items():
        if v.shape != state[k].shape:
            raise ModelError(f"{path}: {k} has shape {tuple(state[k].shape)}, {arch} expects {tuple(v.shape)}")
    model.load_state_dict(state)
    meta = {**meta, "arch": arch, "model_kwargs": kwargs, "weights": weights_digest(state),
            "classes": meta.get("classes") or [str(i) for i in range(n)], "recorded_classes": bool(meta.get("classes")),
            "input_size": meta.get("input_size"), "augment": meta.get("augment", "none"),
            "mean": meta.get("mean", [0.5] * 3), "std": meta.get("std", [0.5] * 3)}
    return model.to(device).eval(), meta
