"""Saving and loading: atomic writes, safe loading, self-describing model files, other tools' checkpoints.

Two kinds of file:
- ``model.safetensors``: the weights plus metadata (architecture, its kwargs, class names, input size,
  normalisation), enough to use the model with nothing else;
- ``last.pt``: everything needed to resume (model, optimizer, step, RNG states, config), loaded with
  ``weights_only=True`` so a file cannot run code.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, ModelError
from .models import create_model, list_models
from .rundir import CHECKPOINT_FILE, MODEL_FILE

__all__ = ["CHECKPOINT_FILE", "MODEL_FILE", "atomic_write", "clean_state_dict", "load_checkpoint", "load_model",
           "read_safetensors", "read_weights", "resolve_model_path", "save_checkpoint", "save_model", "unwrap_model"]


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file in the same folder, fsync, then rename.

    A kill at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            unsupported = next((ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln), "")
            raise CheckpointError(f"{path}: refused to load: the file holds objects other than weights, which could "
                                  f"run code ({unsupported[:160]})") from None
        raise CheckpointError(f"{path}: not a readable checkpoint: {_first_line(exc)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): "
                              f"{_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("reslab", "{}"))
            return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file: {_first_line(exc)}") from None


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
        return read_safetensors(path)
    obj = load_checkpoint(path)
    meta = dict(obj["meta"]) if isinstance(obj, dict) and isinstance(obj.get("meta"), dict) else {}
    return clean_state_dict(obj), meta


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
    model = create_model(arch, num_classes=n, **kwargs)
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
    meta = {**meta, "arch": arch, "model_kwargs": kwargs,
            "classes": meta.get("classes") or [str(i) for i in range(n)], "recorded_classes": bool(meta.get("classes")),
            "input_size": meta.get("input_size"), "augment": meta.get("augment", "none"),
            "mean": meta.get("mean", [0.5] * 3), "std": meta.get("std", [0.5] * 3)}
    return model.to(device).eval(), meta
