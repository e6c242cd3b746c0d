"""SIGINT/SIGTERM end the run after the current step (the checkpointer saves it), not in the middle of one."""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch

from ...core import distributed
from ..loop import Hook, Run


class StopOnSignal(Hook):
    """SIGINT/SIGTERM end the run after the current step (the checkpointer saves it), not in the middle of one.

    Under torchrun the ranks agree every ``every`` steps (any rank's signal stops them all at the same step);
    alone, the flag is checked after every step, with no device synchronisation.
    """

    name = "signals"

    def __init__(self, every: int = 10) -> None:
        self.every, self.received, self.old = every, 0, {}

    def on_fit_start(self, run: Run) -> None:
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handler(self, signum: int, _frame: Any) -> None:
        self.received = signum

    def on_step_end(self, run: Run, loss: torch.Tensor, lr: float) -> None:
        received = self.received
        if run.dist.enabled:
            if run.step % self.every and run.step < run.total_steps:
                return
            received = distributed.max_int(received, run.device)
        if received:
            run.request_stop(signal.Signals(received).name)

    def on_epoch_end(self, run: Run, metrics: dict[str, Any]) -> None:
        """A signal that came during the evaluation stops the run here (the checkpointer saves this epoch)."""
        received = distributed.max_int(self.received, run.device) if run.dist.enabled else self.received
        if received:
            run.request_stop(signal.Signals(received).name)

    def close(self) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)
        self.old = {}
