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
import threading
import time
from dataclasses import dataclass
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
from .evaluate import evaluate_batches
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


def param_groups(model: nn.Module, weight_decay: float, decay_bn_bias: bool) -> list[dict]:
    """Weight decay on conv/linear weights; BatchNorm parameters and biases excluded unless ``decay_bn_bias``."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 or decay_bn_bias else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def setup(cfg: TrainConfig, resume: dict[str, Any] | None = None) -> Run:
    """Build data, model, optimizer and run directory from ``cfg`` (and a checkpoint when resuming)."""
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
    channels_last = cfg.channels_last if cfg.channels_last is not None else default_channels_last(device, precision)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay, cfg.decay_bn_bias), lr=cfg.lr,
                                momentum=cfg.momentum, nesterov=cfg.nesterov)
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
            "input_size": cfg.input_size, "augment": cfg.augment, "mean": list(data.mean), "std": list(data.std),
            "family": info.family, "reslab_version": __version__, "torch_version": str(torch.__version__)}
    writer = _tensorboard_writer(out) if cfg.tensorboard and d.main else None
    return Run(cfg, out, device, precision, data, train_batches, eval_batches, model, optimizer, scaler,
               total_steps, meta, start_step, writer, d)


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
            "step": step, "config": run.cfg.to_dict(), "meta": run.meta,
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
    if run.tensorboard is not None:
        run.tensorboard.close()
    if run.dist.main:
        save_model(run.out / MODEL_FILE, run.model, run.meta)
    distributed.barrier()  # every rank returns once the model file exists
    return {"out": str(run.out), **last}


def _epoch(run: Run, step: int, progress: Progress, stop: dict) -> tuple[int, dict]:
    """Train from ``step`` to the end of its epoch (or the run); evaluate, log and checkpoint. Returns the new step."""
    cfg, model, opt = run.cfg, run.model, run.optimizer
    spe, total = len(run.train_batches), run.total_steps
    epoch, first = divmod(step, spe)
    model.train()
    t0, seen = time.perf_counter(), 0
    loss_sum = torch.zeros((), device=run.device)  # summed on the device: no sync per step
    correct = torch.zeros((), device=run.device, dtype=torch.long)
    for x, y in run.train_batches.epoch(epoch, start=first):
        lr = lr_at(step, cfg, spe, total)
        for group in opt.param_groups:
            group["lr"] = lr
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
        progress.update(step, loss, lr, seen / (time.perf_counter() - t0))
        if stop["signal"] or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            save_resume_point(run, step)
        if stop["signal"]:
            progress.close()
            raise Interrupted(f"{stop['signal']} received: stopped after step {step} and saved "
                              f"{run.out / CHECKPOINT_FILE}; continue with: reslab train --resume {run.out}")
        if step >= total:
            break
    seconds = time.perf_counter() - t0
    loss_sum, correct, seen_all = distributed.all_sum(loss_sum, correct, torch.tensor(seen, device=run.device))
    seen = int(seen_all.item())
    last = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum.item() / max(1, seen),
            "train_acc": correct.item() / max(1, seen), "lr": lr, "seconds": round(seconds, 3),
            "images_per_sec": round(seen / seconds, 1)}
    if (epoch + 1) % cfg.eval_every == 0 or step >= total:
        plain = unwrap_model(model)  # not the DDP wrapper: ranks score shards of different lengths
        distributed.sync_buffers(plain)
        for name, batches in run.eval_batches.items():
            r = evaluate_batches(plain, batches, run.device, run.precision, len(run.data.classes))
            last.update({f"{name}_loss": r["loss"], f"{name}_acc": r["accuracy"]})
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
          **overrides: Any) -> dict[str, Any]:
    """Train a model and write a run directory.

    Args:
        config: a full config; otherwise one is made from ``preset`` and ``overrides``.
        preset: ``seed``, ``paper`` (see ``reslab.config.PRESETS``).
        resume: a run directory to continue from its ``last.pt`` with its saved config.
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
    return fit(setup(cfg, resume=state))
