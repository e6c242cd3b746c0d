"""``reslab lr-find``: the learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural
Networks", section 3.3; popularised by fastai's ``lr_find``).

The learning rate grows exponentially from ``start_lr`` to ``end_lr`` over ``steps`` optimizer steps of the real
recipe (the run's own batches, augmentation, optimizer, parameter groups and loss); the loss is smoothed by an
exponential moving average (bias-corrected, ``smoothing_for``) and the test stops once the smoothed loss exceeds
``DIVERGE`` times its minimum, or is not finite. The suggestion is the learning rate at the smoothed loss's minimum
divided by 10 (the rule of fastai's first ``lr_find``: the minimum itself is already too high to train at, a tenth
of it is still on the steep, learning part of the curve); the steepest descent is reported beside it. The network
trained is a copy: a model passed in is left exactly as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config.schema import TrainConfig
from ..core import distributed
from ..core.errors import ConfigError
from ..core.execution import default_channels_last, prepare
from ..core.progress import CountProgress
from ..data.loader import endless
from ..training import build
from ..training.loop import Run, train_step

DIVERGE = 4.0  # stop when the smoothed loss is this many times its minimum (fastai's rule)


def smoothing_for(steps: int) -> float:
    """Weight of the past in the loss's moving average: a window of ~4 % of the test (8 steps of 200). fastai's
    fixed 0.98 (a 50-step window) lags the loss by a quarter of a 200-step test, so its minimum lands almost two
    decades of lr late on a 1e-6..10 sweep; a window this short lags about a third of a decade."""
    return 1 - 1 / max(5.0, steps / 25)


@dataclass
class LrFindResult:
    """The range test's curve and what it suggests."""

    lrs: list[float]
    losses: list[float]  # raw, per step
    smoothed: list[float]
    suggested_lr: float  # the minimum's lr / 10
    min_loss_lr: float  # where the smoothed loss is lowest
    steepest_lr: float  # where it falls fastest (per decade of lr)
    rule: str
    stopped: str  # why the test ended
    preset_lr: float  # the config's own lr, for comparison
    arch: str
    batch_size: int
    smoothing: float  # the moving average's weight of the past
    files: list[str] = field(default_factory=list)


def smooth(losses: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average of ``losses``."""
    out, avg = [], 0.0
    for i, v in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float, float, float]:
    """(suggested lr, lr at the minimum, lr of the steepest descent) of a range test's curve."""
    if len(lrs) < 3:
        raise ConfigError(f"the range test ran {len(lrs)} steps: too few to read a curve (give more --range-steps)")
    low = min(range(len(smoothed)), key=smoothed.__getitem__)
    # Steepest descent per decade of lr, between the first tenth of the test (the average still settling) and the
    # minimum (after it the loss only rises).
    first = min(len(lrs) // 10, max(0, low - 1))
    slopes = {i: (smoothed[i + 1] - smoothed[i]) / (math.log10(lrs[i + 1]) - math.log10(lrs[i]))
              for i in range(first, max(first + 1, low))}
    steepest = lrs[min(slopes, key=slopes.__getitem__)]
    return lrs[low] / 10, lrs[low], steepest


def range_test(run: Run, start_lr: float, end_lr: float, steps: int, progress: bool = True) -> LrFindResult:
    """Train a copy of ``run``'s model with an exponentially growing learning rate; ``run`` itself is untouched."""
    check_range(start_lr, end_lr, steps)
    trial = copy.copy(run)  # the copy's model and optimizer are new objects; run's stay as they are
    trial.model = copy.deepcopy(run.model)
    trial.optimizer = build.build_optimizer(run.cfg, trial.model)
    trial.hooks = build.weight_hooks(run.cfg, trial.model)
    trial.model.train()
    lrs, losses, smoothed, beta, avg = [], [], [], smoothing_for(steps), 0.0
    stopped = f"reached --end-lr {end_lr:g}"
    bar = CountProgress(steps, "lr-find steps") if progress else None
    batches = endless(trial.train_batches)
    for i in range(steps):
        lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
        x, y = next(batches)
        loss, _, _ = train_step(trial, x, y, lr)
        trial.step += 1
        for hook in trial.hooks:
            hook.on_step_end(trial, loss, lr)
        value = loss.item()
        lrs.append(lr)
        losses.append(value)
        avg = beta * avg + (1 - beta) * value  # smooth(losses, beta), one step at a time
        smoothed.append(avg / (1 - beta ** len(losses)))
        if bar:
            bar.update(i + 1)
        if not math.isfinite(value) or smoothed[-1] > DIVERGE * min(smoothed):
            stopped = f"diverged at lr {lr:.3g} (smoothed loss over {DIVERGE:g}x its minimum)"
            break
    if bar:
        bar.done()
    finite = [k for k, v in enumerate(smoothed) if math.isfinite(v)]
    suggested, at_min, steepest = suggest([lrs[k] for k in finite], [smoothed[k] for k in finite])
    rule = "the lr at the smoothed loss's minimum, divided by 10"
    if suggested < start_lr:  # the minimum came within a decade of the start: the curve never showed the fall
        rule += (f"; it is below --start-lr {start_lr:g}, where the test never looked: start lower (e.g. "
                 f"--start-lr {start_lr / 100:g}) to see the loss fall before trusting it")
    return LrFindResult(lrs, losses, smoothed, suggested, at_min, steepest, rule, stopped, run.cfg.lr,
                        run.cfg.arch, run.cfg.batch_size, beta)


def lr_find(cfg: TrainConfig, out: str | Path, start_lr: float = 1e-6, end_lr: float = 10.0,
            steps: int = 200) -> LrFindResult:
    """The range test on ``cfg``'s data and recipe (its preset, augmentation, optimizer, pretrained weights), built
    as ``reslab train`` builds a run; writes ``lr_find.json`` and ``lr_find.png`` into ``out``."""
    folder = check_output_dir(out)
    check_range(start_lr, end_lr, steps)  # before the data loads
    device, precision = prepare(cfg.device, cfg.precision, cfg.threads)
    channels_last = cfg.channels_last if cfg.channels_last is not None else default_channels_last(device, precision)
    torch.manual_seed(cfg.seed)
    cfg, data, pretrained = build.build_data(cfg, distributed.Dist(), None, folder, False)
    cfg = dataclasses.replace(cfg, precision=precision, channels_last=channels_last)
    result = range_test(build.bare_run(cfg, data, device, precision, pretrained), start_lr, end_lr, steps)
    from .plots import plot_lr_find

    folder.mkdir(parents=True, exist_ok=True)
    result.files = [str(folder / "lr_find.json"), str(folder / "lr_find.png")]
    plot_lr_find(result, folder / "lr_find.png")
    (folder / "lr_find.json").write_text(json.dumps(dataclasses.asdict(result), indent=1))
    return result


def check_range(start_lr: float, end_lr: float, steps: int) -> None:
    """The range test's own options, in one line each."""
    if not 0 < start_lr < end_lr:
        raise ConfigError(f"the range test needs 0 < --start-lr < --end-lr, got {start_lr:g} and {end_lr:g}")
    if steps < 3:
        raise ConfigError(f"--range-steps must be at least 3 (a curve to read), got {steps}")


def check_output_dir(out: str | Path) -> Path:
    """``out`` as a folder for the test's files: refused when it is a file or holds a training run."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file; lr-find writes a folder (lr_find.json, lr_find.png)")
    if (folder / "config.yaml").exists():
        raise ConfigError(f"--out {folder} holds a training run; give lr-find a folder of its own")
    return folder
