"""Builders: each part of a run made from its config (``train.setup`` composes them in order).

The order matters for exact resume and reproducibility: the seed is set, then data, execution choices, batches, the
model (its initialisation draws from the seeded generator), the optimizer; a checkpoint's states are put back last.

Imports: everything a run is made of (``loop``, ``hooks``, models, data, tuning); never ``train``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config.schema import BUDGET_WIDTHS, TrainConfig, budget_choices, resolve_inputs
from ..core import distributed
from ..core.errors import ConfigError, DataError, UserError
from ..core.execution import default_channels_last, prepare, resolve_precision, usable_cores
from ..core.log import say
from ..core.rundir import SPLIT_FILE
from ..core.version import package_version
from ..data import (
    Batches,
    BatchTransform,
    DataBundle,
    FolderSplit,
    data_changes,
    eval_batches,
    fingerprint,
    load_data,
    needs_split,
    read_split,
    split_json,
    typical_image_size,
)
from ..models import create_model, model_info
from ..models.checkpoint import atomic_write
from ..models.pretrained import Pretrained, apply_pretrained, load_pretrained
from . import tune
from .hooks import (
    AccuracyMarks,
    Checkpointer,
    FrozenBackbone,
    Lookahead,
    MetricsLog,
    ProgressLog,
    SlowSteps,
    StopOnSignal,
    TimeBudget,
    WeightEma,
    WhiteningBiasWindow,
)
from .loop import EpochMeter, Hook, Run
from .optim import SGD, Chain, Muon


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


def _check_same_data(before: dict | None, now: dict, out: Path, accept: bool) -> None:
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
    say(f"reslab: the data changed since the run started ({what}); continuing on it (--data-changed ok): the "
        f"epochs are counted in its new size from here")


def total_steps(cfg: TrainConfig, train_images: int) -> int:
    """The run's length in steps as configured (a time budget re-sizes it while training)."""
    per_epoch = max(1, train_images // cfg.batch_size if cfg.drop_last else math.ceil(train_images / cfg.batch_size))
    return cfg.steps or max(1, round(cfg.epochs * per_epoch))


def _execution(cfg: TrainConfig, device: torch.device, d: distributed.Dist, num_classes: int,
               train_images: int | None = None) -> tuple[TrainConfig, str, tune.Decision | None]:
    """Threads, precision and memory format: what the config leaves open (None / auto) is measured on the CPU by a
    short probe of the training step (``tune``) when the run is long enough to pay for it, or when a budget
    rule needs the step time; else the static rules. A measured choice is written into the config (config.yaml), so
    a resumed run keeps it. Under torchrun rank 0 measures and every rank takes its decision."""
    open_ = cfg.threads is None or cfg.precision == "auto" or cfg.channels_last is None
    long = cfg.time_budget or total_steps(cfg, train_images or 0) >= tune.PROBE_MIN_STEPS
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
        say(decision.line(cfg.batch_size))
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
    """The preset's choices for the epochs its own net gets in the time left (``presets.BUDGET_RULES``), said in one
    line; a changed net has its execution measured again, then a wider one of its family may take its place
    (``presets.BUDGET_WIDTHS``)."""
    epochs = _agreed_epochs(cfg, data, decision, clock, device)
    choices = budget_choices(cfg.budget_rule, epochs, cfg.budget_keep)
    if d.main:
        said = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in choices.items()) or "its own choices"
        say(f"{cfg.budget_rule} preset, {cfg.time_budget:g}-minute budget: ~{epochs:.1f} epochs of {cfg.arch} "
            f"here, so {said}")
    if not choices:
        return cfg, resolve_precision(cfg.precision, device), decision
    cfg = dataclasses.replace(cfg, **choices)
    if "arch" not in choices:
        return cfg, resolve_precision(cfg.precision, device), decision
    # The new net timed under the choices just made (one timing: its step and eval cost), then its wider kin.
    cfg, precision, decision = _execution(cfg, device, d, len(data.classes))
    return _widened(cfg, precision, device, d, data, decision, clock)


