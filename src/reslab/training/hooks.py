"""The training loop's stateful features, one small object each.

A hook sees the run at a few points of ``fit`` (``on_fit_start``, ``on_epoch_start``, ``on_step_end``,
``on_epoch_end``, ``on_fit_end``, ``close``) and owns whatever it remembers: ``state_dict`` goes into ``last.pt``
under the hook's ``name`` and comes back through ``load_state_dict`` on ``--resume``. The shape follows Lightning's
and fastai's callbacks and timm's ``ModelEmaV3``, smaller.

Under torchrun every rank runs every hook. A hook that decides something from a clock or a signal decides it once
(rank 0's clock, any rank's signal) and shares the decision, so all ranks take the same number of steps.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..core import distributed, rundir
from ..core.errors import UserError
from ..core.log import say
from ..core.progress import Progress
from ..inference.evaluate import evaluate_batches, tta_cost
from ..models.checkpoint import atomic_write, unwrap_model
from .loop import GUARD_IMAGES, Hook, Run

# --- weights ----------------------------------------------------------------------------------------------------------

class Lookahead(Hook):
    """Every ``every`` steps, move a running average toward the weights and reset the weights to the average.

    As in the airbench trainers (after Zhang et al. 2019, "Lookahead Optimizer"): the average's decay grows as
    (step/total)^3, so it does nothing early and smooths the weights late. BatchNorm running statistics are averaged
    too. Deviation from airbench, which ends on the average: at the last step the average is moved onto the weights
    (decay 0), so the run ends on the weights of its last step. The fast preset's published numbers used this.
    """

    name = "lookahead"
    every = 5

    def __init__(self, model: torch.nn.Module) -> None:
        self.tensors = [t for t in unwrap_model(model).state_dict().values() if t.is_floating_point()]
        self.average = [t.detach().clone() for t in self.tensors]

    @staticmethod
    def decay(step: int, total: int) -> float:
        """How much of the average survives an update at ``step`` of ``total``."""
        return 0.95 ** Lookahead.every * (step / total) ** 3 if step < total else 0.0

    def on_step_end(self, run: Run, loss: torch.Tensor, lr: float) -> None:
        self.update(run.step, run.total_steps)

    @torch.no_grad()
    def update(self, step: int, total: int) -> None:
        if step % self.every == 0 or step >= total:
            decay = self.decay(step, total)
            for a, t in zip(self.average, self.tensors):
                a.lerp_(t, 1 - decay)
                t.copy_(a)

    def state_dict(self) -> dict[str, Any]:
        return {"average": [a.detach().cpu() for a in self.average]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average = [a.to(t.device) for a, t in zip(state["average"], self.tensors)]


class WeightEma(Hook):
    """An exponential moving average of the weights (and BatchNorm statistics), evaluated and saved in place of the
    trained weights, as torchvision's ``--model-ema`` and timm's ``ModelEmaV3``. The decay warms up as
    min(decay, (1 + step) / (10 + step)) (timm's warm-up), so a short run is not dominated by its initial weights.
    """

    name = "ema"

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        plain = unwrap_model(model)
        self.decay, self.module = decay, copy.deepcopy(plain).eval().requires_grad_(False)
        pairs = list(zip(self.module.state_dict().values(), plain.state_dict().values()))
        self.average = [a for a, _ in pairs if a.is_floating_point()]
        self.live = [t for a, t in pairs if a.is_floating_point()]
        self.counters = [(a, t) for a, t in pairs if not a.is_floating_point()]  # BatchNorm's step counts

    @torch.no_grad()
    def on_step_end(self, run: Run, loss: torch.Tensor, lr: float) -> None:
        decay = min(self.decay, (1 + run.step) / (10 + run.step))
        torch._foreach_lerp_(self.average, self.live, 1 - decay)

    @torch.no_grad()
    def model_for_eval(self) -> torch.nn.Module:
        for a, t in self.counters:
            a.copy_(t)
        return self.module

    def state_dict(self) -> dict[str, Any]:
        return {"average": [a.detach().cpu() for a in self.average]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for a, saved in zip(self.average, state["average"]):
            a.copy_(saved)


class FrozenBackbone(Hook):
    """``--freeze``: only the classifier trains (its parameters alone require gradients, set in ``setup``); the
    backbone's BatchNorm layers stay in eval mode, so their statistics are the pretrained ones (a linear probe)."""

    name = "freeze"

    def on_epoch_start(self, run: Run) -> None:
        for m in unwrap_model(run.model).modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


class WhiteningBiasWindow(Hook):
    """``--whiten-bias-epochs N``: the whitening stem's bias trains for the first N epochs, then is held at its value
    (airbench trains it for 3 epochs only). Held by restoring it after every step rather than by ``requires_grad``,
    which a DistributedDataParallel model cannot change once wrapped."""

    name = "whiten_bias"

    def __init__(self, epochs: float) -> None:
        self.epochs = epochs
        self.held: torch.Tensor | None = None

    def on_step_end(self, run: Run, loss: torch.Tensor, lr: float) -> None:
        bias = unwrap_model(run.model).conv1.bias
        if self.held is None and run.step >= self.epochs * len(run.train_batches):
            self.held = bias.detach().clone()
        if self.held is not None:
            with torch.no_grad():
                bias.copy_(self.held)

    def state_dict(self) -> dict[str, Any]:
        return {"held": self.held}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.held = state["held"]


# --- time -------------------------------------------------------------------------------------------------------------

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


# --- records ----------------------------------------------------------------------------------------------------------

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


class _Null:
    def write(self, _text: str) -> None: ...

    def flush(self) -> None: ...


class MetricsLog(Hook):
    """One line per epoch in ``metrics.jsonl`` (rank 0), and TensorBoard scalars with ``--tensorboard``."""

    name = "metrics"

    def __init__(self, out: Path, tensorboard: bool) -> None:
        self.out, self.writer = out, _tensorboard_writer(out) if tensorboard else None

    def on_epoch_end(self, run: Run, metrics: dict[str, Any]) -> None:
        if not run.dist.main:
            return
        rundir.append_metrics(self.out, metrics)
        if self.writer is not None:
            for key, value in metrics.items():
                if key not in ("epoch", "step"):
                    self.writer.add_scalar(key, value, metrics["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install 'reslab[tensorboard]'") from None
    return SummaryWriter(log_dir=str(out))


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
