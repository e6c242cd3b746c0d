"""Training: ``setup`` builds a ``Run`` from a config, ``fit`` runs the loop. Read it top to bottom.

The loop is batch -> forward -> loss -> backward -> step -> hooks; the learning rate is a pure function of the step.
Everything that remembers something across steps (weight averaging, the time budget, accuracy-mark snapshots,
checkpoints, logs, signals) is a hook in ``hooks.py`` that saves its own state into ``last.pt``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, rundir, tune
from .checkpoint import load_checkpoint, save_checkpoint, save_model, unwrap_model
from .config import TrainConfig, budget_choices, make_config, resolve_inputs
from .data import (
    Batches,
    BatchTransform,
    DataBundle,
    data_changes,
    fingerprint,
    load_data,
    mix_seed,
    typical_image_size,
)
from .data.extras import mix_batch
from .errors import CheckpointError, ConfigError, DataError, Interrupted, UserError
from .evaluate import evaluate_batches, recalibrate_bn
from .hooks import (
    AccuracyMarks,
    Checkpointer,
    FrozenBackbone,
    Hook,
    Lookahead,
    MetricsLog,
    ProgressLog,
    SlowSteps,
    StopOnSignal,
    TimeBudget,
    WeightEma,
    WhiteningBiasWindow,
)
from .models import create_model, model_info
from .optim import SGD, Chain, Muon
from .pretrained import apply_pretrained, load_pretrained
from .runtime import autocast, default_channels_last, resolve_device, resolve_precision, set_threads, usable_cores

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
    raise ConfigError(f"unknown schedule {cfg.schedule!r}")


def param_groups(model: nn.Module, weight_decay: float, decay_bn_bias: bool, bias_lr_scale: float = 1.0,
                 head_lr_scale: float = 1.0) -> list[dict]:
    """Optimizer groups of the trainable parameters, each with an ``lr_scale`` (its lr over the schedule's).

    Weight decay goes on conv/linear weights; BatchNorm parameters and biases are excluded unless ``decay_bn_bias``.
    BatchNorm biases (not their scales) learn ``bias_lr_scale`` times faster, with their decay per step kept the same;
    the classifier (``fc``) learns ``head_lr_scale`` times faster.
    """
    bn_biases = {id(m.bias) for m in model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None}
    fc = getattr(model, "fc", None)
    head = {id(p) for p in fc.parameters()} if isinstance(fc, nn.Module) else set()
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        decay = weight_decay if p.ndim > 1 or decay_bn_bias else 0.0
        scale = bias_lr_scale if id(p) in bn_biases else head_lr_scale if id(p) in head else 1.0
        if id(p) in bn_biases:
            decay /= bias_lr_scale
        groups.setdefault((scale, decay), []).append(p)
    return [{"params": ps, "lr_scale": scale, "weight_decay": decay} for (scale, decay), ps in groups.items()]


def make_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer | SGD | Chain:
    """SGD (the paper's, and the presets') or AdamW; each group carries its own weight decay. ``muon``: the conv
    filters (4-D weights) on Muon at ``muon_lr`` (its ``lr_scale`` is muon_lr / lr, so one schedule drives both),
    the rest on SGD.

    SGD is reslab's own (``reslab.optim``: torch's arithmetic without importing ``torch._dynamo``, ~1 s of each start).
    """
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.optimizer == "muon":
        filters = [p for g in groups for p in g["params"] if p.ndim == 4]
        rest = [{**g, "params": [p for p in g["params"] if p.ndim != 4]} for g in groups]
        sgd = SGD([g for g in rest if g["params"]], lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
        return Chain(sgd, Muon([{"params": filters, "lr_scale": cfg.muon_lr / cfg.lr}], lr=cfg.muon_lr,
                               momentum=cfg.muon_momentum))
    return SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


# --- what the loop carries ----------------------------------------------------------------------------------------

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
    stop: str | None = None  # set by a hook: end after this step (a signal's name)
    meter: EpochMeter = None  # type: ignore[assignment]
    last_metrics: dict[str, Any] = field(default_factory=dict)
    loss_weight: torch.Tensor | None = None  # per-class weights of the loss (--balance loss)

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


# --- setup ------------------------------------------------------------------------------------------------------------

def setup(cfg: TrainConfig, resume: dict[str, Any] | None = None, started: float | None = None,
          data_changed: bool = False) -> Run:
    """Build data, model, optimizer, hooks and run directory from ``cfg`` (and a checkpoint when resuming).

    ``started`` (a ``time.perf_counter()`` value, default now) is the origin of ``--time-budget`` and the times of
    the accuracy marks; the CLI passes the process start, so they count the whole command. ``data_changed``: a
    resumed run may continue on a folder whose images changed since it started (never on other classes).
    """
    clock = time.perf_counter() if started is None else started
    device = resolve_device(cfg.device)
    d = distributed.init(device.type)
    if d.enabled and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)  # one process per GPU
        torch.cuda.set_device(device)
    resolve_precision(cfg.precision, device)  # an impossible precision fails before anything is loaded
    set_threads(cfg.threads)
    model_info(cfg.arch)  # fails early on an unknown name
    out = Path(run_dir(cfg))
    if resume is None and (rundir.has_checkpoint(out) or rundir.is_finished(out)):
        raise UserError(f"{out} already holds a run: continue it with --resume {out}, or choose another --out")
    torch.manual_seed(cfg.seed)
    if resume is None:  # a resumed run's config is already resolved
        # Only an augmentation left to reslab needs a look at the images (a few hundred file headers).
        family = model_info(cfg.arch).family
        cfg, chosen = resolve_inputs(cfg, family, typical_image_size(cfg.data) if cfg.augment is None else None)
        if chosen and d.main:
            print(chosen, file=sys.stderr)

    data = load_data(cfg.data, augment=cfg.augment, input_size=cfg.input_size, data_dir=cfg.data_dir,
                     loader=cfg.loader, train_samples=cfg.train_samples, test_samples=cfg.test_samples,
                     val_split=cfg.val_split, seed=cfg.seed, strict=cfg.strict)
    if resume is not None:  # the normalisation the run started with (its pretrained weights', or its data's)
        data.mean, data.std = tuple(resume["meta"]["mean"]), tuple(resume["meta"]["std"])
        _check_same_data(resume["meta"].get("data"), fingerprint(data), out, data_changed, d.main)
    pretrained = load_pretrained(cfg.pretrained, cfg.arch) if cfg.pretrained and resume is None else None
    if pretrained is not None:
        data.mean, data.std = pretrained.mean, pretrained.std
    if len(data.classes) < 2:
        raise DataError(f"{cfg.data} has one class ({data.classes[0]}): a classifier needs at least two to learn "
                        f"anything (every image would be 100 % right)")
    if d.main:
        print(_describe_classes(data.train, cfg.balance), file=sys.stderr)
    if cfg.drop_last and cfg.batch_size > len(data.train):
        small = max(d.world, len(data.train) // d.world * d.world)
        if d.main:
            print(f"--batch-size {cfg.batch_size} is more than the {len(data.train)} training images: using "
                  f"{small}", file=sys.stderr)
        cfg = dataclasses.replace(cfg, batch_size=small)
    cfg, precision, decision = _execution(cfg, device, d, len(data.classes), len(data.train))
    if cfg.budget_rule and resume is None:
        cfg, precision, decision = _apply_budget_rule(cfg, device, d, data, decision, clock)
    info = model_info(cfg.arch)
    train_transform = BatchTransform(cfg.augment, True, cfg.input_size, data.mean, data.std, cfg.auto_augment,
                                     cfg.random_erasing)
    train_batches = Batches(data.train, train_transform,
                            cfg.batch_size, shuffle=cfg.shuffle, drop_last=cfg.drop_last, seed=cfg.seed,
                            device=device, workers=cfg.workers, rank=d.rank, world=d.world,
                            alternate_flips=cfg.flip == "alternate")
    eval_transform = BatchTransform(cfg.augment, False, cfg.input_size, data.mean, data.std)
    eval_batches = {name: Batches(split.subset(distributed.shard_for_eval(len(split), d)), eval_transform,
                                  max(cfg.batch_size // d.world, 256), shuffle=False, drop_last=False,
                                  seed=cfg.seed, device=device, workers=cfg.workers)
                    for name, split in (("val", data.val), ("test", data.test)) if split is not None}

    model = create_model(cfg.arch, num_classes=len(data.classes), **cfg.model_kwargs).to(device)
    if pretrained is not None:
        loaded = apply_pretrained(model, pretrained, data.classes)
        if d.main:
            print(loaded, file=sys.stderr)
    if cfg.freeze:  # a linear probe: only the classifier learns (FrozenBackbone keeps BatchNorm statistics fixed)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("fc."))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if cfg.freeze_bn_scale and m.weight is not None:
                m.weight.requires_grad_(False)
            if cfg.bn_momentum is not None:
                m.momentum = cfg.bn_momentum
    if resume is None and pretrained is None and hasattr(model, "init_whitening"):  # whiten data patches (fast nets)
        sample = Batches(data.train, eval_transform, min(len(data.train), 5000), shuffle=True, drop_last=False,
                         seed=cfg.seed, device=device)
        model.init_whitening(next(iter(sample.epoch(0)))[0])
    if cfg.channels_last if cfg.channels_last is not None else default_channels_last(device, precision):
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, param_groups(model, cfg.weight_decay, cfg.decay_bn_bias, cfg.bias_lr_scale,
                                                 cfg.head_lr_scale))
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        torch.set_rng_state(resume["rng"]["torch"])

    cfg.out = str(out)
    meta = {"arch": cfg.arch, "model_kwargs": cfg.model_kwargs, "classes": data.classes,
            "input_size": cfg.input_size, "augment": cfg.augment, "tta": cfg.tta,
            "tta_fraction": cfg.tta_fraction, "mean": list(data.mean),
            "std": list(data.std), "data": fingerprint(data), "family": info.family,
            "reslab_version": rundir.package_version(),
            "torch_version": str(torch.__version__),
            "pretrained": pretrained.source if pretrained else (resume or {}).get("meta", {}).get("pretrained")}
    if d.main:  # only rank 0 writes
        out.mkdir(parents=True, exist_ok=True)
        rundir.write_config(out, cfg.to_dict())
    run = Run(cfg, out, device, precision, d, data, train_batches, eval_batches, model, optimizer, scaler, meta,
              hooks=_hooks(cfg, model, out, decision), clock=clock, meter=EpochMeter(device),
              total_steps=_total_steps(cfg, len(data.train)),
              loss_weight=_class_weights(data.train, len(data.classes), device) if cfg.balance == "loss" else None)
    if resume is not None:
        _restore(run, resume)
    run.model = distributed.wrap(model, d, device, cfg.sync_bn)
    if cfg.compile:
        run.model = torch.compile(run.model)
    return run


def _check_same_data(before: dict | None, now: dict, out: Path, accept: bool, main: bool) -> None:
    """A resumed run trains on the data it started on: a changed folder is refused (or, with ``accept``, said)."""
    changes = data_changes(before, now) if before else []  # runs saved before reslab 0.3 recorded no fingerprint
    if not changes:
        return
    what = "; ".join(changes)
    if before["classes"] != now["classes"]:
        raise UserError(f"the data of {out} changed since it started ({what}): a run cannot change its classes; start "
                        f"a new run (--pretrained {out} starts from its weights once it has finished)")
    if not accept:
        raise UserError(f"the data of {out} changed since it started ({what}): put it back, or resume on it anyway "
                        f"with --data-changed ok")
    if main:
        print(f"reslab: the data changed since the run started ({what}); continuing on it (--data-changed ok): the "
              f"epochs are counted in its new size from here", file=sys.stderr)


def _total_steps(cfg: TrainConfig, train_images: int) -> int:
    """The run's length in steps as configured (a time budget re-sizes it while training)."""
    per_epoch = max(1, train_images // cfg.batch_size if cfg.drop_last else math.ceil(train_images / cfg.batch_size))
    return cfg.steps or max(1, round(cfg.epochs * per_epoch))


def _execution(cfg: TrainConfig, device: torch.device, d: distributed.Dist, num_classes: int,
               train_images: int | None = None) -> tuple[TrainConfig, str, tune.Decision | None]:
    """Threads, precision and memory format: what the config leaves open (None / auto) is measured on the CPU by a
    short probe of the training step (``reslab.tune``) when the run is long enough to pay for it, or when a budget
    rule needs the step time; else the static rules. A measured choice is written into the config (config.yaml), so
    a resumed run keeps it. Under torchrun rank 0 measures and every rank takes its decision."""
    open_ = cfg.threads is None or cfg.precision == "auto" or cfg.channels_last is None
    long = cfg.time_budget or _total_steps(cfg, train_images or 0) >= tune.PROBE_MIN_STEPS
    if not (cfg.budget_rule or (open_ and long and device.type == "cpu")):
        return cfg, resolve_precision(cfg.precision, device), None
    if device.type != "cpu":  # GPUs keep the static rules; a budget rule still needs the step time
        precision = resolve_precision(cfg.precision, device)
        channels_last = cfg.channels_last if cfg.channels_last is not None else default_channels_last(device,
                                                                                                    precision)
        choice = tune.Choice(torch.get_num_threads(), precision, channels_last)
        measure = tune.step_timer(cfg.arch, cfg.model_kwargs, num_classes, cfg.batch_size, cfg.input_size, device)
        return cfg, precision, tune.decide([choice], measure)
    decision = None
    if d.main:
        share = max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun's processes here
        decision = tune.choose(cfg.arch, cfg.model_kwargs, num_classes, cfg.batch_size, cfg.input_size,
                               threads=cfg.threads, precision=None if cfg.precision == "auto" else cfg.precision,
                               channels_last=cfg.channels_last, cores=share)
        print(decision.line(cfg.batch_size), file=sys.stderr)
    chosen = decision.choice if decision else tune.Choice(1, "fp32", False)
    threads = distributed.broadcast_int(chosen.threads, device)
    precision = ("fp32", "bf16")[distributed.broadcast_int(int(chosen.precision == "bf16"), device)]
    channels_last = bool(distributed.broadcast_int(int(chosen.channels_last), device))
    torch.set_num_threads(threads)
    cfg = dataclasses.replace(cfg, threads=threads, precision=precision, channels_last=channels_last)
    return cfg, precision, decision


# The loop's step against the probe's bare one (augmentation, lookahead and the meter, against the probe's two
# steps on cold buffers): 1.0-1.07 in bf16 and 0.85 in fp32 for resnet9s, one thread, on the 2-core AVX512_BF16 EPYC.
LOOP_STEP_OVERHEAD = 1.0


def _apply_budget_rule(cfg: TrainConfig, device: torch.device, d: distributed.Dist, data: DataBundle,
                       decision: tune.Decision | None, clock: float) -> tuple[TrainConfig, str, tune.Decision | None]:
    """The preset's choices for the epochs its own net gets in the time left (``config.BUDGET_RULES``), said in one
    line; a changed net has its execution measured again."""
    from .hooks import EVAL_COST, eval_seconds, size_to_budget

    per_step = decision.seconds_per_step * LOOP_STEP_OVERHEAD if decision else None
    epochs = None
    if per_step is not None:
        per_epoch = max(1, len(data.train) // cfg.batch_size)
        eval_images = len(data.test) + (len(data.val) if data.val is not None else 0)
        evaluation = eval_seconds(eval_images, cfg, per_step, decision.eval_cost or EVAL_COST)
        steps = size_to_budget(cfg.time_budget * 60, time.perf_counter() - clock, 0, per_step, evaluation)
        epochs = distributed.broadcast_int(round(steps / per_epoch * 1000), device) / 1000
    choices = budget_choices(cfg.budget_rule, epochs, cfg.budget_keep)
    if d.main and epochs is not None:
        said = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in choices.items()) or "its own choices"
        print(f"{cfg.budget_rule} preset, {cfg.time_budget:g}-minute budget: ~{epochs:.1f} epochs of {cfg.arch} "
              f"here, so {said}", file=sys.stderr)
    if not choices:
        return cfg, resolve_precision(cfg.precision, device), decision
    cfg = dataclasses.replace(cfg, **choices)
    if "arch" in choices:  # the new net timed under the choices just made (one timing: its step and eval cost)
        return _execution(cfg, device, d, len(data.classes))
    return cfg, resolve_precision(cfg.precision, device), decision


def _hooks(cfg: TrainConfig, model: nn.Module, out: Path, decision: tune.Decision | None = None) -> list[Hook]:
    """The run's hooks, in the order they act after each step (the checkpointer last, so it saves their state)."""
    hooks: list[Hook] = []
    if decision is not None:
        hooks.append(SlowSteps(decision.seconds_per_step * LOOP_STEP_OVERHEAD))
    if cfg.freeze:
        hooks.append(FrozenBackbone())
    if cfg.lookahead:
        hooks.append(Lookahead(model))
    if cfg.whiten_bias_epochs is not None:  # after the lookahead, whose averaging would move the held bias
        if not hasattr(model, "init_whitening"):
            raise ConfigError(f"--whiten-bias-epochs needs a net with a whitening stem (--arch resnet9s), not "
                              f"{cfg.arch}")
        hooks.append(WhiteningBiasWindow(cfg.whiten_bias_epochs))
    if cfg.ema:
        hooks.append(WeightEma(model, cfg.ema))
    if cfg.time_budget:  # the evaluation's cost as measured by the probe, where it ran
        hooks.append(TimeBudget(cfg.time_budget, eval_cost=decision.eval_cost if decision else None))
    if cfg.accuracy_marks:
        hooks.append(AccuracyMarks(cfg.accuracy_marks, out))
    return [*hooks, ProgressLog(cfg.log_every), StopOnSignal(), MetricsLog(out, cfg.tensorboard),
            Checkpointer(cfg.checkpoint_every)]


def _describe_classes(split, balance: str) -> str:
    """A line with the class counts of the training split, and a warning when they are far apart."""
    counts = torch.bincount(split.labels, minlength=len(split.classes)).tolist()
    pairs = sorted(zip(split.classes, counts), key=lambda p: -p[1])
    shown = ", ".join(f"{c} {n}" for c, n in pairs[:8]) + (", ..." if len(pairs) > 8 else "")
    line = f"training on {len(split)} images of {len(counts)} classes ({shown})"
    if min(counts) * 3 <= max(counts) and balance == "none":
        line += (f"\nwarning: the classes are imbalanced ({max(counts)} against {min(counts)} images): --balance loss "
                 f"weights the loss by inverse class frequency")
    return line


def _class_weights(split, num_classes: int, device: torch.device) -> torch.Tensor:
    """Inverse class frequency, normalised so that a balanced folder gets weight 1 everywhere."""
    counts = torch.bincount(split.labels, minlength=num_classes).float().clamp_min(1)
    return (len(split) / (num_classes * counts)).to(device)


def _restore(run: Run, state: dict[str, Any]) -> None:
    """Put a checkpoint's loop state, meter and hook states back into ``run``."""
    hooks = dict(state.get("hooks") or {})
    if state.get("lookahead") is not None:  # checkpoints written before hooks held their own state
        hooks["lookahead"] = {"average": state["lookahead"]}
    if run.cfg.time_budget and "time_budget" not in hooks and "hooks" not in state:
        hooks["time_budget"] = {"total_steps": state.get("total_steps")}
    for hook in run.hooks:
        if hook.name in hooks and hooks[hook.name] is not None:
            hook.load_state_dict(hooks[hook.name])
    run.step = int(state["step"])
    run.clock -= state.get("wall_seconds", 0.0)  # times count on from where the run stopped
    run.last_metrics = dict(state.get("last_metrics") or {})
    if state.get("meter"):
        run.meter.load_state_dict(state["meter"])
    saved_total = state.get("total_steps")
    if saved_total and saved_total != run.total_steps and not run.cfg.time_budget and run.dist.main:
        print(f"resuming at step {run.step}: the run now ends at step {run.total_steps} (was {saved_total}); "
              f"the learning-rate schedule follows the new length", file=sys.stderr)


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
    cfg, model, opt = run.cfg, run.model, run.optimizer
    steps_per_epoch = len(run.train_batches)
    epoch, first = divmod(run.step, steps_per_epoch)
    model.train()
    for hook in run.hooks:
        hook.on_epoch_start(run)
    run.meter.start()
    for x, y in run.train_batches.epoch(epoch, start=first):
        lr = lr_at(run.step, cfg, steps_per_epoch, run.total_steps)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        target = y
        if cfg.mixup or cfg.cutmix:  # drawn from (seed, step): the same mix on resume
            g = torch.Generator().manual_seed(mix_seed(cfg.seed, run.step, 2))
            x, target = mix_batch(x, y, len(run.data.classes), cfg.mixup, cfg.cutmix, g)
        with autocast(run.device, run.precision):
            logits = model(x)
            loss = F.cross_entropy(logits, target, weight=run.loss_weight, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        _backward_and_step(run, loss)
        run.step += 1
        run.meter.add(loss, logits, y, run.step, lr)
        if run.step % cfg.log_every == 0:  # finiteness costs a device sync: checked here and before checkpoints
            run.raise_if_nonfinite()
        for hook in run.hooks:
            hook.on_step_end(run, loss, lr)
        if run.stop:
            raise run.interrupted()
        if run.step >= run.total_steps:
            break


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

    When it does not (BatchNorm running statistics that never matched the batches': issue 23 found a 96 % / 10 % pair),
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
    if run.dist.main:
        print(f"reslab: warning: in evaluation mode the model scores {before:.1%} on {len(sample)} training images it "
              f"scored {train_acc:.1%} on while training: its BatchNorm running statistics do not match the batches'. "
              + (f"Recomputed them on these images: {after:.1%} now." if after >= train_acc - GUARD_GAP else
                 f"Recomputing them gave {after:.1%}: the model is unreliable; try a lower --lr or another "
                 f"--precision."), file=sys.stderr)


# --- the entry point ----------------------------------------------------------------------------------------------

# Options that may change when a run is resumed: its length, evaluation, logging and where it runs. Everything
# else (model, data, batch size, optimiser, augmentation, seed) defines the run and is refused.
RESUME_OVERRIDES = frozenset({"epochs", "steps", "eval_every", "tta", "tta_fraction", "log_every", "tensorboard",
                              "checkpoint_every", "device", "precision", "threads", "workers", "loader", "compile",
                              "channels_last", "strict", "data_dir"})


def resume_config(saved: dict[str, Any], overrides: dict[str, Any], run_dir: str | Path) -> TrainConfig:
    """The config of a resumed run: the saved one, with the ``overrides`` that may change (refused otherwise)."""
    changed = {k: v for k, v in overrides.items() if k not in saved or saved[k] != v}
    refused = sorted(set(changed) - RESUME_OVERRIDES)
    if refused:
        k = refused[0]
        raise ConfigError(f"--{k.replace('_', '-')} cannot change when resuming: the run in {run_dir} has "
                          f"{saved.get(k)!r} (asked: {changed[k]!r}); start a new run with another --out")
    values = {**saved, **changed, "out": str(run_dir)}
    if "epochs" in changed and "steps" not in changed:
        values["steps"] = None  # --epochs sets the length, even where the run was started with --steps
    if ("epochs" in changed or "steps" in changed) and saved.get("time_budget"):
        values["time_budget"] = None  # an explicit length replaces the budget's
    return make_config(**values)


def train(config: TrainConfig | None = None, *, preset: str | None = None, resume: str | Path | None = None,
          started: float | None = None, force: bool = False, data_changed: bool = False,
          **overrides: Any) -> TrainResult:
    """Train a model and write a run directory.

    Args:
        config: a full config; otherwise one is made from ``preset`` and ``overrides``.
        preset: ``seed``, ``paper`` or ``fast`` (see ``reslab.config.PRESETS``).
        resume: a run directory to continue from its ``last.pt``; ``overrides`` may then change its length,
            evaluation, logging and device (see ``RESUME_OVERRIDES``), nothing else.
        started: origin of ``time_budget`` as a ``time.perf_counter()`` value (default: this call).
        force: a new run may write over a ``config.yaml`` or ``metrics.jsonl`` in ``out`` that no reslab run made.
        data_changed: a resumed run may continue on images that changed since it started (same classes).
        **overrides: any ``TrainConfig`` field, e.g. ``arch="resnet56"``, ``epochs=5``.

    Returns:
        The run directory and the last epoch's metrics.
    """
    if resume is None:
        cfg = config if config is not None else make_config(preset, **overrides)
        cfg = dataclasses.replace(cfg, out=run_dir(cfg))
        with rundir.own(cfg.out, new=True, force=force):  # the whole run, so no second process writes into it
            return fit(setup(cfg, started=started))
    if config is not None or preset is not None:
        raise ConfigError("--resume continues a run with its saved config: no --preset or --config with it")
    if not Path(resume).is_dir():
        raise UserError(f"no run directory {resume} to resume")
    with rundir.own(resume, new=False):
        state = load_checkpoint(Path(resume) / rundir.CHECKPOINT_FILE)
        if not (isinstance(state, dict) and {"config", "step", "model", "meta"} <= set(state)):
            raise CheckpointError(f"{Path(resume) / rundir.CHECKPOINT_FILE} is not a reslab training checkpoint (it "
                                  f"holds {'a bare state_dict' if isinstance(state, dict) else type(state).__name__}"
                                  f"): nothing to resume")
        run = setup(resume_config(state["config"], overrides, resume), resume=state, started=started,
                    data_changed=data_changed)
        marks_lost = run.cfg.accuracy_marks and not rundir.read_marks(run.out)  # killed while scoring them
        if marks_lost and rundir.is_finished(run.out) and run.dist.main:
            print(f"reslab: {run.out} finished training but its accuracy marks were not scored (interrupted): "
                  f"scoring them now", file=sys.stderr)
        if run.step >= run.total_steps and not run.meter.seen and rundir.is_finished(run.out) and not marks_lost:
            raise UserError(f"{run.out} already finished ({run.step} steps, {run.total_steps} asked): give a longer "
                            f"--epochs or --steps with --resume to train on")
        return fit(run)


def run_dir(cfg: TrainConfig) -> str:
    """Where the run writes: ``--out``, else ``runs/<arch>-<date>-<time>``."""
    return cfg.out or f"runs/{cfg.arch}-{datetime.now():%Y%m%d-%H%M%S}"
