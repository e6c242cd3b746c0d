"""Execution choices measured, not assumed: CPU threads, precision and memory format by a short probe.

What is fast differs between CPUs and with what else the machine is doing: bf16 is ~2x fp32 where the CPU has it
natively and ~100x slower where it is emulated; two threads are ~2x one on an idle 2-core machine and 3-12x *slower*
while another process keeps one core busy (OpenMP threads wait for the one that shares a core). So ``--threads``,
``--precision`` and ``--channels-last`` left to reslab on the CPU are decided by timing the real training step (the
real model at the real batch size on random data, a few steps per candidate) at the start of a run long enough to
pay for it. The answer is cached per (CPU model, torch version, model, batch size, image size, cores) in the user
cache; a cached answer is re-checked against the other thread count at every start (two short timings), because
a busy machine must not inherit an idle machine's answer, nor the reverse.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.execution import autocast, cpu_has_bf16, usable_cores

PROBE_MIN_STEPS = 200  # a shorter run does not pay for a ~5 s probe: it keeps the static defaults
PROBE_STEPS, PROBE_WARMUP = 2, 1  # timed and untimed steps per candidate (the first step builds oneDNN kernels)
PROBE_GIVE_UP = 2.0  # a candidate whose untimed first step is this much slower than the best step so far has lost
RECHECK_SLOWER = 1.3  # a re-check this much slower than the cached rate probes everything again
CACHE_FILE = "tune.json"


@dataclass(frozen=True)
class Choice:
    """One way to execute the training step on the CPU."""

    threads: int
    precision: str
    channels_last: bool

    def describe(self) -> str:
        return f"{self.threads} thread{'s' * (self.threads > 1)} {self.precision} " \
               f"{'channels-last' if self.channels_last else 'NCHW'}"


@dataclass
class Decision:
    """The choice made, and the measured seconds per step of every candidate timed for it."""

    choice: Choice
    seconds: dict[Choice, float] = field(default_factory=dict)
    source: str = "probe"  # probe | cache (re-checked)
    eval_cost: float | None = None  # an image's evaluation forward pass over its training step, where measured

    @property
    def seconds_per_step(self) -> float:
        return self.seconds[self.choice]

    def line(self, batch_size: int) -> str:
        """``measured: 2 threads bf16 channels-last 2,950 img/s (1 thread 1,490, fp32 1,320)``."""
        best = self.choice
        others = []
        for c, s in sorted(self.seconds.items(), key=lambda kv: kv[1]):
            if c == best:
                continue
            diff = [f"{c.threads} thread{'s' * (c.threads > 1)}" if c.threads != best.threads else "",
                    c.precision if c.precision != best.precision else "",
                    ("channels-last" if c.channels_last else "NCHW") if c.channels_last != best.channels_last else ""]
            others.append(f"{' '.join(d for d in diff if d)} {batch_size / s:,.0f}")
        said = f"measured: {best.describe()} {batch_size / self.seconds_per_step:,.0f} img/s"
        said += f" ({', '.join(others)})" if others else ""
        return said + (" [cached answer, re-checked]" if self.source == "cache" else "")


def candidates(cores: int, bf16: bool, threads: int | None = None, precision: str | None = None,
               channels_last: bool | None = None) -> list[Choice]:
    """Every combination left open: threads 1 or all ``cores``, fp32 or (native only) bf16, either layout.
    An argument that is not None is fixed at that value."""
    thread_options = [threads] if threads else sorted({1, cores})
    precisions = [precision] if precision else (["bf16", "fp32"] if bf16 else ["fp32"])
    layouts = [channels_last] if channels_last is not None else [True, False]
    return [Choice(t, p, cl) for t in thread_options for p in precisions for cl in layouts]


def decide(options: Sequence[Choice], measure: Callable[[Choice], float]) -> Decision:
    """The fastest of ``options`` by ``measure`` (seconds per step), searched in two stages to keep it short:
    precision and layout at the most threads, then the thread counts with the winner's precision and layout."""
    seconds: dict[Choice, float] = {}
    most = max(c.threads for c in options)
    for c in [c for c in options if c.threads == most]:
        seconds[c] = measure(c)
    lead = min(seconds, key=seconds.get)
    for c in options:
        if c.threads != most and (c.precision, c.channels_last) == (lead.precision, lead.channels_last):
            seconds[c] = measure(c)
    return _decision(seconds, measure, "probe")


def _decision(seconds: dict[Choice, float], measure: Callable[[Choice], float], source: str) -> Decision:
    """The fastest of the timed choices, with its evaluation cost where ``measure`` recorded one."""
    best = min(seconds, key=seconds.get)
    return Decision(best, seconds, source, getattr(measure, "eval_costs", {}).get(best))


def recheck(cached: Choice, cached_seconds: float, options: Sequence[Choice],
            measure: Callable[[Choice], float]) -> Decision:
    """Time the cached choice and the same choice at the other thread count; probe everything again when the
    cached choice is now much slower than it was (the machine changed, or is busier)."""
    seconds = {cached: measure(cached)}
    if seconds[cached] > RECHECK_SLOWER * cached_seconds:
        return decide(options, measure)
    for c in options:
        if c.threads != cached.threads and (c.precision, c.channels_last) == (cached.precision, cached.channels_last):
            seconds[c] = measure(c)
    return _decision(seconds, measure, "cache")


