"""The progress line on stderr (rank 0 only)."""

from __future__ import annotations

import sys
from typing import Any

import torch

from ...core.progress import Progress
from ..loop import Hook, Run
from .metrics_log import _Null


class ProgressLog(Hook):
    """The progress line on stderr (rank 0 only)."""

    name = "progress"

    def __init__(self, every: int) -> None:
        self.every, self.progress = every, None

    def on_fit_start(self, run: Run) -> None:
        self.progress = Progress(run.total_steps, every=self.every, start=run.step,
                                 stream=sys.stderr if run.dist.main else _Null())

    def on_step_end(self, run: Run, loss: torch.Tensor, lr: float) -> None:
        self.progress.total = run.total_steps  # a time budget may have re-sized the run
        self.progress.update(run.step, loss, lr, run.meter.images_per_sec())

    def on_epoch_end(self, run: Run, metrics: dict[str, Any]) -> None:
        self.progress.epoch_done(metrics)
