"""``reslab bench --inference RUN``: what a trained model costs to serve, per runtime, side by side in one run.

For each runtime: batch-1 latency (median and 99th percentile of single-image calls, what an app answering one
request at a time sees) and batch-``batch`` throughput (what a folder job sees). Inputs are random images of the
model's input size: the speed of these networks does not depend on the pixels. The int8 model is calibrated on the
run's training images when its data is at hand, on random inputs otherwise (then: its speed only, not its accuracy:
``reslab export --quantize int8`` checks that).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.errors import UserError
from ..core.execution import autocast, cpu_has_bf16, inference_channels_last, set_threads
from ..core.log import say
from ..inference.predict import to_layout
from ..models.checkpoint import load_model

RUNTIMES = ("eager-fp32", "eager-bf16", "onnx-fp32", "onnx-int8")


@dataclass
class InferenceRow:
    """One runtime's latency and throughput, with the threads they were measured with."""

    runtime: str
    threads: int
    p50_ms: float  # batch 1: median latency
    p99_ms: float  # batch 1: 99th percentile
    batch: int
    images_per_sec: float  # at ``batch``
    note: str = ""


def _time_calls(call: Callable[[], object], seconds: float, least: int, most: int) -> list[float]:
    """Seconds of each call, after warm-up calls, until ``seconds`` have passed (``least`` to ``most`` calls)."""
    for _ in range(3):
        call()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < most and (len(times) < least or time.perf_counter() - start < seconds):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return times


def _measure(name: str, forward: Callable[[torch.Tensor], object], size: int, batch: int, seconds: float,
             threads: int, note: str = "") -> InferenceRow:
    one = torch.randn(1, 3, size, size)
    many = torch.randn(batch, 3, size, size)
    lat = np.array(_time_calls(lambda: forward(one), seconds, 20, 2000)) * 1000
    bulk = _time_calls(lambda: forward(many), seconds, 3, 200)
    row = InferenceRow(name, threads, round(float(np.median(lat)), 3), round(float(np.percentile(lat, 99)), 3),
                       batch, round(batch * len(bulk) / sum(bulk), 1), note)
    say(f"  {name:<12} batch 1: {row.p50_ms:.2f} ms median, {row.p99_ms:.2f} ms p99 | batch {batch}: "
        f"{row.images_per_sec:.0f} img/s{f'  ({note})' if note else ''}")
    return row


def _eager(net: torch.nn.Module, precision: str, size: int) -> tuple[Callable[[torch.Tensor], object], str]:
    """``net``'s forward pass in ``precision`` and the layout predict and serve use (``net`` is put in it, in
    place), and a note on the row."""
    cpu = torch.device("cpu")
    last = inference_channels_last(cpu, precision, size)  # bf16 always: oneDNN's bf16 kernels want channels-last
    net.to(memory_format=torch.channels_last if last else torch.contiguous_format)

    def forward(x: torch.Tensor):
        with autocast(cpu, precision):
            return net(to_layout(x, net))

    note = "channels-last" if last and precision == "fp32" else ""
    if precision == "bf16" and not cpu_has_bf16():
        note = "no native bf16 on this CPU: emulated"
    return forward, note


def bench_inference(model: str | Path, *, runtimes: tuple[str, ...] = RUNTIMES, threads: int | None = None,
                    batch: int = 64, seconds: float = 2.0, compile: bool = False,
                    data: str | None = None) -> list[InferenceRow]:
    """Batch-1 latency and batch-``batch`` throughput of ``model`` in each runtime, on the CPU.

    Args:
        model: run directory, ``model.safetensors`` or ``last.pt``.
        runtimes: a selection of ``RUNTIMES``.
        threads: CPU threads for every runtime (default: the cores this process may use).
        seconds: time spent on each measurement (at least 20 single-image and 3 batch calls).
        compile: also time ``torch.compile``d fp32 (slow to start; a C++ compiler is needed).
        data: images to calibrate int8 on (default: the run's data, else random inputs).
    """
    unknown = set(runtimes) - set(RUNTIMES)
    if unknown:
        raise UserError(f"--runtimes are among {', '.join(RUNTIMES)}, got {', '.join(sorted(unknown))}")
    if batch < 1 or not seconds > 0:
        raise UserError(f"--batch-size must be at least 1 and --seconds positive, got {batch} and {seconds:g}")
    n = set_threads(threads)
    net, meta = load_model(model, device="cpu")
    net = net.float().eval()
    size = meta.get("input_size") or 32
    say(f"inference on the CPU, {n} thread{'s' * (n > 1)}, input {size}x{size}, {meta['arch']}:")
    rows = []
    with torch.inference_mode():
        for precision in ("fp32", "bf16"):
            if f"eager-{precision}" in runtimes:
                forward, note = _eager(net, precision, size)
                rows.append(_measure(f"eager-{precision}", forward, size, batch, seconds, n, note))
        net.to(memory_format=torch.contiguous_format)  # as compile and the ONNX exporter take it
        if compile:
            rows.append(_measure("compiled-fp32", torch.compile(net), size, batch, seconds, n))
    onnx = [r for r in runtimes if r.startswith("onnx")]
    if onnx:
        rows += _onnx_rows(net, meta, model, onnx, size, batch, seconds, n, data)
    return rows


def _onnx_rows(net, meta, model, runtimes, size, batch, seconds, threads, data) -> list[InferenceRow]:
    from ..inference.backends import OnnxModule
    from .export import export_onnx
    from .quantize import quantize_onnx

    rows = []
    with tempfile.TemporaryDirectory(prefix="reslab-bench-") as tmp:
        float_onnx = Path(tmp) / "float.onnx"
        example = torch.randn(2, 3, size, size)
        with torch.no_grad():  # export_onnx keeps the exporter's progress lines and warnings to itself
            export_onnx(net, example, float_onnx, example.numpy())
        if "onnx-fp32" in runtimes:
            m = OnnxModule(float_onnx, threads)
            rows.append(_measure("onnx-fp32", m, size, batch, seconds, threads))
        if "onnx-int8" in runtimes:
            calibration, note = _calibration(meta, model, data)
            quantize_onnx(float_onnx, Path(tmp) / "int8.onnx", calibration)
            m = OnnxModule(Path(tmp) / "int8.onnx", threads)
            rows.append(_measure("onnx-int8", m, size, batch, seconds, threads, note))
    return rows


def _calibration(meta, model, data):
    """Calibration batches: 64 training images of the run's data, or random inputs when there is none."""
    from .export import run_data
    from .quantize import calibration_batches

    try:
        data, data_dir = run_data(Path(model), data, None)
        return [x.numpy() for x, _ in calibration_batches(meta, data, 64, data_dir).epoch(0)], ""
    except UserError:  # no data named, or not readable here
        size = meta.get("input_size") or 32
        g = torch.Generator().manual_seed(0)
        return [torch.randn(32, 3, size, size, generator=g).numpy() for _ in range(2)], "calibrated on random inputs"
