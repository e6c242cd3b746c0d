"""Where a trained model runs for inference: eager PyTorch (fp32, bf16) or ONNX Runtime (fp32, int8).

An ONNX model is wrapped as an ``nn.Module`` (``OnnxModule``), so evaluation, prediction, the inference benchmark and
the server feed every runtime through one code path. Optional dependency: ``pip install "reslab[onnx]"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import UserError, first_line

TAG = "reslab"  # the exported model's metadata entry: the weights it came from, its architecture and classes


def model_tag(meta: dict[str, Any]) -> dict[str, Any]:
    """What an exported file records of the model it came from (``meta``: ``load_model``'s)."""
    return {"weights": meta["weights"], "arch": meta["arch"], "classes": list(meta["classes"])}


def tag_onnx(path: str | Path, meta: dict[str, Any]) -> None:
    """Record ``model_tag(meta)`` in the ONNX model at ``path`` (its metadata_props)."""
    import onnx

    model = onnx.load(str(path))
    for prop in [p for p in model.metadata_props if p.key == TAG]:
        model.metadata_props.remove(prop)
    model.metadata_props.add(key=TAG, value=json.dumps(model_tag(meta)))
    onnx.save(model, str(path))


def onnxruntime():
    """The ``onnxruntime`` module, or one line saying how to install it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("ONNX needs onnx, onnxscript and onnxruntime: pip install 'reslab[onnx]'") from None
    return ort


def onnx_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session on ``path`` using ``threads`` intra-op threads (default: PyTorch's count)."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxModule(nn.Module):
    """An ONNX model (input ``images``, output ``logits``) behind the ``nn.Module`` call convention, on CPU."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        try:
            self.session = onnx_session(path, threads)
        except UserError:
            raise
        except Exception as exc:  # ONNX Runtime's errors on a damaged or foreign file
            raise UserError(f"{path} is not a readable ONNX model ({first_line(exc)[:200]}): make it again with "
                            f"reslab export") from None

    def tag(self) -> dict[str, Any] | None:
        """The model this file was exported from (``model_tag``), or None when it does not say."""
        raw = self.session.get_modelmeta().custom_metadata_map.get(TAG)
        try:
            tag = json.loads(raw) if raw else None
        except ValueError:
            return None
        return tag if isinstance(tag, dict) else None

    def check_made_from(self, meta: dict[str, Any], how: str) -> None:
        """Refuse (one line) a file exported from other weights or classes than ``meta``'s; ``how``: the command
        that makes it again."""
        tag = self.tag()
        if tag is None:
            raise UserError(f"{self.path} does not record the weights it was exported from (an older reslab or "
                            f"another tool made it): make it again with {how}")
        if tag.get("weights") != meta["weights"] or tag.get("classes") != list(meta["classes"]):
            what = "classes" if tag.get("weights") == meta["weights"] else "weights"
            raise UserError(f"{self.path} was exported from other {what} than the model's (trained on since, or "
                            f"from another run): make it again with {how}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(["logits"], {"images": images})[0])
