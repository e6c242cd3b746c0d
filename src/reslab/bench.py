"""``reslab bench``: training throughput of the whole step, against a measured compute roof and the seed's pipeline.

What is timed: ``steps`` full training steps (batch selection -> augmentation -> forward -> backward -> update)
after ``warmup`` untimed ones, synchronising the device before reading the clock. The roof is a large GEMM in the
same precision on the same device, timed the same way. The baseline (``--baseline``) is the seed's own pipeline:
per-image PIL transforms in a DataLoader with 4 workers, fp32, NCHW, eager, with the same model and batch size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import make_config
from .data import Batches, BatchTransform, Split, load_data, pil_transform
from .data.loader import _FileDataset
from .distributed import synchronize
from .errors import UserError
from .models import count_macs, create_model
from .optim import SGD
from .runtime import autocast, default_channels_last, resolve_device, resolve_precision, set_threads


def gemm_roof(device: torch.device, precision: str, n: int = 2048, reps: int = 5) -> float:
    """Measured GFLOP/s of an n x n matrix product in ``precision`` (the compute roof for this device)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    n = 4096 if device.type == "cuda" else n
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def _time_steps(step, batches, warmup: int, steps: int, device: torch.device) -> float:
    """Images per second over ``steps`` calls of ``step(x, y)`` after ``warmup`` untimed ones."""
    it = _cycle(batches)
    for _ in range(warmup):
        step(*next(it))
    synchronize(device)
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        x, y = next(it)
        step(x, y)
        n += len(y)
    synchronize(device)
    return n / (time.perf_counter() - t0)


def _cycle(batches):
    epoch = 0
    while True:
        if hasattr(batches, "epoch"):
            yield from batches.epoch(epoch)
        else:
            yield from batches
        epoch += 1


def _train_step(model, opt, device, precision):
    def step(x, y):
        with autocast(device, precision):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _model(cfg, num_classes: int, device, channels_last: bool, compile: bool):
    model = create_model(cfg.arch, num_classes=num_classes, **cfg.model_kwargs).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = SGD(list(model.parameters()), lr=1e-3, momentum=0.9)  # the optimizer training uses
    return (torch.compile(model) if compile else model), opt


def _random_split(n: int, size: int) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)],
                 images=torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g))


@dataclass
class BenchResult:
    """Throughput of one model and recipe on one device, and how close it runs to the device's compute roof."""

    arch: str
    preset: str
    device: str
    threads: int
    precision: str
    channels_last: bool
    compile: bool
    batch_size: int
    steps: int
    input_size: int
    data: str  # a folder, or "random"
    num_classes: int
    macs: int  # multiply-accumulates per image, forward
    images_per_sec: float  # training, whole step
    eval_images_per_sec: float
    gflops_per_sec: float  # achieved in training, counting a step as three forward passes
    roof_gflops_per_sec: float  # a large GEMM in the same precision
    roof_fraction: float
    baseline_images_per_sec: float | None = None  # the seed's pipeline (with --baseline)
    speedup: float | None = None


