"""Sizes a ``--time-budget`` run: after a measurement window inside the warm-up (so no learning rate used so far
depends on the length), then again at every tenth of the run until 70 %, from the mean seconds per step since the
window began."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from ...core import distributed
from ...core.log import say
from ...inference.evaluate import tta_cost
from ..loop import GUARD_IMAGES, Hook, Run

BUDGET_MEASURE = (3, 8)  # time steps 3..10 (after the first, slow ones) to size a --time-budget run


BUDGET_RESERVE = 0.03  # keep 3 % of the budget for the unexpected (checkpoint writes, a slower stretch)


BUDGET_END_SECONDS = 2.0  # saving the model and leaving the process, after the final evaluation


EVAL_COST = 0.25  # an image's evaluation costs about a quarter of its training step (4.2x measured on the 2-core CPU,


# fp32); a run whose execution was probed uses the probe's measured ratio instead (~0.18 in bf16 for conv8m here)


MARKS_RESERVED = 3  # snapshot scorings a budget keeps time for when --accuracy-marks are asked for with it (the


# scoring goes newest first and stops below the lowest mark: 2-3 scorings in the 5-minute runs of issue 33)


def eval_seconds(eval_images: int, cfg: Any, seconds_per_step: float, eval_cost: float = EVAL_COST,
                 test_images: int | None = None) -> float:
    """Expected seconds of what follows training inside a budget, at ``eval_cost`` of a training image's share of
    the step per forward pass: the final evaluation (every view of every image: ``cfg.tta``, ``cfg.tta_fraction``),
    the eval-mode guard's plain pass over ``GUARD_IMAGES`` training images (when there is a split to evaluate) and,
    where ``cfg.accuracy_marks`` are asked for, ``MARKS_RESERVED`` scorings of the ``test_images`` (default
    ``eval_images``) at the final protocol."""
    views = tta_cost(cfg.tta, cfg.tta_fraction)
    marks = MARKS_RESERVED * (eval_images if test_images is None else test_images) if cfg.accuracy_marks else 0
    forward_passes = (eval_images + marks) * views + (GUARD_IMAGES if eval_images else 0)  # no split: no guard
    return forward_passes * seconds_per_step * eval_cost / cfg.batch_size


def size_to_budget(budget_seconds: float, elapsed: float, step: int, seconds_per_step: float,
                   eval_seconds: float, min_steps: int = 0) -> int:
    """Total steps that end a run, its final evaluation included, inside ``budget_seconds``.

    Args:
        budget_seconds: the whole run's budget.
        elapsed: seconds spent so far (since process start).
        step: steps done so far.
        seconds_per_step: measured training throughput.
        eval_seconds: expected cost of the final evaluation.
        min_steps: never fewer (e.g. the end of the warm-up, so the schedule anneals).
    """
    left = budget_seconds * (1 - BUDGET_RESERVE) - elapsed - eval_seconds - BUDGET_END_SECONDS
    return max(step + max(0, int(left / seconds_per_step)), step + 1, min_steps)


class TimeBudget(Hook):
    """Sizes a ``--time-budget`` run: after a measurement window inside the warm-up (so no learning rate used so far
    depends on the length), then again at every tenth of the run until 70 %, from the mean seconds per step since the
    window began. A drifting throughput moves the end a little rather than overrunning the budget.

    The clock is rank 0's; the decided length is broadcast, so every rank stops at the same step. A resumed run keeps
    the length it was sized to.
    """

    name = "time_budget"

    def __init__(self, minutes: float, clock: Callable[[], float] = time.perf_counter,
                 eval_cost: float | None = None) -> None:
        self.budget, self.clock = minutes * 60, clock
        self.eval_cost = eval_cost or EVAL_COST  # an image's evaluation over its training step
        self.total: int | None = None  # the decided length, once sized
        self.start_step, self.measure_start = 0, 0.0

    def on_fit_start(self, run: Run) -> None:
        self.start_step = run.step
        if self.total is not None:
            run.set_total_steps(self.total)

    def on_step_end(self, run: Run, loss: torch.Tensor, lr: float) -> None:
        done, first, window = run.step - self.start_step, BUDGET_MEASURE[0], sum(BUDGET_MEASURE)
        if self.total is not None and done < window:
            return  # sized before an interruption: keep that length
        if done == first:
            distributed.synchronize(run.device)
            self.measure_start = self.clock()
            return
        tenth = max(1, run.total_steps // 10)
        if done == window or (done > window and run.step % tenth == 0 and run.step < 0.7 * run.total_steps):
            distributed.synchronize(run.device)
            per_step = (self.clock() - self.measure_start) / (done - first)
            eval_images = sum(len(b.split) for b in run.eval_batches.values())
            test = run.eval_batches.get("test")
            after = eval_seconds(eval_images, run.cfg, per_step, self.eval_cost, len(test.split) if test else 0)
            warmup_steps = math.ceil(run.cfg.warmup * len(run.train_batches)) + 1
            total = size_to_budget(self.budget, self.clock() - run.clock, run.step, per_step, after, warmup_steps)
            self.total = distributed.broadcast_int(total, run.device)
            run.set_total_steps(self.total)
            if done == window:
                say(f"time budget {self.budget / 60:g} min: {per_step:.3f} s per step measured, so {self.total} "
                    f"steps ({self.total / len(run.train_batches):.1f} epochs)")

    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = state["total_steps"]
