"""The training loop: ``fit`` runs a built ``Run`` to its end. Read it top to bottom.

The loop is batch -> forward -> loss -> backward -> step -> hooks; the learning rate is a pure function of the step
(``schedule.lr_at``). Everything that remembers something across steps is a ``Hook`` (``hooks/``, one per file)
that saves its own state into ``last.pt``; a hook changes the run only through ``Run.request_stop`` and
``Run.set_total_steps``.

Imports: models, data, evaluation, checkpoints, the run directory; never ``hooks``, ``build`` or ``train``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config.schema import TrainConfig
from ..core import distributed, rundir
from ..core.errors import Interrupted, UserError
from ..core.execution import autocast
from ..core.log import say
from ..data import Batches, DataBundle, mix_seed
from ..data.extras import mix_batch
from ..inference.evaluate import evaluate_batches, recalibrate_bn
from ..models.checkpoint import save_checkpoint, save_model, unwrap_model
from .optim import SGD, Chain
from .schedule import lr_at

# --- what the loop carries ----------------------------------------------------------------------------------------

class Hook:
    """A training feature with its own state. Every method is optional; the defaults do nothing."""

    name = "hook"

    def on_fit_start(self, run: Run) -> None: ...

    def on_epoch_start(self, run: Run) -> None:
        """After ``model.train()``, before the epoch's first step."""

    def on_step_end(self, run: Run, loss: torch.Tensor, lr: float) -> None: ...

    def on_epoch_end(self, run: Run, metrics: dict[str, Any]) -> None: ...

    def on_fit_end(self, run: Run, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None:
        """Release what the hook holds (signal handlers, files), after success or failure."""

    def model_for_eval(self) -> torch.nn.Module | None:
        """The model to evaluate and save instead of the trained one (an average of it), or None."""
        return None

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class EpochMeter:
    """The running epoch's training loss, accuracy and time, summed on the device (no synchronisation per step),
    and the first step whose loss was not finite. Part of the checkpoint, so a resumed epoch reports all of itself."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), dtype=torch.long, device=self.device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self.seen, self.seconds, self.lr, self.t0 = 0, 0.0, 0.0, time.perf_counter()

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self.t0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, step: int, lr: float) -> None:
        loss = loss.detach().float()
        self.loss_sum += loss * len(y)
        self.correct += (logits.argmax(1) == y).sum()
        self.first_bad = torch.where(torch.isfinite(loss) | (self.first_bad >= 0), self.first_bad, step)
        self.seen, self.lr = self.seen + len(y), lr

    def images_per_sec(self) -> float:
        return self.seen / max(self.elapsed(), 1e-9)

    def first_nonfinite_step(self) -> int | None:
        """The step whose loss first was NaN or infinite, or None (one synchronisation with the device)."""
        bad = int(self.first_bad.item())
        return bad if bad >= 0 else None

    def summary(self) -> dict[str, Any]:
        """Loss, accuracy and speed of the epoch, summed over all ranks."""
        loss_sum, correct, seen = distributed.all_sum(self.loss_sum, self.correct,
                                                      torch.tensor(self.seen, device=self.device))
        seen, seconds = max(1, int(seen.item())), self.elapsed()
        return {"train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen, "lr": self.lr,
                "seconds": round(seconds, 3), "images_per_sec": round(seen / seconds, 1)}

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum.cpu(), "correct": self.correct.cpu(), "seen": self.seen,
                "seconds": self.elapsed(), "lr": self.lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum, self.correct = state["loss_sum"].to(self.device), state["correct"].to(self.device)
        self.seen, self.seconds, self.lr = state["seen"], state["seconds"], state["lr"]


@dataclass
class Run:
    """Everything ``fit`` needs, built by ``setup``; ``step``, ``total_steps``, ``stop`` and ``meter`` change."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    precision: str
    dist: distributed.Dist
    data: DataBundle
    train_batches: Batches
    eval_batches: dict[str, Batches]
    model: nn.Module  # possibly wrapped (DDP, compile); save ``unwrap_model(model)``
    optimizer: torch.optim.Optimizer | SGD | Chain
    scaler: torch.amp.GradScaler | None
    meta: dict[str, Any]
    hooks: list[Hook]
    clock: float  # time.perf_counter() at the (first) process start: the origin of --time-budget and marks
    step: int = 0
    total_steps: int = 0
    stop: str | None = None  # set through request_stop: end after this step (a signal's name)
    meter: EpochMeter = None  # type: ignore[assignment]
    last_metrics: dict[str, Any] = field(default_factory=dict)
    loss_weight: torch.Tensor | None = None  # per-class weights of the loss (--balance loss)
    # (model, its state before the final eval-mode guard recomputed its BatchNorm statistics): the checkpoint keeps
    # the statistics training left, so that a run continued from it goes on exactly as one never stopped
    repaired: tuple[nn.Module, dict[str, torch.Tensor]] | None = None

    def request_stop(self, reason: str) -> None:
        """End the run after the current step (or epoch end), saving a checkpoint: a hook's call (a signal's name)."""
        self.stop = reason

    def set_total_steps(self, total: int) -> None:
        """Re-size the run (the time budget's call); the learning-rate schedule follows the new length."""
        self.total_steps = total

    def eval_model(self) -> nn.Module:
        """What is evaluated and saved: a hook's average of the weights (--ema), else the trained model."""
        averaged = [m for h in self.hooks if (m := h.model_for_eval()) is not None]
        return averaged[0] if averaged else unwrap_model(self.model)

    def seconds(self) -> float:
        """Seconds since the run's process started (a resumed run counts on from its checkpoint)."""
        return time.perf_counter() - self.clock

    def raise_if_nonfinite(self) -> None:
        bad = self.meter.first_nonfinite_step()
        if bad is not None:
            epoch = math.ceil(bad / len(self.train_batches))
            raise UserError(f"the loss became non-finite at step {bad} (epoch {epoch}, lr {self.meter.lr:.3g}); "
                            f"try a lower --lr{self._last_good()}")

    def interrupted(self) -> Interrupted:
        """What a stop request ends the run with (the checkpointer has saved this step)."""
        rest = " (it only finishes: training is done)" if self.step >= self.total_steps else ""
        return Interrupted(f"{self.stop} received: stopped after step {self.step} and saved "
                           f"{self.out / rundir.CHECKPOINT_FILE}; continue with: reslab train --resume {self.out}"
                           f"{rest}")

    def _last_good(self) -> str:
        ckpt = self.out / rundir.CHECKPOINT_FILE
        return f"; the last good checkpoint is {ckpt}" if ckpt.is_file() else " (no checkpoint was written yet)"

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to resume: plain containers and tensors only (loadable with weights_only)."""
        if self.repaired is None:
            return self._state()
        model, before = self.repaired
        after = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(before)
        try:
            return copy.deepcopy(self._state())  # copies, not views of the model repaired again below
        finally:
            model.load_state_dict(after)

    def _state(self) -> dict[str, Any]:
        return {"model": {k: v.detach().cpu() for k, v in unwrap_model(self.model).state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "step": self.step, "total_steps": self.total_steps, "wall_seconds": self.seconds(),
                "meter": self.meter.state_dict(), "last_metrics": self.last_metrics,
                "hooks": {h.name: state for h in self.hooks if (state := h.state_dict()) is not None},
                "config": self.cfg.to_dict(), "meta": self.meta, "rng": {"torch": torch.get_rng_state()}}

    def save_checkpoint(self) -> None:
        """Write ``last.pt`` (rank 0), unless the run went non-finite: a checkpoint is only ever a good one."""
        self.raise_if_nonfinite()
        if not self.dist.main:
            return
        if not all(torch.isfinite(p).all() for p in unwrap_model(self.model).parameters()):
            raise UserError(f"the weights became non-finite at step {self.step}; try a lower --lr"
                            f"{self._last_good()}")
        save_checkpoint(self.out / rundir.CHECKPOINT_FILE, self.checkpoint_state())


@dataclass
class TrainResult:
    """What a finished run reports: its directory and the last epoch's metrics."""

    out: Path
    epoch: int
    step: int
    train_loss: float
    train_acc: float
    wall_seconds: float
    test_loss: float | None = None
    test_acc: float | None = None
    val_loss: float | None = None
    val_acc: float | None = None
    accuracy_marks: dict[str, Any] | None = None


# --- the loop ---------------------------------------------------------------------------------------------------------

def fit(run: Run) -> TrainResult:
    """Train until ``run.total_steps``, evaluating and checkpointing at every epoch's end; save the model."""
    steps_per_epoch = len(run.train_batches)
    for hook in run.hooks:
        hook.on_fit_start(run)
    try:
        while True:
            # An epoch ends at its last batch, or where the run ends; a resume may land exactly there.
            if run.meter.seen and (run.step % steps_per_epoch == 0 or run.step >= run.total_steps):
                _end_epoch(run)
                if run.stop:  # a signal during the epoch's end (its evaluation): stop before the model is written
                    raise run.interrupted()
            if run.step >= run.total_steps:
                break
            _train_epoch(run)
        if run.dist.main:
            save_model(run.out / rundir.MODEL_FILE, run.eval_model(), run.meta)
        metrics = dict(run.last_metrics)
        for hook in run.hooks:  # after the model file: work here (scoring marks) is outside a time budget
            hook.on_fit_end(run, metrics)
    finally:
        for hook in run.hooks:
            hook.close()
    distributed.barrier()  # every rank returns once the model file exists
    fields = set(TrainResult.__dataclass_fields__) - {"out"}
    return TrainResult(out=run.out, **{k: v for k, v in metrics.items() if k in fields})


def _train_epoch(run: Run) -> None:
    """Train from ``run.step`` to the end of its epoch, the end of the run, or a stop request."""
    epoch, first = divmod(run.step, len(run.train_batches))
    run.model.train()
    for hook in run.hooks:
        hook.on_epoch_start(run)
    run.meter.start()
    for x, y in run.train_batches.epoch(epoch, start=first):
        step(run, x, y)
        if run.stop:
            raise run.interrupted()
        if run.step >= run.total_steps:
            break


def step(run: Run, x: torch.Tensor, y: torch.Tensor) -> None:
    """One step of the loop (what ``reslab bench`` times): ``train_step``, the meter, the hooks."""
    loss, logits, lr = train_step(run, x, y)
    run.step += 1
    run.meter.add(loss, logits, y, run.step, lr)
    if run.step % run.cfg.log_every == 0:  # finiteness costs a device sync: checked here and before checkpoints
        run.raise_if_nonfinite()
    for hook in run.hooks:
        hook.on_step_end(run, loss, lr)


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor,
               lr: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimizer step on the batch ``(x, y)`` at ``run.step``: the learning rate (``lr``, else the schedule's),
    MixUp/CutMix, forward and loss under autocast, backward, clipping, update. Returns the loss, the logits and the
    learning rate."""
    cfg, opt = run.cfg, run.optimizer
    if lr is None:
        lr = lr_at(run.step, cfg, len(run.train_batches), run.total_steps)
    for group in opt.param_groups:
        group["lr"] = lr * group["lr_scale"]
    target = y
    if cfg.mixup or cfg.cutmix:  # drawn from (seed, step): the same mix on resume
        g = torch.Generator().manual_seed(mix_seed(cfg.seed, run.step, 2))
        x, target = mix_batch(x, y, len(run.data.classes), cfg.mixup, cfg.cutmix, g)
    with autocast(run.device, run.precision):
        logits = run.model(x)
        loss = F.cross_entropy(logits, target, weight=run.loss_weight, label_smoothing=cfg.label_smoothing)
    opt.zero_grad(set_to_none=True)
    _backward_and_step(run, loss)
    return loss, logits, lr


def _backward_and_step(run: Run, loss: torch.Tensor) -> None:
    """Gradients (scaled under fp16, so small ones do not underflow), optional clipping, the optimizer step."""
    clip = run.cfg.clip_grad
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        if clip:
            run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(run.model.parameters(), clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(run.model.parameters(), clip)
        run.optimizer.step()


def _end_epoch(run: Run) -> None:
    """Summarise the epoch's training, evaluate when due, then the hooks log and checkpoint it."""
    run.raise_if_nonfinite()
    epoch = math.ceil(run.step / len(run.train_batches))
    metrics = {"epoch": epoch, "step": run.step, **run.meter.summary()}
    run.meter.reset()
    if run.step >= run.total_steps or (run.cfg.eval_every and epoch % run.cfg.eval_every == 0):
        plain = run.eval_model()  # not the DDP wrapper: ranks score shards of different lengths
        distributed.sync_buffers(plain)
        if run.step >= run.total_steps:
            _check_eval_mode(run, plain, metrics["train_acc"])
        for name, batches in run.eval_batches.items():
            s = evaluate_batches(plain, batches, run.device, run.precision, len(run.data.classes), run.cfg.tta,
                                 run.cfg.tta_fraction)
            metrics.update({f"{name}_loss": s.loss, f"{name}_acc": s.accuracy})
    metrics["wall_seconds"] = round(run.seconds(), 2)  # since process start
    run.last_metrics = metrics
    for hook in run.hooks:
        hook.on_epoch_end(run, metrics)


GUARD_IMAGES = 256  # training images the final model is scored on in evaluation mode (~3 % standard error)
GUARD_GAP = 0.25  # ... and how far below the training accuracy that may fall before the model is called broken


def _check_eval_mode(run: Run, plain: nn.Module, train_acc: float) -> None:
    """The final model in evaluation mode must score training images about as well as training did.

    When it does not (BatchNorm running statistics that never matched the batches': a 96 % / 10 % pair was seen),
    the statistics are recomputed on training images; the line says what was found and whether that repaired it.
    Under mixup or strong augmentation the training accuracy is the lower one, so this never fires there.
    """
    if train_acc < 0.5:
        return
    n = len(run.data.train)
    sample = run.data.train.subset(torch.linspace(0, n - 1, min(n, GUARD_IMAGES)).long())
    transform = next(iter(run.eval_batches.values())).transform if run.eval_batches else None
    if transform is None:
        return
    batches = Batches(sample, transform, 128, shuffle=False, drop_last=False, seed=run.cfg.seed, device=run.device)
    def score() -> float:
        return evaluate_batches(plain, batches, run.device, run.precision, len(run.data.classes)).accuracy

    before = score()
    if before >= train_acc - GUARD_GAP:
        return
    saved = {k: v.clone() for k, v in plain.state_dict().items()}
    recalibrate_bn(plain, batches, run.device, run.precision)
    after = score()
    if after < train_acc - GUARD_GAP:
        plain.load_state_dict(saved)
    else:
        run.repaired = (plain, saved)
    say(f"reslab: warning: in evaluation mode the model scores {before:.1%} on {len(sample)} training images it "
        f"scored {train_acc:.1%} on while training: its BatchNorm running statistics do not match the batches'. "
        + (f"Recomputed them on these images: {after:.1%} now." if after >= train_acc - GUARD_GAP else
             f"Recomputing them gave {after:.1%}: the model is unreliable; try a lower --lr or another "
             f"--precision."))
