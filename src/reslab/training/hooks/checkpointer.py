"""Writes ``last.pt`` at every epoch's end, every ``every`` steps, every ``minutes`` of training, and when the run is
asked to stop; with ``keep``, also the last ``keep`` of them as ``checkpoints/step-NNNNNNNN.pt``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from ...core import distributed, rundir
from ...core.log import say
from ..loop import Hook, Run


class Checkpointer(Hook):
    """Writes ``last.pt`` at every epoch's end, every ``every`` steps, every ``minutes`` of training, and when the
    run is asked to stop; with ``keep``, also the last ``keep`` of them as ``checkpoints/step-NNNNNNNN.pt``.

    Under torchrun rank 0's clock decides the time-based ones, broadcast every ``AGREE_EVERY`` steps, so that a
    checkpoint is taken at the same step on every rank."""

    name = "checkpointer"
    AGREE_EVERY = 10

    def __init__(self, every: int = 0, minutes: float | None = None, keep: int = 0) -> None:
        self.every, self.minutes, self.keep = every, minutes, keep
        self.last = time.perf_counter()
        self.kept: list[str] = []  # the names in checkpoints/ this run wrote, oldest first
        self.refused: set[str] = set()

    def _time_due(self, run: Run) -> bool:
        if not self.minutes:
            return False
        due = time.perf_counter() - self.last >= 60 * self.minutes
        if run.dist.enabled:
            if run.step % self.AGREE_EVERY:
                return False
            due = bool(distributed.broadcast_int(int(due), run.device))
        return due

    def on_step_end(self, run: Run, loss: torch.Tensor, lr: float) -> None:
        if run.stop or (self.every and run.step % self.every == 0) or self._time_due(run):
            self._save(run)

    def on_epoch_end(self, run: Run, metrics: dict[str, Any]) -> None:
        self._save(run)

    def _save(self, run: Run) -> None:
        target = run.out / rundir.HISTORY_DIR / f"step-{run.step:08d}.pt"
        keep = self.keep and run.dist.main and self._may_write(target)
        if keep and target.name not in self.kept:
            self.kept.append(target.name)  # before the save, so the checkpoint's own list names it
        run.save_checkpoint()
        self.last = time.perf_counter()
        if keep:
            target.parent.mkdir(exist_ok=True)
            target.unlink(missing_ok=True)
            os.link(run.out / rundir.CHECKPOINT_FILE, target)  # last.pt is replaced by a rename: the link keeps it
            # Only the files this rotation made (recorded in the checkpoint) take a slot or are deleted: a user's
            # file in checkpoints/, whatever its name, is left alone.
            for name in self.kept[:-self.keep]:
                (target.parent / name).unlink(missing_ok=True)
            self.kept = self.kept[-self.keep:]

    def _may_write(self, target: Path) -> bool:
        if target.exists() and target.name not in self.kept:
            if target.name not in self.refused:
                say(f"warning: {target} exists and this run did not write it: left as it is, not kept")
                self.refused.add(target.name)
            return False
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"kept": list(self.kept)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept = [str(n) for n in state.get("kept", [])]
