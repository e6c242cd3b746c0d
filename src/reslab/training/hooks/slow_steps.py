"""Says once, in one line, when training steps run much slower than the start-up probe measured: most often another
process has taken a core, which a run with several threads waits for at every step."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ...core.log import say
from ..loop import Hook, Run


class SlowSteps(Hook):
    """Says once, in one line, when training steps run much slower than the start-up probe measured: most often
    another process has taken a core, which a run with several threads waits for at every step."""

    name = "slow_steps"
    window, factor = 20, 2.0  # steps per look; how much slower is worth a word

    def __init__(self, expected_seconds: float, clock: Callable[[], float] = time.perf_counter) -> None:
        self.expected, self.clock = expected_seconds, clock
        self.t0, self.count, self.said = 0.0, 0, False

    def on_epoch_start(self, run: Run) -> None:
        self.t0, self.count = self.clock(), 0  # an epoch's end (evaluation, checkpoint) is not a step

    def on_step_end(self, run: Run, loss: torch.Tensor, lr: float) -> None:
        self.count += 1
        if self.said or self.count < self.window:
            return
        per_step = (self.clock() - self.t0) / self.count
        self.t0, self.count = self.clock(), 0
        if per_step > self.factor * self.expected:
            self.said = True
            hint = ("--threads 1 stops waiting for a busy core" if torch.get_num_threads() > 1 else
                    "fewer processes on this machine would help")
            say(f"warning: steps take {per_step:.3f} s, {per_step / self.expected:.1f}x the {self.expected:.3f} s "
                f"measured at the start: another process is probably using the cores; {hint}")
