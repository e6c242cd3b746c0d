"""Training: ``setup`` composes a ``Run`` from a config with the builders of ``build.py``; ``fit`` (``loop.py``)
runs it; ``train`` is both, with the run directory held for the whole run and ``--resume``'s rules.

Imports: ``build`` and ``loop`` (and what they are made of); nothing imports this module but the CLI, compare and
the package's API.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Collection
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ..config.schema import RESUMABLE, TrainConfig, make_config
from ..core import distributed, rundir
from ..core.errors import AlreadyFinished, CheckpointError, ConfigError, UserError
from ..core.execution import machine_info
from ..core.log import say
from ..models.checkpoint import load_checkpoint
from . import build
from .build import make_optimizer, param_groups
from .loop import EpochMeter, Run, TrainResult, fit
from .schedule import lr_at

__all__ = ["EpochMeter", "Run", "TrainResult", "fit", "lr_at", "make_optimizer", "param_groups",
           "resume_config", "run_dir", "setup", "train"]

# --- setup ----

def setup(cfg: TrainConfig, resume: dict[str, Any] | None = None, started: float | None = None,
          data_changed: bool = False) -> Run:
    """Build data, model, optimizer, hooks and run directory from ``cfg`` (and a checkpoint when resuming).

    ``started`` (a ``time.perf_counter()`` value, default now) is the origin of ``--time-budget`` and the times of
    the accuracy marks; the CLI passes the process start, so they count the whole command. ``data_changed``: a
    resumed run may continue on a folder whose images changed since it started (never on other classes).
    """
    clock = time.perf_counter() if started is None else started
    device, d = build.build_runtime(cfg)
    out = Path(run_dir(cfg))
    if resume is None and (rundir.has_checkpoint(out) or rundir.is_finished(out)):
        raise UserError(f"{out} already holds a run: continue it with --resume {out}, or choose another --out")
    torch.manual_seed(cfg.seed)
    cfg, data, pretrained = build.build_data(cfg, d, resume, out, data_changed)
    cfg, precision, decision = build.build_execution(cfg, device, d, data, clock, resume)
    train_batches, eval_batches = build.build_batches(cfg, data, device, d)
    model = build.build_model(cfg, data, device, precision, pretrained, resume)
    optimizer = build.build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        torch.set_rng_state(resume["rng"]["torch"])
    cfg = dataclasses.replace(cfg, out=str(out))
    if d.main:  # only rank 0 writes
        out.mkdir(parents=True, exist_ok=True)
        rundir.write_config(out, cfg.to_dict())
        rundir.write_machine(out, machine_info(device, precision))
    run = Run(cfg, out, device, precision, d, data, train_batches, eval_batches, model, optimizer, scaler,
              build.model_meta(cfg, data, pretrained, resume), hooks=build.build_hooks(cfg, model, out, decision),
              clock=clock, meter=EpochMeter(device), total_steps=build.total_steps(cfg, len(data.train)),
              loss_weight=build.class_weights(data.train, len(data.classes), device) if cfg.balance == "loss" else None)
    if resume is not None:
        build.restore(run, resume)
    run.model = distributed.wrap(model, d, device, cfg.sync_bn)
    if cfg.compile:
        run.model = torch.compile(run.model)
    return run


# --- the entry point ----

def resume_config(saved: dict[str, Any], overrides: dict[str, Any], run_dir: str | Path) -> TrainConfig:
    """The config of a resumed run: the saved one, with the ``overrides`` that may change (refused otherwise)."""
    changed = {k: v for k, v in overrides.items() if k not in saved or saved[k] != v}
    refused = sorted(set(changed) - RESUMABLE)  # what the config's sections allow
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
        preset: ``seed``, ``paper`` or ``fast`` (see ``reslab.config.presets.PRESETS``).
        resume: a run directory to continue from its ``last.pt``; ``overrides`` may then change its length,
            evaluation, logging and device (``config.RESUMABLE``), nothing else.
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
        # rundir.own: the whole run, so no second process writes into it
        with rundir.own(cfg.out, new=True, force=force), distributed.naming_lost_peers(Path(cfg.out)):
            return fit(setup(cfg, started=started))
    if config is not None or preset is not None:
        raise ConfigError("--resume continues a run with its saved config: no --preset or --config with it")
    if not Path(resume).is_dir():
        raise UserError(f"no run directory {resume} to resume")
    with rundir.own(resume, new=False), distributed.naming_lost_peers(Path(resume)):
        state = load_checkpoint(Path(resume) / rundir.CHECKPOINT_FILE)
        if not (isinstance(state, dict) and {"config", "step", "model", "meta"} <= set(state)):
            raise CheckpointError(f"{Path(resume) / rundir.CHECKPOINT_FILE} is not a reslab training checkpoint (it "
                                  f"holds {'a bare state_dict' if isinstance(state, dict) else type(state).__name__}"
                                  f"): nothing to resume")
        run = setup(resume_config(state["config"], overrides, resume), resume=state, started=started,
                    data_changed=data_changed)
        marks_lost = run.cfg.accuracy_marks and not rundir.read_marks(run.out)  # killed while scoring them
        if marks_lost and rundir.is_finished(run.out):
            say(f"reslab: {run.out} finished training but its accuracy marks were not scored (interrupted): "
                f"scoring them now")
        if run.step >= run.total_steps and not run.meter.seen and rundir.is_finished(run.out) and not marks_lost:
            raise AlreadyFinished(f"{run.out} already finished ({run.step} steps, {run.total_steps} asked): give a "
                                  f"longer --epochs or --steps with --resume to train on")
        return fit(run)


def elastic_restart() -> bool:
    """Whether torchrun's elastic agent restarted this worker group (``--max-restarts``) after a failure."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def continue_or_start(config: TrainConfig, given: Collection[str] = (), started: float | None = None,
                      force: bool = False) -> TrainResult | None:
    """``--resume auto`` (and any start of a group torchrun restarted): continue ``config.out`` from its
    ``last.pt`` when it has one, else start the run; one line says which. Options ``given`` that may change on
    resume (``config.RESUMABLE``) are applied; others keep the run's own values, named in one line when they
    differ. Returns ``None`` when the run had already finished."""
    if not config.out:
        raise ConfigError("--resume auto continues or starts the run in --out: give --out RUN")
    out = Path(config.out)
    if not rundir.has_checkpoint(out):
        say(f"reslab: {out} has no checkpoint: starting the run"
            + (f" (restart {os.environ['TORCHELASTIC_RESTART_COUNT']} by torchrun)" if elastic_restart() else ""))
        return train(config, started=started, force=force)
    saved = rundir.read_config(out) or {}
    asked = {k: getattr(config, k) for k in given if k in RESUMABLE}
    # --out is where the run is now (a copied or moved run records the folder it started in): never "kept".
    kept = sorted(k for k in given if k not in RESUMABLE and k != "out" and k in saved
                  and saved[k] != getattr(config, k))
    say(f"reslab: {out} has a checkpoint: resuming it"
        + (f" (restart {os.environ['TORCHELASTIC_RESTART_COUNT']} by torchrun)" if elastic_restart() else "")
        + (f"; kept the run's own {', '.join(_flag(k, saved[k]) for k in kept)}"
           if kept else ""))
    try:
        return train(resume=str(out), started=started, **asked)
    except AlreadyFinished as exc:
        say(f"reslab: {exc}: nothing to do")
        return None


def _flag(name: str, value: Any) -> str:
    return f"--{name.replace('_', '-')} {value!r}"


def run_dir(cfg: TrainConfig) -> str:
    """Where the run writes: ``--out``, else ``runs/<arch>-<date>-<time>``."""
    return cfg.out or f"runs/{cfg.arch}-{datetime.now():%Y%m%d-%H%M%S}"
