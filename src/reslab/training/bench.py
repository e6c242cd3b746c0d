"""``reslab bench``: training throughput of the whole step, against a measured compute roof and the seed's pipeline.

What is timed: ``steps`` steps of the training loop itself (``loop.step``: batch selection -> augmentation ->
forward -> loss -> backward -> update -> the hooks that change the weights, such as lookahead and EMA), on a run
that training's own builders made from the preset (its optimizer, parameter groups, schedule, BatchNorm settings and
memory layout), after ``warmup`` untimed ones, synchronising the device before reading the clock. The roof is a
large GEMM in the same precision on the same device, timed the same way. The baseline (``--baseline``) is the seed's
own pipeline: per-image PIL transforms in a DataLoader with 4 workers, torch's SGD, fp32, NCHW, eager, with the same
model and batch size."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config.schema import TrainConfig, make_config, resolve_inputs
from ..core.distributed import synchronize
from ..core.errors import UserError
from ..core.execution import autocast, default_channels_last, prepare
from ..data import DataBundle, Split, load_data, pil_transform
from ..data.loader import _FileDataset, endless
from ..models import count_macs, create_model, model_info
from . import build, tune
from .loop import step


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
    it = endless(batches)
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


def _plain_step(model: nn.Module, opt: torch.optim.Optimizer):
    """The seed tutorial's step: forward, cross-entropy, backward, update (fp32, nothing else)."""
    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _random_split(n: int, size: int) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)],
                 images=torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g))


def _bench_data(cfg: TrainConfig, data: str | None, images: int) -> DataBundle:
    """``images`` training images of the folder ``data`` (evaluated on the same ones), or random ones."""
    if data is None:
        split = _random_split(images, 32)
        return DataBundle(split, None, split, split.classes, (0.5,) * 3, (0.25,) * 3)
    bundle = load_data(data, augment=cfg.augment, input_size=cfg.input_size, train_samples=images)
    if bundle.train.images is None:
        raise UserError("bench times the in-memory path; this folder is too large to decode (use a subset)")
    return dataclasses.replace(bundle, val=None, test=bundle.train)


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
    execution: str  # "probe": threads, precision and layout left open were picked by training's start-up probe
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
        device: as for ``reslab train``. On a CPU, the execution choices left open (None, ``auto``) are what a
            training run's start-up probe picks here (``training.tune``), so the numbers are what training would do.
        precision: as for ``reslab train`` (left open: the probe's).
        channels_last: as for ``reslab train`` (left open: the probe's).
        compile: as for ``reslab train``.
        threads: as for ``reslab train`` (left open: the probe's).

    Returns:
        Training and evaluation images/s, achieved GFLOP/s against the roof, and the seed pipeline's images/s.
    """
    if baseline and data is None:
        raise UserError("--baseline reads real image files: pass --data PATH (an image folder)")
    # The preset's recipe, as a run of exactly warmup + steps steps would train it (its schedule, optimizer groups,
    # lookahead, EMA, ...). The finiteness check, a sync every log_every steps, is left out: random labels may diverge.
    cfg = make_config(preset, **({"arch": arch} if arch else {}), batch_size=batch_size, compile=compile,
                      steps=warmup + steps, log_every=2**62, out=None)
    if cfg.augment is None:
        cfg, _ = resolve_inputs(cfg, model_info(cfg.arch).family, None)
    cfg, probed = _execution(cfg, device, precision, channels_last, threads)
    dev, prec, cl = torch.device(cfg.device), cfg.precision, cfg.channels_last
    bundle = _bench_data(cfg, data, (warmup + steps) * batch_size)
    run = build.bare_run(cfg, bundle, dev, prec)
    run.model.train()
    for hook in run.hooks:
        hook.on_epoch_start(run)
    ips = _time_steps(lambda x, y: step(run, x, y), run.train_batches, warmup, steps, dev)

    eval_ips = _eval_images_per_sec(run, dev, prec, max(3, steps // 2))
    num_classes = len(bundle.classes)
    macs = count_macs(create_model(cfg.arch, num_classes=num_classes, **cfg.model_kwargs), cfg.input_size)
    gflops = 3 * 2 * macs * ips / 1e9  # a training step costs about three forward passes
    roof = gemm_roof(dev, prec)
    result = BenchResult(cfg.arch, preset, str(dev), cfg.threads, prec, cl, compile, batch_size, steps,
                         cfg.input_size, data or "random", num_classes, macs, round(ips, 1), round(eval_ips, 1),
                         round(gflops, 1), round(roof, 1), round(gflops / roof, 3), "probe" if probed else "given")
    if baseline:
        result.baseline_images_per_sec = round(_seed_pipeline(cfg, bundle, warmup, steps, dev), 1)
        result.speedup = round(ips / result.baseline_images_per_sec, 2)
    return result


def _execution(cfg: TrainConfig, device: str, precision: str, channels_last: bool | None,
               threads: int | None) -> tuple[TrainConfig, bool]:
    """``cfg`` with its execution decided: what the options leave open is decided as a training run decides it on
    this CPU, by the start-up probe (and whether the probe ran)."""
    dev, prec = prepare(device, precision, threads)
    probed = dev.type == "cpu" and (threads is None or precision == "auto" or channels_last is None)
    if probed:
        choice = tune.choose(cfg.arch, cfg.model_kwargs, 10, cfg.batch_size, cfg.input_size, threads=threads,
                             precision=None if precision == "auto" else prec, channels_last=channels_last).choice
        prec, channels_last = choice.precision, choice.channels_last
    cl = channels_last if channels_last is not None else default_channels_last(dev, prec)
    return dataclasses.replace(cfg, device=str(dev), precision=prec, channels_last=cl,
                               threads=torch.get_num_threads()), probed


def _eval_images_per_sec(run, device: torch.device, precision: str, steps: int) -> float:
    """Evaluation images/s of the run's model: a plain forward pass (no test-time augmentation) per batch."""
    net = run.eval_model()

    @torch.no_grad()
    def eval_step(x, y):
        with autocast(device, precision):
            net(x).argmax(1)

    net.eval()
    return _time_steps(eval_step, run.eval_batches["test"], 1, steps, device)


def _seed_pipeline(cfg: TrainConfig, data: DataBundle, warmup: int, steps: int, device: torch.device) -> float:
    """The seed tutorial's way: ImageFolder-style dataset, PIL transforms per image, DataLoader(num_workers=4),
    torch's SGD, fp32, NCHW, eager."""
    import warnings

    from torch.utils.data import DataLoader

    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 4 workers on fewer cores: as the seed
    files = Split(data.train.labels, data.classes, paths=data.train.paths)
    ds = _FileDataset(files, pil_transform(cfg.augment, True, cfg.input_size, data.mean, data.std))
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=4,
                        persistent_workers=True)
    model = create_model(cfg.arch, num_classes=len(data.classes), **cfg.model_kwargs).to(device)
    step = _plain_step(model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9))

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
    layout), measured by ``training.tune``'s step timer, fastest first, with the fraction of each one's GEMM roof."""
    from ..core.execution import cpu_has_bf16, usable_cores

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
