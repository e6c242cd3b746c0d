"""``reslab export``: a trained model to ONNX or TorchScript, with a dynamic batch size and a parity check; to int8
ONNX with ``--quantize int8`` (calibrated and checked on the test set: ``reslab.quantize``).

Optional dependencies: ``pip install "reslab[onnx]"`` (onnx, onnxscript, onnxruntime) for ONNX.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import UserError, first_line
from ..core.rundir import check_output, is_run_file, read_config, remove_stale_temps, temp_prefix
from ..inference.backends import model_tag, onnxruntime, tag_onnx
from ..models.checkpoint import load_model, resolve_model_path, write_failed

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
    if calibration < 1 or not 0 <= max_drop <= 1 or check_batch < 1 or (samples is not None and samples < 1):
        raise UserError(f"--calibration, --check-batch and --samples must be at least 1 and --max-drop in [0, 1], "
                        f"got {calibration}, {check_batch}, {samples} and {max_drop}")
    net, meta = load_model(model, arch=arch, device="cpu")
    net = net.float().eval()
    size = meta.get("input_size") or 32
    src = Path(model)
    if quantize:
        data, data_dir = run_data(src, data, data_dir)
    out = _output(src, out, format, quantize, force)
    example = torch.randn(2, 3, size, size)
    check = torch.randn(check_batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net(check)
        if quantize:
            return _export_int8(net, meta, example, check, out, data, data_dir, calibration, samples, max_drop,
                                force, src)
        got = _replace(out, lambda tmp: _write(net, meta, format, example, check, tmp))
    diff = (got - expected).abs().max().item()
    return ExportResult(out, format, diff, diff <= TOLERANCE, ["batch", 3, size, size])


def _output(src: Path, out: str | Path | None, format: str, quantize: str | None, force: bool) -> Path:
    """The file to write (default: beside the model), checked before any work with the int8 check's sidecar; its
    folder made and cleared of a killed export's temporary files."""
    name = {"onnx": "model.onnx", "torchscript": "model.ts"}[format] if not quantize else "model.int8.onnx"
    out = Path(out or (src if src.is_dir() else src.parent) / name)
    if out.is_dir():
        out = out / name
    check_output(out, (".onnx", ".ts"), force=force, source=resolve_model_path(src))
    if quantize:
        check_sidecar(out.with_suffix(".json"), force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot make the folder of --out {out}: {exc.strerror or exc}") from None
    remove_stale_temps(out.parent)
    return out


def _replace(out: Path, write: Callable[[Path], Any]) -> Any:
    """``write`` a temporary file beside ``out`` and rename it over ``out`` only when complete: a failed export
    (disk full, a kill) leaves the previous good file as it was. Returns what ``write`` returns."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        result = write(tmp)
        os.replace(tmp, out)
        return result
    except Exception as exc:
        if not write_failed(exc):
            raise
        raise UserError(f"cannot write {out}: {getattr(exc, 'strerror', None) or first_line(exc)} (disk full? "
                        f"a file-size limit?); {'the previous one is kept' if out.exists() else 'nothing written'}"
                        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _write(net: torch.nn.Module, meta: dict[str, Any], format: str, example: torch.Tensor, check: torch.Tensor,
           path: Path) -> torch.Tensor:
    """``net`` exported to ``path``, tagged with the weights it came from; its outputs on ``check``."""
    if format == "onnx":
        got = torch.from_numpy(export_onnx(net, example, path, check.numpy()))
        tag_onnx(path, meta)
        return got
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, yet what TorchScript users need
        traced = torch.jit.trace(net, example)
        # Into memory first: PyTorch's file writer aborts the process when a write fails (a full disk, a size limit).
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={"reslab.json": json.dumps(model_tag(meta))})
        with open(path, "wb") as f:
            f.write(buffer.getvalue())
        return torch.jit.load(str(path))(check)


def check_sidecar(path: Path, force: bool) -> None:
    """Refuse to write the int8 check's ``<name>.json`` over a file of a run, or (without ``force``) over a file
    that is not an earlier check."""
    if not path.exists():
        return
    if path.is_dir() or is_run_file(path):
        raise UserError(f"the int8 check would be written to {path}, a file of a run: choose another --out")
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        earlier = None
    if not force and not (isinstance(earlier, dict) and {"int8_accuracy", "max_drop"} <= earlier.keys()):
        raise UserError(f"the int8 check would be written to {path}, which exists and is not one: choose another "
                        f"--out, or add --force")


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
                 force, src) -> ExportResult:
    """The float ONNX model (checked against PyTorch), quantized; the int8 one checked on the test set."""
    import tempfile

    from .quantize import quantize_int8

    with tempfile.TemporaryDirectory(prefix=temp_prefix("export"), dir=out.parent) as tmp:
        float_onnx = Path(tmp) / "float.onnx"
        diff = (torch.from_numpy(export_onnx(net, example, float_onnx, check.numpy())) - net(check)).abs().max()
        if diff > TOLERANCE:
            raise UserError(f"the float ONNX model differs from PyTorch by {diff:.2e}: not quantized")
        q = quantize_int8(net, meta, float_onnx, out, data, data_dir=data_dir, calibration=calibration,
                          samples=samples, max_drop=max_drop, force=force, run=src)
    return ExportResult(out, "onnx-int8", float(diff), q.written, ["batch", 3, *example.shape[2:]], quantized=q)


def export_onnx(net: torch.nn.Module, example: torch.Tensor, out: Path, check):
    """``net`` to ONNX at ``out`` (input ``images`` with a dynamic batch, output ``logits``); its logits on
    ``check`` from ONNX Runtime."""
    ort = onnxruntime()
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter prints its progress (8 lines) and deprecation notes: results keep stdout (--json) and stderr.
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), str(out), input_names=["images"], output_names=["logits"],
                          dynamic_shapes={"x": {0: batch}}, external_data=False)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": check})[0]
