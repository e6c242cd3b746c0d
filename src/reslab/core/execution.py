"""Devices, precision and threads: the defaults were chosen by measurement (see README, "Speed")."""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import ConfigError, UserError
from .log import say


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present (the seed hard-coded ``.cuda()``), else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: reslab runs on cpu and cuda devices only (use auto, cpu, cuda or cuda:N)")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512_BF16 or AMX), where bf16 autocast pays off."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs that support it and on CPUs with native bf16 (2.4x measured here), else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def default_channels_last(device: torch.device, precision: str) -> bool:
    # Measured on the 2-core EPYC: channels-last helps bf16 (oneDNN's blocked kernels) and GPUs, and
    # does little for fp32 on the CPU.
    return device.type == "cuda" or precision != "fp32"


def inference_channels_last(device: torch.device, precision: str, input_size: int) -> bool:
    """The layout of inference (predict, serve, the inference benchmark): as training's, and channels-last for fp32
    on the CPU too at photo sizes. Measured 2026-12-02 (2-core EPYC, 2 threads, fp32): ResNet-18 at 224 px, batch 64,
    30 img/s NCHW against 41 channels-last (batch 1: 29.9 and 28.9 ms); ResNet-20 at 32 px, 842 against 803."""
    return default_channels_last(device, precision) or input_size >= 128


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one: Linux; else all cores)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (default: the cores this process may run on, one per core), never more than
    those cores: more threads only wait for each other (64 on 2 cores trained 15x slower) and 100,000 crash torch."""
    cores = usable_cores()
    n = threads or cores
    if n > cores:
        say(f"reslab: --threads {n} is more than the {cores} cores this process may use: using {cores}")
        n = cores
    torch.set_num_threads(n)
    return n


def prepare(device: str = "auto", precision: str = "auto", threads: int | None = None) -> tuple[torch.device, str]:
    """The device and the precision it computes in (``auto`` resolved), with the CPU threads set: how training,
    evaluation, prediction and the benchmark all start, so an impossible choice fails the same way in each."""
    dev = resolve_device(device)
    resolved = resolve_precision(precision, dev)
    set_threads(threads)
    return dev, resolved


def process_age() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere 0), so a time budget counts the imports."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


# What the speed of bf16 and int8 arithmetic depends on (VNNI: int8 dot products; AMX: bf16 and int8 tiles).
MATRIX_EXTENSIONS = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile"}


def machine_info(device: torch.device, precision: str) -> dict[str, object]:
    """What a run's numbers depend on: CPU model and its matrix extensions, cores, threads, GPU, versions."""
    import platform

    cpu, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and cpu in ("unknown", "", platform.machine()):
                    cpu = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    info: dict[str, object] = {
        "cpu": cpu, "cpu_extensions": sorted(flags & MATRIX_EXTENSIONS),
        "cores": usable_cores(), "threads": torch.get_num_threads(), "device": str(device), "precision": precision,
        "python": platform.python_version(), "torch": str(torch.__version__), "os": platform.platform(terse=True)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
