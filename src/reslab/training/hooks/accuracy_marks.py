"""When test accuracy first reached each ``--accuracy-marks`` level, without slowing training."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ...core import distributed, rundir
from ...core.log import say
from ...inference.evaluate import evaluate_batches
from ...models.checkpoint import atomic_write, unwrap_model
from ..loop import Hook, Run
from .time_budget import BUDGET_END_SECONDS


class AccuracyMarks(Hook):
    """When test accuracy first reached each ``--accuracy-marks`` level, without slowing training.

    The weights are snapshotted at every tenth of the run (a file in ``snapshots/``, a few ms) and scored after
    training, from the last backwards until one is below every mark: accuracy rises as the learning rate anneals, so
    the time resolution is a tenth of the run. Inside a ``--time-budget`` the scoring is part of the budget: the run
    keeps ``MARKS_RESERVED`` scorings' time for it and the scoring stops before it would pass the budget. Times count
    from process start, like the budget. The snapshot list is part of the checkpoint, so marks survive a resume.
    """

    name = "accuracy_marks"

    def __init__(self, marks: list[float], out: Path, clock: Callable[[], float] = time.perf_counter) -> None:
        self.marks, self.folder, self.clock = sorted(marks), out / "snapshots", clock
        self.snapshots: list[tuple[float, int, str]] = []  # (seconds, step, file name)

    def on_step_end(self, run: Run, loss: torch.Tensor, lr: float) -> None:
        if run.step % max(1, run.total_steps // 10) or run.step >= run.total_steps:
            return
        name = f"step-{run.step:07d}.pt"
        if run.dist.main:
            self.folder.mkdir(exist_ok=True)
            weights = {k: v.detach().cpu() for k, v in unwrap_model(run.model).state_dict().items()}
            atomic_write(self.folder / name, lambda f: torch.save(weights, f))
        self.snapshots.append((round(run.seconds(), 2), run.step, name))

    @torch.no_grad()
    def on_fit_end(self, run: Run, metrics: dict[str, Any]) -> None:
        distributed.barrier()  # rank 0 wrote the snapshot files every rank reads
        plain = unwrap_model(run.model)
        current = {k: v.clone() for k, v in plain.state_dict().items()}
        scored = [(metrics["wall_seconds"], metrics["step"], metrics.get("test_acc"))]
        t0 = self.clock()
        test = run.eval_batches.get("test")
        # Inside a --time-budget the scoring stops before the next one would end past the budget (it was given
        # MARKS_RESERVED scorings' time): a mark is then known to have been reached by the earliest scored snapshot.
        deadline = run.clock + run.cfg.time_budget * 60 - BUDGET_END_SECONDS if run.cfg.time_budget else math.inf
        complete = True
        if test is not None and scored[0][2] is not None and scored[0][2] >= self.marks[0]:
            # Files can be gone when a finished run is resumed after its scoring removed them: score what is left.
            for seconds, step, name in reversed([s for s in self.snapshots if (self.folder / s[2]).is_file()]):
                started = self.clock()
                if len(scored) > 1 and started + (started - t0) / (len(scored) - 1) > deadline:
                    complete = False
                    break
                plain.load_state_dict(torch.load(self.folder / name, map_location=run.device, weights_only=True))
                acc = evaluate_batches(plain, test, run.device, run.precision, len(run.data.classes),
                                       run.cfg.tta, run.cfg.tta_fraction).accuracy
                scored.append((seconds, step, acc))
                if acc < self.marks[0]:
                    break
            plain.load_state_dict(current)
        result = {}
        for mark in self.marks:
            reached = [(sec, st, acc) for sec, st, acc in scored if acc is not None and acc >= mark]
            sec, st, acc = min(reached) if reached else (None, None, None)
            result[f"{mark:g}"] = {"seconds": sec, "step": st, "test_acc": acc}
        metrics["accuracy_marks"] = result
        distributed.barrier()
        if not run.dist.main:
            return
        shutil.rmtree(self.folder, ignore_errors=True)  # scored: the marks are the record
        seconds = round(self.clock() - t0, 1)
        rundir.append_metrics(run.out, {"accuracy_marks": result, "snapshots_scored": len(scored) - 1,
                                        "scoring_seconds": seconds, "scoring_complete": complete})
        for mark, r in result.items():
            when = f"{r['seconds']:.0f} s (step {r['step']}, {r['test_acc']:.4f})" if r["seconds"] else "not reached"
            say(f"test accuracy {float(mark):.0%}: {when}{'' if complete or not r['seconds'] else ' or earlier'}")
        said = "" if complete else "; stopped there to end inside the time budget"
        say(f"(accuracy marks scored on {len(scored) - 1} weight snapshots after training, {seconds} s{said})")

    def state_dict(self) -> dict[str, Any]:
        return {"snapshots": [list(s) for s in self.snapshots]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshots = [(float(s), int(st), str(n)) for s, st, n in state["snapshots"]]