def bench(arch: str | None = None, preset: str = "seed", data: str | None = None, batch_size: int = 128,
          steps: int = 20, warmup: int = 3, baseline: bool = False, device: str = "auto",
          precision: str = "auto", channels_last: bool | None = None, compile: bool = False,
          threads: int | None = None) -> BenchResult:
    """Measure training (and evaluation) images/s of ``arch`` under ``preset``.

    Args:
        arch: model name (default: the preset's).
        preset: training preset whose augmentation and model settings are used (seed or paper).
        data: image folder to read real images from (needed for ``baseline``); random images otherwise.
        batch_size: images per step.
        steps: timed steps.
        warmup: untimed steps first.
        baseline: also time the seed's pipeline (PIL per image, DataLoader, fp32, NCHW, eager) on ``data``.
        device, precision, channels_last, compile, threads: as for ``reslab train``.

    Returns:
        Training and evaluation images/s, achieved GFLOP/s against the roof, and the seed pipeline's images/s.
    """
    cfg = make_config(preset, **({"arch": arch} if arch else {}), batch_size=batch_size)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    n_threads = set_threads(threads)
    cl = channels_last if channels_last is not None else default_channels_last(dev, prec)
    need = (warmup + steps) * batch_size
    if data is not None:
        bundle = load_data(data, augment=cfg.augment, input_size=cfg.input_size, train_samples=need)
        split, mean, std = bundle.train, bundle.mean, bundle.std
    elif baseline:
        raise UserError("--baseline reads real image files: pass --data PATH (an image folder)")
    else:
        split, mean, std = _random_split(need, 32), (0.5,) * 3, (0.25,) * 3
    if split.images is None:
        raise UserError("bench times the in-memory path; this folder is too large to decode (use a subset)")
    batches = Batches(split, BatchTransform(cfg.augment, True, cfg.input_size, mean, std), batch_size,
                      shuffle=True, drop_last=True, seed=0, device=dev)
    num_classes = len(split.classes)
    model, opt = _model(cfg, num_classes, dev, cl, compile)
    ips = _time_steps(_train_step(model, opt, dev, prec), batches, warmup, steps, dev)

    eval_batches = Batches(split, BatchTransform(cfg.augment, False, cfg.input_size, mean, std), batch_size,
                           shuffle=False, drop_last=True, seed=0, device=dev)

    @torch.no_grad()
    def eval_step(x, y):
        with autocast(dev, prec):
            model(x).argmax(1)

    model.eval()
    eval_ips = _time_steps(eval_step, eval_batches, 1, max(3, steps // 2), dev)
    macs = count_macs(create_model(cfg.arch, num_classes=num_classes, **cfg.model_kwargs), cfg.input_size)
    gflops = 3 * 2 * macs * ips / 1e9  # a training step costs about three forward passes
    roof = gemm_roof(dev, prec)
    result = BenchResult(cfg.arch, preset, str(dev), n_threads, prec, cl, compile, batch_size, steps, cfg.input_size,
                         data or "random", num_classes, macs, round(ips, 1), round(eval_ips, 1), round(gflops, 1),
                         round(roof, 1), round(gflops / roof, 3))
    if baseline:
        result.baseline_images_per_sec = round(_seed_pipeline(cfg, split, mean, std, warmup, steps, dev), 1)
        result.speedup = round(ips / result.baseline_images_per_sec, 2)
    return result


def _seed_pipeline(cfg, split: Split, mean, std, warmup: int, steps: int, device: torch.device) -> float:
    """The seed tutorial's way: ImageFolder-style dataset, PIL transforms per image, DataLoader(num_workers=4)."""
    import warnings

    from torch.utils.data import DataLoader

    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 4 workers on fewer cores: as the seed
    files = Split(split.labels, split.classes, paths=split.paths)
    ds = _FileDataset(files, pil_transform(cfg.augment, True, cfg.input_size, mean, std))
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=4,
                        persistent_workers=True)
    model, opt = _model(cfg, len(split.classes), device, channels_last=False, compile=False)
    step = _train_step(model, opt, device, "fp32")

    def to_device(batches):
        for x, y in batches:
            yield x.to(device), y.to(device)

    class _Loader:  # re-iterable, moving each batch to the device as the seed did with .cuda()
        def __iter__(self):
            return to_device(loader)

    return _time_steps(step, _Loader(), warmup, steps, device)


@dataclass
class TuneRow:
    """One execution choice of ``reslab bench --tune``: its training step measured, against its GEMM roof."""

    threads: int
    precision: str
    channels_last: bool
    images_per_sec: float
    gflops_per_sec: float
    roof_gflops_per_sec: float
    roof_fraction: float
    chosen: bool  # what the start-up probe of a training run picks (its two-stage search, same measurements)


def tune_table(arch: str | None = None, preset: str = "fast", batch_size: int = 256) -> list[TuneRow]:
    """Every execution choice for training ``arch`` on this CPU (threads 1 or all cores, fp32 or native bf16, either
    layout), measured by ``reslab.tune``'s step timer, fastest first, with the fraction of each one's GEMM roof."""
    from . import tune
    from .runtime import cpu_has_bf16, usable_cores

    cfg = make_config(preset, **({"arch": arch} if arch else {}), batch_size=batch_size)
    measure = tune.step_timer(cfg.arch, cfg.model_kwargs, 10, batch_size, cfg.input_size)
    options = tune.candidates(usable_cores(), cpu_has_bf16())
    seconds = {c: measure(c) for c in options}
    picked = tune.decide(options, seconds.__getitem__).choice
    macs = count_macs(create_model(cfg.arch, num_classes=10, **cfg.model_kwargs), cfg.input_size)
    roofs = {}
    rows = []
    for c, s in sorted(seconds.items(), key=lambda kv: kv[1]):
        if (c.threads, c.precision) not in roofs:
            torch.set_num_threads(c.threads)
            roofs[c.threads, c.precision] = gemm_roof(torch.device("cpu"), c.precision)
        gflops = 3 * 2 * macs * batch_size / s / 1e9
        roof = roofs[c.threads, c.precision]
        rows.append(TuneRow(c.threads, c.precision, c.channels_last, round(batch_size / s, 1), round(gflops, 1),
                            round(roof, 1), round(gflops / roof, 3), c == picked))
    return rows
