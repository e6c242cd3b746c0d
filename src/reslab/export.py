"""``reslab export``: a trained model to ONNX or TorchScript, with a dynamic batch size and a parity check.

Optional dependencies: ``pip install "reslab[onnx]"`` (onnx, onnxscript, onnxruntime) for ONNX.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_model, resolve_model_path
from .errors import UserError
from .rundir import check_output

TOLERANCE = 1e-4  # max |difference| of logits against PyTorch in eval mode


@dataclass
class ExportResult:
    """The exported file and its parity with PyTorch."""

    out: Path
    format: str
    max_abs_diff: float  # largest |logit difference| against PyTorch on a batch of random inputs
    ok: bool  # max_abs_diff <= TOLERANCE
    input_shape: list  # ["batch", 3, size, size]: the batch dimension is dynamic


def export(model: str | Path, format: str = "onnx", out: str | Path | None = None, *, arch: str | None = None,
           check_batch: int = 3, force: bool = False) -> ExportResult:
    """Export a saved model and check it against PyTorch on random inputs.

    Args:
        model: run directory, ``model.safetensors``, ``last.pt`` or a state_dict (with ``arch``).
        format: ``onnx`` or ``torchscript``.
        out: output file (default: ``model.onnx`` / ``model.ts`` beside the model).
        arch: architecture of a bare state_dict.
        check_batch: batch size of the parity check (differs from the export's, to prove the batch is dynamic).
        force: write over an existing file at ``out`` that is not an earlier export (never over the model itself or
            a run's files).

    Returns:
        The file written and its largest difference from PyTorch (``ok`` when within ``TOLERANCE``).
    """
    if format not in ("onnx", "torchscript"):
        raise UserError(f"--format must be onnx or torchscript, got {format!r}")
    net, meta = load_model(model, arch=arch, device="cpu")
    net = net.float().eval()
    size = meta.get("input_size") or 32
    src = Path(model)
    default_dir = src if src.is_dir() else src.parent
    name = "model.onnx" if format == "onnx" else "model.ts"
    out = Path(out or default_dir / name)
    if out.is_dir():
        out = out / name
    check_output(out, (".onnx", ".ts"), force=force, source=resolve_model_path(src))
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, 3, size, size)
    check = torch.randn(check_batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    # The exporters print progress and deprecation notes: keep stdout for results (``--json``).
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, yet what TorchScript users need
        expected = net(check)
        if format == "torchscript":
            torch.jit.save(torch.jit.trace(net, example), str(out))
            got = torch.jit.load(str(out))(check)
        else:
            got = torch.from_numpy(_export_onnx(net, example, out, check.numpy()))
    diff = (got - expected).abs().max().item()
    return ExportResult(out, format, diff, diff <= TOLERANCE, ["batch", 3, size, size])


def _export_onnx(net: torch.nn.Module, example: torch.Tensor, out: Path, check):
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'reslab[onnx]'") from None
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(net, (example,), str(out), input_names=["images"], output_names=["logits"],
                      dynamic_shapes={"x": {0: batch}}, external_data=False)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": check})[0]
