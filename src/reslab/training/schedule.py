"""The learning rate: a pure function of the step, so a resumed run continues exactly where it stopped and the
schedule of a run is known before it starts (StepLR of the seed tutorial, the paper's 32k/48k-iteration steps, cosine,
one-cycle, the fast trainers' linear decay)."""

from __future__ import annotations

import math

from ..config.schema import TrainConfig
from ..core.errors import ConfigError


def lr_at(step: int, cfg: TrainConfig, steps_per_epoch: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    ``step`` and ``multistep`` change the rate at whole units, as PyTorch's StepLR/MultiStepLR stepped once per
    epoch (or per iteration with ``schedule_unit=step``, as He et al. count 32k/48k iterations).
    """
    per_unit = steps_per_epoch if cfg.schedule_unit == "epoch" else 1
    unit = step // per_unit  # whole epochs (or steps) completed
    warmup_steps = cfg.warmup * per_unit
    if step < warmup_steps:  # linear warm-up from lr/10
        return cfg.lr * (0.1 + 0.9 * step / warmup_steps)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** math.floor(unit / cfg.step_size)
    if cfg.schedule == "multistep":
        return cfg.lr * cfg.gamma ** sum(unit >= m for m in cfg.milestones)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "onecycle":  # linear up over the first 30 %, then linear down to zero
        return cfg.lr * (progress / 0.3 if progress < 0.3 else max(0.0, (1 - progress) / 0.7))
    if cfg.schedule == "linear":  # linear down to zero at the last step (the fast trainers' schedule)
        return cfg.lr * max(0.0, 1 - progress)
    raise ConfigError(f"unknown schedule {cfg.schedule!r}")
