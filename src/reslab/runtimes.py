"""Where a trained model runs for inference: eager PyTorch (fp32, bf16) or ONNX Runtime (fp32, int8).

An ONNX model is wrapped as an ``nn.Module`` (``OnnxModule``), so evaluation, prediction, the inference benchmark and
the server feed every runtime through one code path. Optional dependency: ``pip install "reslab[onnx]"``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import UserError


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
        self.session = onnx_session(path, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(["logits"], {"images": images})[0])
