"""The training loop's stateful features, one small object each.

A hook sees the run at a few points of ``fit`` (``on_fit_start``, ``on_epoch_start``, ``on_step_end``,
``on_epoch_end``, ``on_fit_end``, ``close``) and owns whatever it remembers: ``state_dict`` goes into ``last.pt``
under the hook's ``name`` and comes back through ``load_state_dict`` on ``--resume``. The shape follows Lightning's
and fastai's callbacks and timm's ``ModelEmaV3``, smaller.

Under torchrun every rank runs every hook. A hook that decides something from a clock or a signal decides it once
(rank 0's clock, any rank's signal) and shares the decision, so all ranks take the same number of steps.

One hook per file, as Lightning keeps one callback per file.
"""

from __future__ import annotations

from ..loop import Hook  # the base class, beside the loop that calls it
from .accuracy_marks import AccuracyMarks
from .checkpointer import Checkpointer
from .ema import WeightEma
from .frozen_backbone import FrozenBackbone
from .lookahead import Lookahead
from .metrics_log import MetricsLog
from .progress_log import ProgressLog
from .slow_steps import SlowSteps
from .stop_on_signal import StopOnSignal
from .time_budget import (
    BUDGET_END_SECONDS,
    BUDGET_MEASURE,
    BUDGET_RESERVE,
    EVAL_COST,
    MARKS_RESERVED,
    TimeBudget,
    eval_seconds,
    size_to_budget,
)
from .whitening_bias import WhiteningBiasWindow

__all__ = [
    "BUDGET_END_SECONDS",
    "BUDGET_MEASURE",
    "BUDGET_RESERVE",
    "EVAL_COST",
    "MARKS_RESERVED",
    "AccuracyMarks",
    "Checkpointer",
    "FrozenBackbone",
    "Hook",
    "Lookahead",
    "MetricsLog",
    "ProgressLog",
    "SlowSteps",
    "StopOnSignal",
    "TimeBudget",
    "WeightEma",
    "WhiteningBiasWindow",
    "eval_seconds",
    "size_to_budget",
]
