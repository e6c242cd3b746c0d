"""int8 ONNX by static quantization: ONNX Runtime's calibrated post-training quantization, checked on the test set.

Static (not dynamic) because a convolutional net's cost is in its convolutions, whose activations need scales known
in advance: ONNX Runtime collects them (min/max) from calibration images fed exactly as ``reslab eval`` feeds them
(the training split, resized and normalised as the model was trained, no augmentation). QDQ format, weights int8 per
output channel, activations uint8: the layout ONNX Runtime's x86 kernels run with VNNI (``vpdpbusd``) where the CPU
has it. The quantized model is written only when it keeps the float model's test accuracy within a stated margin.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import UserError
from ..core.log import say
from ..core.rundir import temp_prefix
from ..data import FolderSplit
from ..inference.backends import OnnxModule, onnxruntime, tag_onnx
from ..inference.evaluate import evaluate_batches, model_batches, recorded_data
from ..models.checkpoint import atomic_write

MAX_DROP = 0.01  # refuse an int8 model that loses more than 1 point of test accuracy (unless --force)
CALIBRATION = 256  # training images whose activations set the int8 scales


@dataclass
class QuantizeCheck:
    """The int8 model against the float one on the same test images (stored beside it as ``<name>.json``)."""

    out: str
    data: str
    n: int  # test images compared
    calibration: int  # training images calibrated on
    float_accuracy: float
    int8_accuracy: float
    drop: float  # float - int8, in accuracy (0-1)
    max_drop: float
    agreement: float  # fraction of test images whose top class is the same for both
    written: bool


def quantize_int8(net: torch.nn.Module, meta: dict[str, Any], float_onnx: Path, out: Path, data: str, *,
                  data_dir: str | None = None, calibration: int = CALIBRATION, samples: int | None = None,
                  max_drop: float = MAX_DROP, force: bool = False, run: str | Path | None = None) -> QuantizeCheck:
    """Quantize ``float_onnx`` (exported from ``net``) to int8 at ``out``, calibrated on ``data``'s training split,
    and compare its test accuracy with ``net``'s; written only within ``max_drop`` (or with ``force``). ``run`` (the
    model's run) gives the split and labels it recorded for ``data``."""
    if calibration < 1 or not 0 <= max_drop <= 1:
        raise UserError(f"--calibration must be at least 1 and --max-drop in [0, 1], got {calibration}, {max_drop}")
    holdout, labels = recorded_data(run, data) if run is not None else (None, None)
    calib = calibration_batches(meta, data, calibration, data_dir, holdout=holdout, labels=labels)
    test, batches = model_batches(meta, data, "test", 128, torch.device("cpu"), samples=samples, data_dir=data_dir,
                                  holdout=holdout, labels=labels)
    with tempfile.TemporaryDirectory(prefix=temp_prefix("int8"), dir=out.parent) as tmp:
        say(f"quantizing to int8: calibrating on {len(calib.split)} training images of {data}")
        quantize_onnx(float_onnx, Path(tmp) / "int8.onnx", (x.numpy() for x, _ in calib.epoch(0)))
        tag_onnx(Path(tmp) / "int8.onnx", meta)
        say(f"checking int8 against float on {len(test)} test images")
        check = _compare(net, OnnxModule(Path(tmp) / "int8.onnx"), batches, len(test.classes))
        check.update(out=str(out), data=str(data), calibration=len(calib.split), max_drop=max_drop)
        result = QuantizeCheck(**check, written=check["drop"] <= max_drop or force)
        if result.written:
            os.replace(Path(tmp) / "int8.onnx", out)
            atomic_write(out.with_suffix(".json"), lambda f: f.write((json.dumps(asdict(result), indent=2) + "\n")
                                                                     .encode()))
    return result


def calibration_batches(meta: dict[str, Any], data: str, n: int, data_dir: str | None = None, *,
                        holdout: FolderSplit | None = None, labels: str | None = None):
    """``n`` training images of ``data`` (class-balanced, seeded) as ``reslab eval`` feeds them, on the CPU (the
    training part of a run's recorded ``holdout`` split and ``labels`` file, where given)."""
    return model_batches(meta, data, "train", 32, torch.device("cpu"), samples=n, data_dir=data_dir,
                         holdout=holdout, labels=labels)[1]


def quantize_onnx(float_onnx: Path, out: Path, calibration: Iterable[np.ndarray]) -> None:
    """Static int8 quantization of ``float_onnx`` into ``out``, its activation scales set by the ``calibration``
    batches (float32 NCHW arrays, normalised as the model's inputs)."""
    onnxruntime()
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {"images": x}

    # Shape inference and graph optimisation first (ONNX Runtime's advice): BatchNorm folded into the convolutions.
    # The quantizer warns on the root logger about the BatchNorms that follow a pool (no convolution to fold into:
    # the fast nets'), whose 1-D weights it leaves in float: expected, so not shown.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    pre = out.with_name(out.stem + ".pre.onnx")
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            quant_pre_process(str(float_onnx), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    finally:
        root.setLevel(level)
        pre.unlink(missing_ok=True)


@torch.no_grad()
def _compare(net: torch.nn.Module, int8: torch.nn.Module, batches, classes: int) -> dict[str, Any]:
    cpu = torch.device("cpu")
    a = evaluate_batches(net, batches, cpu, "fp32", classes, probabilities=True)
    b = evaluate_batches(int8, batches, cpu, "fp32", classes, probabilities=True)
    agreement = round((a.probs.argmax(1) == b.probs.argmax(1)).float().mean().item(), 6)
    return {"n": a.n, "float_accuracy": a.accuracy, "int8_accuracy": b.accuracy,
            "drop": round(a.accuracy - b.accuracy, 6), "agreement": agreement}
