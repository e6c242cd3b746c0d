"""``reslab export``: a trained model to ONNX or TorchScript, with a dynamic batch size and a parity check; to int8
ONNX with ``--quantize int8`` (calibrated and checked on the test set: ``reslab.quantize``).

Optional dependencies: ``pip install "reslab[onnx]"`` (onnx, onnxscript, onnxruntime) for ONNX.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_model, resolve_model_path
from .errors import UserError
from .rundir import check_output, read_config
from .runtimes import onnxruntime

TOLERANCE = 1e-4  # max |difference| of logits against PyTorch in eval mode


@dataclass
class ExportResult:
    """The exported file and its parity with PyTorch."""

    out: Path
    format: str
    max_abs_diff: float  # largest |logit difference| against PyTorch on a batch of random inputs
    ok: bool  # max_abs_diff <= TOLERANCE
    input_shape: list  # ["batch", 3, size, size]: the batch dimension is dynamic
    quantized: Any = None  # with --quantize int8: the int8 model's check against the float one (QuantizeCheck)


def export(model: str | Path, format: str = "onnx", out: str | Path | None = None, *, arch: str | None = None,
           check_batch: int = 3, force: bool = False, quantize: str | None = None, data: str | None = None,
           data_dir: str | None = None, calibration: int = 256, samples: int | None = None,
           max_drop: float = 0.01) -> ExportResult:
    """Export a saved model and check it against PyTorch on random inputs (and, quantized, on the test set).

    Args:
        model: run directory, ``model.safetensors``, ``last.pt`` or a state_dict (with ``arch``).
        format: ``onnx`` or ``torchscript``.
        out: output file (default: ``model.onnx`` / ``model.ts`` beside the model).
        arch: architecture of a bare state_dict.
        check_batch: batch size of the parity check (differs from the export's, to prove the batch is dynamic).
        force: write over an existing file at ``out`` that is not an earlier export (never over the model itself or
            a run's files); with ``quantize``, also write an int8 model that loses more than ``max_drop``.
        quantize: ``int8``: static int8 ONNX, calibrated on ``calibration`` training images of ``data`` (default:
            the run's data) and compared with the float model on its test split (or ``samples`` of it).
        max_drop: the most test accuracy (0-1) the int8 model may lose against the float one and still be written.

    Returns:
        The file written and its largest difference from PyTorch (``ok`` when within ``TOLERANCE``).
    """
    if format not in ("onnx", "torchscript"):
        raise UserError(f"--format must be onnx or torchscript, got {format!r}")
    if quantize not in (None, "int8") or (quantize and format != "onnx"):
        raise UserError(f"--quantize int8 is the one quantization, of ONNX models (asked: {quantize!r}, {format})")
    net, meta = load_model(model, arch=arch, device="cpu")
    net = net.float().eval()
    size = meta.get("input_size") or 32
    src = Path(model)
    default_dir = src if src.is_dir() else src.parent
    if quantize:
        data, data_dir = run_data(src, data, data_dir)
    name = {"onnx": "model.onnx", "torchscript": "model.ts"}[format] if not quantize else "model.int8.onnx"
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
        elif quantize:
            return _export_int8(net, meta, example, check, out, data, data_dir, calibration, samples, max_drop,
                                force)
        else:
            got = torch.from_numpy(export_onnx(net, example, out, check.numpy()))
    diff = (got - expected).abs().max().item()
    return ExportResult(out, format, diff, diff <= TOLERANCE, ["batch", 3, size, size])


def run_data(src: Path, data: str | None, data_dir: str | None) -> tuple[str, str | None]:
    """The data to calibrate and check an int8 model on: ``--data``, else the run's own."""
    if data:
        return data, data_dir
    cfg = read_config(src if src.is_dir() else src.parent) or {}
    if not cfg.get("data"):
        raise UserError("--quantize int8 calibrates on training images and checks on test images: give --data "
                        "FOLDER (the model is not in a run directory that names its data)")
    return cfg["data"], data_dir or cfg.get("data_dir")


def _export_int8(net, meta, example, check, out, data, data_dir, calibration, samples, max_drop,
                 force) -> ExportResult:
    """The float ONNX model (checked against PyTorch), quantized; the int8 one checked on the test set."""
    import tempfile

    from .quantize import quantize_int8

    with tempfile.TemporaryDirectory(prefix=".reslab-export-", dir=out.parent) as tmp:
        float_onnx = Path(tmp) / "float.onnx"
        diff = (torch.from_numpy(export_onnx(net, example, float_onnx, check.numpy())) - net(check)).abs().max()
        if diff > TOLERANCE:
            raise UserError(f"the float ONNX model differs from PyTorch by {diff:.2e}: not quantized")
        q = quantize_int8(net, meta, float_onnx, out, data, data_dir=data_dir, calibration=calibration,
                          samples=samples, max_drop=max_drop, force=force)
    return ExportResult(out, "onnx-int8", float(diff), q.written, ["batch", 3, *example.shape[2:]], quantized=q)


def export_onnx(net: torch.nn.Module, example: torch.Tensor, out: Path, check):
    """``net`` to ONNX at ``out`` (input ``images`` with a dynamic batch, output ``logits``); its logits on
    ``check`` from ONNX Runtime."""
    ort = onnxruntime()
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(net, (example,), str(out), input_names=["images"], output_names=["logits"],
                      dynamic_shapes={"x": {0: batch}}, external_data=False)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": check})[0]