def _budget_epochs(cfg: TrainConfig, data: DataBundle, decision: tune.Decision, clock: float) -> float:
    """Epochs of ``cfg.arch`` at ``decision``'s measured step time that fit the time left, after the evaluation
    and the rest of the post-training work (``hooks.eval_seconds``)."""
    from .hooks import EVAL_COST, eval_seconds, size_to_budget

    per_step = decision.seconds_per_step * LOOP_STEP_OVERHEAD
    eval_images = len(data.test) + (len(data.val) if data.val is not None else 0)
    evaluation = eval_seconds(eval_images, cfg, per_step, decision.eval_cost or EVAL_COST, len(data.test))
    steps = size_to_budget(cfg.time_budget * 60, time.perf_counter() - clock, 0, per_step, evaluation)
    return steps / max(1, len(data.train) // cfg.batch_size)


def _agreed_epochs(cfg: TrainConfig, data: DataBundle, decision: tune.Decision | None, clock: float,
                   device: torch.device) -> float:
    """Rank 0's ``_budget_epochs`` on every rank (only rank 0 probes the CPU)."""
    local = _budget_epochs(cfg, data, decision, clock) if decision is not None else 0.0
    return distributed.broadcast_int(round(local * 1000), device) / 1000


def _widened(cfg: TrainConfig, precision: str, device: torch.device, d: distributed.Dist, data: DataBundle,
             decision: tune.Decision | None, clock: float) -> tuple[TrainConfig, str, tune.Decision | None]:
    """The widest net of ``presets.BUDGET_WIDTHS`` whose own epochs in the time left reach its threshold, timed
    (rank 0) under ``decision``'s execution; else ``cfg`` as it is. A wider net can only buy fewer epochs than the
    chosen one, so one whose threshold the chosen net's epochs miss is not timed."""
    widths = [] if "arch" in cfg.budget_keep else BUDGET_WIDTHS.get(cfg.budget_rule or "", [])
    base = _agreed_epochs(cfg, data, decision, clock, device) if widths else 0.0
    for arch, at_least, values in widths:
        if base < at_least:
            continue
        wider = dataclasses.replace(cfg, arch=arch, **{k: v for k, v in values.items() if k not in cfg.budget_keep})
        timed = None
        if d.main:
            measure = tune.step_timer(arch, wider.model_kwargs, len(data.classes), wider.batch_size,
                                      wider.input_size, device)
            seconds = measure(decision.choice)
            timed = tune.Decision(decision.choice, {decision.choice: seconds}, "probe",
                                  getattr(measure, "eval_costs", {}).get(decision.choice))
        epochs = _agreed_epochs(wider, data, timed, clock, device)
        if d.main:
            rate = wider.batch_size / timed.seconds_per_step
            verdict = f"so --arch {arch}" if epochs >= at_least else f"under its {at_least:g}: {cfg.arch} stays"
            say(f"{cfg.budget_rule} preset: ~{epochs:.1f} epochs of {arch} ({rate:,.0f} img/s) in the time left, "
                f"{verdict}")
        if epochs >= at_least:
            return wider, precision, timed
    return cfg, precision, decision


def build_hooks(cfg: TrainConfig, model: nn.Module, out: Path, decision: tune.Decision | None = None) -> list[Hook]:
    """The run's hooks, in the order they act after each step (the checkpointer last, so it saves their state)."""
    hooks: list[Hook] = []
    if decision is not None:
        hooks.append(SlowSteps(decision.seconds_per_step * LOOP_STEP_OVERHEAD))
    hooks += weight_hooks(cfg, model)
    if cfg.time_budget:  # the evaluation's cost as measured by the probe, where it ran
        hooks.append(TimeBudget(cfg.time_budget, eval_cost=decision.eval_cost if decision else None))
    if cfg.accuracy_marks:
        hooks.append(AccuracyMarks(cfg.accuracy_marks, out))
    # The checkpoint before the epoch's metrics line: a failed write (disk full) must not leave metrics.jsonl
    # ahead of last.pt, which a resume would then write again and a report show for a model not saved.
    return [*hooks, ProgressLog(cfg.log_every), StopOnSignal(),
            Checkpointer(cfg.checkpoint_every, cfg.checkpoint_every_minutes, cfg.keep_checkpoints),
            MetricsLog(out, cfg.tensorboard)]


def weight_hooks(cfg: TrainConfig, model: nn.Module) -> list[Hook]:
    """The hooks that change the weights (part of the training step, and of what ``reslab bench`` times)."""
    hooks: list[Hook] = []
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
    return hooks


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


def class_weights(split, num_classes: int, device: torch.device) -> torch.Tensor:
    """Inverse class frequency, normalised so that a balanced folder gets weight 1 everywhere."""
    counts = torch.bincount(split.labels, minlength=num_classes).float().clamp_min(1)
    return (len(split) / (num_classes * counts)).to(device)


def restore(run: Run, state: dict[str, Any]) -> None:
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
    if saved_total and saved_total != run.total_steps and not run.cfg.time_budget:
        say(f"resuming at step {run.step}: the run now ends at step {run.total_steps} (was {saved_total}); "
            f"the learning-rate schedule follows the new length")


# --- the parts of a run, in the order setup builds them -------------------------------------------------------

def build_runtime(cfg: TrainConfig) -> tuple[torch.device, distributed.Dist]:
    """The device and process group; an impossible device, precision or model name fails before anything loads."""
    device, _ = prepare(cfg.device, cfg.precision, cfg.threads)
    d = distributed.init(device.type, cfg.collective_timeout)
    if d.enabled and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)  # one process per GPU
        torch.cuda.set_device(device)
    model_info(cfg.arch)
    return device, d


