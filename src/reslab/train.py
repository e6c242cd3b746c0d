"""Training: ``setup`` builds everything from a config, ``fit`` runs the loop. Read it top to bottom.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line per epoch), ``last.pt``
(everything needed to resume) and, at the end, ``model.safetensors`` (weights + what is needed to use them).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from . import __version__, distributed
from .checkpoint import CHECKPOINT_FILE, MODEL_FILE, load_checkpoint, save_checkpoint, save_model, unwrap_model
from .config import TrainConfig, make_config
from .data import BatchTransform, Batches, DataBundle, load_data
from .evaluate import TTA_VIEWS, evaluate_batches
from .models import create_model, model_info
from .progress import Progress
from .runtime import (Interrupted, UserError, autocast, default_channels_last, resolve_device,
                      resolve_precision, set_threads)


# --- the learning rate: a pure function of the step ---------------------------------------------------------------

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
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


# --- setup ------------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything ``fit`` needs, built by ``setup``."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    precision: str
    data: DataBundle
    train_batches: Batches
    eval_batches: dict[str, Batches]
    model: nn.Module  # possibly compiled; save ``unwrap_model(model)``
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    total_steps: int
    meta: dict[str, Any]
    start_step: int = 0
    tensorboard: Any = None  # a SummaryWriter with --tensorboard
    dist: distributed.Dist = distributed.Dist()
    lookahead: Lookahead | None = None
    clock: float = 0.0  # time.perf_counter() at process start: the origin of --time-budget and accuracy marks
    snapshots: list = field(default_factory=list)  # (seconds, step, weights) for --accuracy-marks
    measure_start: float = 0.0  # when the throughput measurement of a --time-budget run began


def param_groups(model: nn.Module, weight_decay: float, decay_bn_bias: bool,
                 bias_lr_scale: float = 1.0) -> list[dict]:
    """Optimizer groups of the trainable parameters, each with an ``lr_scale`` (its lr over the schedule's).

    Weight decay goes on conv/linear weights; BatchNorm parameters and biases are excluded unless ``decay_bn_bias``.
    BatchNorm biases learn ``bias_lr_scale`` times faster, with their decay per step kept the same.
    """
    norm = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
    decay, no_decay, norm_biases = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 and id(p) in norm and bias_lr_scale != 1:
            norm_biases.append(p)
        else:
            (decay if p.ndim > 1 or decay_bn_bias else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    if norm_biases:
        groups.append({"params": norm_biases, "lr_scale": bias_lr_scale,
                       "weight_decay": weight_decay / bias_lr_scale if decay_bn_bias else 0.0})
    return [g for g in groups if g["params"]]


class Lookahead:
    """Every ``every`` steps, move a running average toward the weights and reset the weights to it.

    As in the airbench trainers (after Zhang et al. 2019, "Lookahead Optimizer"): the average's decay grows as
    (step/total)^3, so it does nothing early and smooths the weights late; the run ends on the average. BatchNorm
    running statistics are averaged too.
    """

    every = 5

    def __init__(self, model: nn.Module, state: list[torch.Tensor] | None = None) -> None:
        self.tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
        self.average = [a.to(t.device) for a, t in zip(state, self.tensors)] if state else \
            [t.detach().clone() for t in self.tensors]

    @torch.no_grad()
    def step(self, step: int, total: int) -> None:
        if step % self.every == 0 or step >= total:
            decay = 0.95 ** self.every * (step / total) ** 3 if step < total else 0.0
            for a, t in zip(self.average, self.tensors):
                a.lerp_(t, 1 - decay)
                t.copy_(a)


def setup(cfg: TrainConfig, resume: dict[str, Any] | None = None, started: float | None = None) -> Run:
    """Build data, model, optimizer and run directory from ``cfg`` (and a checkpoint when resuming).

    ``started`` (a ``time.perf_counter()`` value, default now) is the origin of ``--time-budget`` and the times of
    the accuracy marks; the CLI passes the process start, so they count the whole command.
    """
    clock = time.perf_counter() if started is None else started
    device = resolve_device(cfg.device)
    d = distributed.init(device.type)
    if d.enabled and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)  # one process per GPU
        torch.cuda.set_device(device)
    precision = resolve_precision(cfg.precision, device)
    set_threads(cfg.threads)
    info = model_info(cfg.arch)  # fails early on an unknown name
    out = Path(cfg.out or f"runs/{cfg.arch}-{datetime.now():%Y%m%d-%H%M%S}")
    if resume is None and ((out / CHECKPOINT_FILE).exists() or (out / MODEL_FILE).exists()):
        raise UserError(f"{out} already holds a run: continue it with --resume {out}, or choose another --out")
    torch.manual_seed(cfg.seed)

    data = load_data(cfg.data, augment=cfg.augment, input_size=cfg.input_size, data_dir=cfg.data_dir,
                     loader=cfg.loader, train_samples=cfg.train_samples, test_samples=cfg.test_samples,
                     val_split=cfg.val_split, seed=cfg.seed, strict=cfg.strict)
    make = lambda train: BatchTransform(cfg.augment, train, cfg.input_size, data.mean, data.std)  # noqa: E731
    train_batches = Batches(data.train, make(True), cfg.batch_size, shuffle=cfg.shuffle, drop_last=cfg.drop_last,
                            seed=cfg.seed, device=device, workers=cfg.workers, rank=d.rank, world=d.world)
    eval_batches = {name: Batches(split.subset(distributed.shard_for_eval(len(split), d)), make(False),
                                  max(cfg.batch_size // d.world, 256), shuffle=False, drop_last=False,
                                  seed=cfg.seed, device=device, workers=cfg.workers)
                    for name, split in (("val", data.val), ("test", data.test)) if split is not None}
    steps_per_epoch = len(train_batches)
    total_steps = cfg.steps or max(1, round(cfg.epochs * steps_per_epoch))

    model = create_model(cfg.arch, num_classes=len(data.classes), **cfg.model_kwargs).to(device)
    if cfg.freeze_bn_scale:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.requires_grad_(False)
    if resume is None and hasattr(model, "init_whitening"):  # the fast nets' stem whitens patches of the data
        sample = Batches(data.train, make(False), min(len(data.train), 5000), shuffle=True, drop_last=False,
                         seed=cfg.seed, device=device)
        model.init_whitening(next(iter(sample.epoch(0)))[0])
    channels_last = cfg.channels_last if cfg.channels_last is not None else default_channels_last(device, precision)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay, cfg.decay_bn_bias, cfg.bias_lr_scale),
                                lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    lookahead = Lookahead(model, resume.get("lookahead") if resume else None) if cfg.lookahead else None
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    start_step = 0
    if resume is not None:
        unwrap_model(model).load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        torch.set_rng_state(resume["rng"]["torch"])
        start_step = int(resume["step"])
    model = distributed.wrap(model, d, device, cfg.sync_bn)
    if cfg.compile:
        model = torch.compile(model)

    cfg.out = str(out)
    if d.main:  # only rank 0 writes
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    meta = {"arch": cfg.arch, "model_kwargs": cfg.model_kwargs, "classes": data.classes,
            "input_size": cfg.input_size, "augment": cfg.augment, "tta": cfg.tta, "mean": list(data.mean), "std": list(data.std),
            "family": info.family, "reslab_version": __version__, "torch_version": str(torch.__version__)}
    writer = _tensorboard_writer(out) if cfg.tensorboard and d.main else None
    if resume is not None and cfg.time_budget and resume.get("total_steps"):
        total_steps = int(resume["total_steps"])  # a time-budgeted run keeps the length it was sized to
    return Run(cfg, out, device, precision, data, train_batches, eval_batches, model, optimizer, scaler,
               total_steps, meta, start_step, writer, d, lookahead, clock)


def _tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install 'reslab[tensorboard]'") from None
    return SummaryWriter(log_dir=str(out))


def save_resume_point(run: Run, step: int) -> None:
    """Write ``last.pt``, unless the weights went non-finite: a checkpoint is only ever a good one."""
    if not run.dist.main:
        return
    params = unwrap_model(run.model).parameters()
    if not all(torch.isfinite(p).all() for p in params):
        raise UserError(f"the weights became non-finite at step {step}; try a lower --lr (the last good "
                        f"checkpoint is {run.out / CHECKPOINT_FILE})")
    save_checkpoint(run.out / CHECKPOINT_FILE, checkpoint_state(run, step))


def checkpoint_state(run: Run, step: int) -> dict[str, Any]:
    """Everything needed to resume at ``step``: plain containers and tensors only (loadable with weights_only)."""
    return {"model": {k: v.detach().cpu() for k, v in unwrap_model(run.model).state_dict().items()},
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "step": step, "total_steps": run.total_steps, "config": run.cfg.to_dict(), "meta": run.meta,
            "lookahead": [a.detach().cpu() for a in run.lookahead.average] if run.lookahead else None,
            "rng": {"torch": torch.get_rng_state()}}


# --- the loop ---------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _stop_requests():
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (only in the main thread)."""
    flag = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    def handler(signum, _frame):
        flag["signal"] = signal.Signals(signum).name
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def fit(run: Run) -> dict[str, Any]:
    """Train for ``run.total_steps`` optimizer steps, evaluating and checkpointing at every epoch's end."""
    progress = Progress(run.total_steps, every=run.cfg.log_every, start=run.start_step,
                        stream=None if run.dist.main else open(os.devnull, "w"))
    step, last = run.start_step, {}
    with _stop_requests() as stop:
        while step < run.total_steps:
            step, last = _epoch(run, step, progress, stop)
    progress.close()
    if run.dist.main:
        save_model(run.out / MODEL_FILE, run.model, run.meta)
    if run.cfg.accuracy_marks:  # after the result and the model file: the scoring is not part of a time budget
        last["accuracy_marks"] = accuracy_marks(run, last)
    if run.tensorboard is not None:
        run.tensorboard.close()
    distributed.barrier()  # every rank returns once the model file exists
    return {"out": str(run.out), **last}


# --- time budget and accuracy marks -----------------------------------------------------------------------------------

BUDGET_MEASURE = (3, 8)  # time steps 3..10 (after the first, slow ones) to size a --time-budget run
BUDGET_RESERVE = 0.03  # keep 3 % of the budget for the unexpected (checkpoint writes, a slower stretch)
BUDGET_END_SECONDS = 2.0  # saving the model and leaving the process, after the final evaluation


def size_to_budget(run: Run, step: int, seconds_per_step: float) -> int:
    """Total steps that end the run, its final evaluation included, inside ``--time-budget`` minutes."""
    cfg = run.cfg
    now = time.perf_counter() - run.clock
    n_eval = sum(len(b.split) for b in run.eval_batches.values())
    # An image's evaluation costs about a quarter of its training step (measured 4.2x on the 2-core CPU).
    eval_seconds = n_eval * TTA_VIEWS[cfg.tta] * seconds_per_step / (4 * cfg.batch_size)
    left = cfg.time_budget * 60 * (1 - BUDGET_RESERVE) - now - eval_seconds - BUDGET_END_SECONDS
    total = step + max(0, int(left / seconds_per_step))
    return max(total, step + 1, math.ceil(cfg.warmup * len(run.train_batches)) + 1)


def _budget_check(run: Run, step: int, progress: Progress) -> None:
    """Size a --time-budget run after the measurement window (still inside the warm-up, so no lr it used depends
    on the length), then re-size it at every tenth of the run until 70 %, from the mean seconds per step since the
    window began: a throughput that drifts moves the end a little rather than overrunning the budget."""
    done = step - run.start_step
    if done == BUDGET_MEASURE[0]:
        run.measure_start = time.perf_counter()
        return
    tenth = max(1, run.total_steps // 10)
    if done == sum(BUDGET_MEASURE) or (done > sum(BUDGET_MEASURE) and step % tenth == 0
                                       and step < 0.7 * run.total_steps):
        per_step = (time.perf_counter() - run.measure_start) / (done - BUDGET_MEASURE[0])
        run.total_steps = progress.total = size_to_budget(run, step, per_step)
        if done == sum(BUDGET_MEASURE) and run.dist.main:
            print(f"time budget {run.cfg.time_budget:g} min: {per_step:.3f} s per step measured, so "
                  f"{run.total_steps} steps ({run.total_steps / len(run.train_batches):.1f} epochs)", file=sys.stderr)


def _snapshot_due(run: Run, step: int) -> bool:
    """Snapshot the weights at every tenth of the run for the accuracy marks (a copy, a few ms)."""
    return bool(run.cfg.accuracy_marks) and step % max(1, run.total_steps // 10) == 0 and step < run.total_steps


@torch.no_grad()
def accuracy_marks(run: Run, final: dict) -> dict[str, Any]:
    """When test accuracy first reached each ``--accuracy-marks`` level, scored on the snapshots after training.

    Snapshots are scored from the last backwards until one is below every mark (accuracy rises as the learning
    rate anneals), so the time resolution is a tenth of the run. Times count from process start, like the budget.
    """
    marks = sorted(run.cfg.accuracy_marks)
    plain = unwrap_model(run.model)
    current = {k: v.clone() for k, v in plain.state_dict().items()}
    scored = [(final["wall_seconds"], final["step"], final.get("test_acc"))]
    t0 = time.perf_counter()
    if "test" in run.eval_batches and final.get("test_acc") is not None and final["test_acc"] >= marks[0]:
        for seconds, step, weights in reversed(run.snapshots):
            plain.load_state_dict(weights)
            acc = evaluate_batches(plain, run.eval_batches["test"], run.device, run.precision,
                                   len(run.data.classes), run.cfg.tta)["accuracy"]
            scored.append((seconds, step, acc))
            if acc < marks[0]:
                break
        plain.load_state_dict(current)
    result = {}
    for mark in marks:
        reached = [(sec, st, acc) for sec, st, acc in scored if acc is not None and acc >= mark]
        sec, st, acc = min(reached) if reached else (None, None, None)
        result[f"{mark:g}"] = {"seconds": sec, "step": st, "test_acc": acc}
    line = {"accuracy_marks": result, "snapshots_scored": len(scored) - 1,
            "scoring_seconds": round(time.perf_counter() - t0, 1)}
    if run.dist.main:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        for mark, r in result.items():
            when = f"{r['seconds']:.0f} s (step {r['step']}, {r['test_acc']:.4f})" if r["seconds"] else "not reached"
            print(f"test accuracy {float(mark):.0%}: {when}", file=sys.stderr)
        print(f"(accuracy marks scored on {len(scored) - 1} weight snapshots after training, "
              f"{line['scoring_seconds']} s)", file=sys.stderr)
    return result


def _epoch(run: Run, step: int, progress: Progress, stop: dict) -> tuple[int, dict]:
    """Train from ``step`` to the end of its epoch (or the run); evaluate, log and checkpoint. Returns the new step."""
    cfg, model, opt = run.cfg, run.model, run.optimizer
    spe = len(run.train_batches)
    epoch, first = divmod(step, spe)
    model.train()
    t0, seen = time.perf_counter(), 0
    loss_sum = torch.zeros((), device=run.device)  # summed on the device: no sync per step
    correct = torch.zeros((), device=run.device, dtype=torch.long)
    for x, y in run.train_batches.epoch(epoch, start=first):
        lr = lr_at(step, cfg, spe, run.total_steps)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        with autocast(run.device, run.precision):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        if not torch.isfinite(loss.detach()):  # stop before a bad step reaches the weights or a checkpoint
            raise UserError(f"the loss became {loss.item()} at step {step + 1} (epoch {epoch + 1}, lr {lr:.3g}); "
                            f"try a lower --lr; the last good checkpoint is {run.out / CHECKPOINT_FILE}")
        opt.zero_grad(set_to_none=True)
        if run.scaler is not None:  # fp16: scale the loss so small gradients do not underflow
            run.scaler.scale(loss).backward()
            run.scaler.step(opt)
            run.scaler.update()
        else:
            loss.backward()
            opt.step()
        loss_sum += loss.detach().float() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        step += 1
        if run.lookahead is not None:
            run.lookahead.step(step, run.total_steps)
        if cfg.time_budget and run.start_step == 0:  # a resumed run keeps the length it was sized to
            _budget_check(run, step, progress)
        if _snapshot_due(run, step):
            run.snapshots.append((time.perf_counter() - run.clock, step,
                                  {k: v.detach().clone() for k, v in unwrap_model(model).state_dict().items()}))
        progress.update(step, loss, lr, seen / (time.perf_counter() - t0))
        if stop["signal"] or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            save_resume_point(run, step)
        if stop["signal"]:
            progress.close()
            raise Interrupted(f"{stop['signal']} received: stopped after step {step} and saved "
                              f"{run.out / CHECKPOINT_FILE}; continue with: reslab train --resume {run.out}")
        if step >= run.total_steps:
            break
    seconds = time.perf_counter() - t0
    loss_sum, correct, seen_all = distributed.all_sum(loss_sum, correct, torch.tensor(seen, device=run.device))
    seen = int(seen_all.item())
    last = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum.item() / max(1, seen),
            "train_acc": correct.item() / max(1, seen), "lr": lr, "seconds": round(seconds, 3),
            "images_per_sec": round(seen / seconds, 1)}
    if step >= run.total_steps or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
        plain = unwrap_model(model)  # not the DDP wrapper: ranks score shards of different lengths
        distributed.sync_buffers(plain)
        for name, batches in run.eval_batches.items():
            r = evaluate_batches(plain, batches, run.device, run.precision, len(run.data.classes), cfg.tta)
            last.update({f"{name}_loss": r["loss"], f"{name}_acc": r["accuracy"]})
    last["wall_seconds"] = round(time.perf_counter() - run.clock, 2)  # since process start
    if run.dist.main:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(last) + "\n")
    progress.epoch_done(last)
    if run.tensorboard is not None:
        for key, value in last.items():
            if key not in ("epoch", "step"):
                run.tensorboard.add_scalar(key, value, step)
        run.tensorboard.flush()
    save_resume_point(run, step)
    return step, last


def train(config: TrainConfig | None = None, *, preset: str | None = None, resume: str | None = None,
          started: float | None = None, **overrides: Any) -> dict[str, Any]:
    """Train a model and write a run directory.

    Args:
        config: a full config; otherwise one is made from ``preset`` and ``overrides``.
        preset: ``seed``, ``paper`` (see ``reslab.config.PRESETS``).
        resume: a run directory to continue from its ``last.pt`` with its saved config.
        started: origin of ``time_budget`` as a ``time.perf_counter()`` value (default: this call).
        **overrides: any ``TrainConfig`` field, e.g. ``arch="resnet56"``, ``epochs=5``.

    Returns:
        The run directory and the last epoch's metrics.
    """
    state = None
    if resume is not None:
        state = load_checkpoint(Path(resume) / CHECKPOINT_FILE)
        cfg = make_config(**{**state["config"], **overrides, "out": str(resume)})
    else:
        cfg = config if config is not None else make_config(preset, **overrides)
    return fit(setup(cfg, resume=state, started=started))