def step_timer(arch: str, model_kwargs: dict, num_classes: int, batch_size: int, image_size: int,
               device: torch.device | None = None,
               clock: Callable[[], float] = time.perf_counter) -> Callable[[Choice], float]:
    """A ``measure`` function: seconds per training step (forward, loss, backward, SGD update) of a fresh ``arch``
    on random data under a candidate choice. Runs under a forked RNG, so the run's own seeds are untouched. It also
    times one evaluation forward pass of the batch and keeps its ratio to the step in ``measure.eval_costs``. A
    candidate whose untimed first step is already ``PROBE_GIVE_UP`` times the best step so far is not timed further
    (the first step's time is returned: it has lost), which keeps a probe on a busy machine short."""
    from ..core.distributed import synchronize
    from ..models import create_model
    from .optim import SGD

    device = device or torch.device("cpu")

    def measure(choice: Choice) -> float:
        if device.type == "cpu":
            torch.set_num_threads(choice.threads)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            model = create_model(arch, num_classes=num_classes, **model_kwargs)
            fmt = torch.channels_last if choice.channels_last else torch.contiguous_format
            model = model.to(device, memory_format=fmt).train()
            opt = SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
            x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=fmt)
            y = torch.randint(0, num_classes, (batch_size,), device=device)
            t0 = clock()
            for i in range(PROBE_WARMUP + PROBE_STEPS):
                if i == PROBE_WARMUP:
                    synchronize(device)
                    if clock() - t0 > PROBE_GIVE_UP * measure.best:  # cannot win: its first step says so
                        return clock() - t0
                    t0 = clock()
                with autocast(device, choice.precision):
                    loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            synchronize(device)
            seconds = (clock() - t0) / PROBE_STEPS
            measure.best = min(measure.best, seconds)
            model.eval()
            with torch.no_grad(), autocast(device, choice.precision):
                model(x)  # the first eval-mode pass builds its kernels
                synchronize(device)
                t0 = clock()
                model(x)
                synchronize(device)
            measure.eval_costs[choice] = (clock() - t0) / seconds
            return seconds

    measure.eval_costs = {}  # type: ignore[attr-defined]
    measure.best = float("inf")  # type: ignore[attr-defined]
    return measure


def cache_key(arch: str, batch_size: int, image_size: int, cores: int) -> str:
    """What an answer depends on: the CPU model, torch, the model and its batch, and the cores available."""
    return "|".join([cpu_model(), torch.__version__, arch, str(batch_size), str(image_size), str(cores)])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_path() -> Path:
    from ..data.cache import cache_dir

    return cache_dir() / CACHE_FILE


def read_cache(key: str) -> tuple[Choice, float] | None:
    """The cached choice and its seconds per step for ``key``, or None (also for a damaged file)."""
    try:
        entry = json.loads(_cache_path().read_text())[key]
        choice = Choice(int(entry["threads"]), str(entry["precision"]), bool(entry["channels_last"]))
        seconds = float(entry["seconds_per_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # A hand-edited or foreign entry is measured again, never obeyed (100,000 threads crash torch).
    if not (1 <= choice.threads <= usable_cores() and choice.precision in ("fp32", "bf16")
            and math.isfinite(seconds) and seconds > 0):
        return None
    return choice, seconds


def write_cache(key: str, decision: Decision) -> None:
    """Record ``decision`` under ``key`` (atomically; an unwritable cache is skipped: the probe still decided)."""
    path = _cache_path()
    try:
        entries = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}
    entries[key] = {**asdict(decision.choice), "seconds_per_step": decision.seconds_per_step,
                    "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=1))
        tmp.replace(path)
    except OSError:
        pass


def choose(arch: str, model_kwargs: dict, num_classes: int, batch_size: int, image_size: int, *,
           threads: int | None, precision: str | None, channels_last: bool | None,
           measure: Callable[[Choice], float] | None = None, cores: int | None = None) -> Decision:
    """Decide what ``threads``/``precision``/``channels_last`` leave open (None) for training ``arch`` on this CPU:
    from the cache, re-checked, or by a full probe; the decision is cached. The chosen thread count is set.
    ``cores``: the cores this process may use (default: all it may run on; under torchrun, its share)."""
    cores = cores or usable_cores()
    options = candidates(cores, cpu_has_bf16(), threads, precision, channels_last)
    measure = measure or step_timer(arch, model_kwargs, num_classes, batch_size, image_size)
    fixed = (threads, precision, channels_last)
    key = cache_key(arch, batch_size, image_size, cores) + "|" + json.dumps(fixed)
    cached = read_cache(key)
    if cached is not None and cached[0] in options:
        decision = recheck(cached[0], cached[1], options, measure)
    else:
        decision = decide(options, measure)
    write_cache(key, decision)
    torch.set_num_threads(decision.choice.threads)
    return decision