def build_data(cfg: TrainConfig, d: distributed.Dist, resume: dict[str, Any] | None, out: Path,
               data_changed: bool) -> tuple[TrainConfig, DataBundle, Pretrained | None]:
    """The splits and their normalisation (the run's own on resume, the pretrained weights' when fine-tuning), the
    inputs reslab chose for a new run, and the batch size the data allows."""
    if resume is None:  # a resumed run's config is already resolved
        # Only an augmentation left to reslab needs a look at the images (a few hundred file headers).
        family = model_info(cfg.arch).family
        size = typical_image_size(cfg.data, cfg.labels) if cfg.augment is None else None
        cfg, chosen = resolve_inputs(cfg, family, size)
        if chosen:
            say(chosen)
    holdout = _recorded_split(cfg, out, data_changed) if resume is not None else None
    data = load_data(cfg.data, augment=cfg.augment, input_size=cfg.input_size, data_dir=cfg.data_dir,
                     loader=cfg.loader, train_samples=cfg.train_samples, test_samples=cfg.test_samples,
                     val_split=cfg.val_split, seed=cfg.seed, strict=cfg.strict, test_split=cfg.test_split,
                     holdout=holdout, labels=cfg.labels)
    if data.holdout is not None and resume is None and d.main:
        atomic_write(out / SPLIT_FILE, lambda f: f.write(split_json(data.holdout)))
    if resume is not None:  # the normalisation the run started with (its pretrained weights', or its data's)
        data.mean, data.std = tuple(resume["meta"]["mean"]), tuple(resume["meta"]["std"])
        _check_same_data(resume["meta"].get("data"), fingerprint(data), out, data_changed)
    pretrained = load_pretrained(cfg.pretrained, cfg.arch) if cfg.pretrained and resume is None else None
    if pretrained is not None:
        data.mean, data.std = pretrained.mean, pretrained.std
    if len(data.classes) < 2:
        raise DataError(f"{cfg.data} has one class ({data.classes[0]}): a classifier needs at least two to learn "
                        f"anything (every image would be 100 % right)")
    say(_describe_classes(data.train, cfg.balance))
    if cfg.drop_last and cfg.batch_size > len(data.train):
        small = max(d.world, len(data.train) // d.world * d.world)
        say(f"--batch-size {cfg.batch_size} is more than the {len(data.train)} training images: using "
            f"{small}")
        cfg = dataclasses.replace(cfg, batch_size=small)
    return cfg, data, pretrained


def _recorded_split(cfg: TrainConfig, out: Path, data_changed: bool) -> FolderSplit | None:
    """A resumed run's held-out images (one folder of class folders), checked still there: a missing one would
    silently move the test set."""
    holdout = read_split(out)
    if holdout is None:
        if cfg.data not in ("cifar10", "digits") and needs_split(cfg.data, cfg.labels):
            raise DataError(f"{out} records no split of {cfg.data} ({SPLIT_FILE} is missing): cannot tell which "
                            f"images it held out")
        return None
    missing = [f for f in holdout.test if not (Path(cfg.data) / f).is_file()]
    if missing and not data_changed:
        raise DataError(f"{len(missing)} of the {len(holdout.test)} images {out} held out for testing are gone from "
                        f"{cfg.data} (e.g. {missing[0]}): --data-changed ok continues without them")
    return holdout


def build_execution(cfg: TrainConfig, device: torch.device, d: distributed.Dist, data: DataBundle, clock: float,
                    resume: dict[str, Any] | None) -> tuple[TrainConfig, str, tune.Decision | None]:
    """Threads, precision and layout (measured where left open), then the preset's budget rule for a new run."""
    cfg, precision, decision = _execution(cfg, device, d, len(data.classes), len(data.train))
    if cfg.budget_rule and resume is None:
        cfg, precision, decision = _apply_budget_rule(cfg, device, d, data, decision, clock)
    return cfg, precision, decision


def build_batches(cfg: TrainConfig, data: DataBundle, device: torch.device,
                  d: distributed.Dist) -> tuple[Batches, dict[str, Batches]]:
    """This rank's training batches (its slice of every global batch) and its shards of the evaluation splits."""
    train_transform = BatchTransform(cfg.augment, True, cfg.input_size, data.mean, data.std, cfg.auto_augment,
                                     cfg.random_erasing)
    train_batches = Batches(data.train, train_transform,
                            cfg.batch_size, shuffle=cfg.shuffle, drop_last=cfg.drop_last, seed=cfg.seed,
                            device=device, workers=cfg.workers, rank=d.rank, world=d.world,
                            alternate_flips=cfg.flip == "alternate")
    evaluation = {name: eval_batches(split.subset(distributed.shard_for_eval(len(split), d)), cfg.augment,
                                     cfg.input_size, data.mean, data.std, max(cfg.batch_size // d.world, 256),
                                     device, cfg.workers)
                  for name, split in (("val", data.val), ("test", data.test)) if split is not None}
    return train_batches, evaluation


def eval_transform_of(cfg: TrainConfig, data: DataBundle) -> BatchTransform:
    """What evaluation feeds the model: no augmentation, the run's size and normalisation."""
    return BatchTransform(cfg.augment, False, cfg.input_size, data.mean, data.std)


def build_model(cfg: TrainConfig, data: DataBundle, device: torch.device, precision: str,
                pretrained: Pretrained | None, resume: dict[str, Any] | None) -> nn.Module:
    """The network: pretrained weights applied, frozen parts, BatchNorm settings, the fast nets' whitening stem
    fitted to the data (new runs), and the memory layout."""
    model = create_model(cfg.arch, num_classes=len(data.classes), **cfg.model_kwargs).to(device)
    if pretrained is not None:
        loaded = apply_pretrained(model, pretrained, data.classes)
        say(loaded)
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
        sample = Batches(data.train, eval_transform_of(cfg, data), min(len(data.train), 5000), shuffle=True,
                         drop_last=False, seed=cfg.seed, device=device)
        model.init_whitening(next(iter(sample.epoch(0)))[0])
    if cfg.channels_last if cfg.channels_last is not None else default_channels_last(device, precision):
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer | SGD | Chain:
    """The optimizer over the model's trainable parameters, grouped by weight decay and learning-rate scale."""
    return make_optimizer(cfg, param_groups(model, cfg.weight_decay, cfg.decay_bn_bias, cfg.bias_lr_scale,
                                            cfg.head_lr_scale))


def model_meta(cfg: TrainConfig, data: DataBundle, pretrained: Pretrained | None,
               resume: dict[str, Any] | None) -> dict[str, Any]:
    """What is saved with the model: all that ``eval`` and ``predict`` need, and the data it was trained on."""
    return {"arch": cfg.arch, "model_kwargs": cfg.model_kwargs, "classes": data.classes,
            "input_size": cfg.input_size, "augment": cfg.augment, "tta": cfg.tta,
            "tta_fraction": cfg.tta_fraction, "mean": list(data.mean),
            "std": list(data.std), "data": fingerprint(data), "family": model_info(cfg.arch).family,
            "reslab_version": package_version(),
            "torch_version": str(torch.__version__),
            "pretrained": pretrained.source if pretrained else (resume or {}).get("meta", {}).get("pretrained")}


def bare_run(cfg: TrainConfig, data: DataBundle, device: torch.device, precision: str,
             pretrained: Pretrained | None = None) -> Run:
    """A run made by the same builders as a training run (batches, model, optimizer, the hooks that change the
    weights) that writes nothing and has no run directory: what ``reslab bench`` times and ``reslab lr-find`` trains.
    One process; the execution choices are the config's as given (no probe)."""
    single = distributed.Dist()
    train_batches, evaluation = build_batches(cfg, data, device, single)
    model = build_model(cfg, data, device, precision, pretrained, None)
    run = Run(cfg, Path(cfg.out or "."), device, precision, single, data, train_batches, evaluation, model,
              build_optimizer(cfg, model), torch.amp.GradScaler("cuda") if precision == "fp16" else None,
              meta={}, hooks=weight_hooks(cfg, model), clock=time.perf_counter(), meter=EpochMeter(device),
              total_steps=total_steps(cfg, len(data.train)))
    if cfg.compile:
        run.model = torch.compile(run.model)
    return run
