"""What a --time-budget buys (issue 33): the fast preset's net width chosen from the epochs each width gets here, the
post-training work counted inside the budget, and the benchmark's execution chosen as training chooses it."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from reslab.config import schema
from reslab.config.schema import make_config
from reslab.training import build, tune
from reslab.training.hooks import BUDGET_END_SECONDS, MARKS_RESERVED, AccuracyMarks, TimeBudget, eval_seconds
from reslab.training.loop import GUARD_IMAGES

# Seconds per training step of each net at batch 256 (the fake probe's answers): each width 2x the one before.
STEP_SECONDS = {"resnet9s": 0.05, "conv8m": 0.1, "conv8w48": 0.2, "conv8": 0.4}


def _fake_timer(timed: list[str]):
    def step_timer(arch, model_kwargs, num_classes, batch_size, image_size, device=None, clock=None):
        def measure(choice):
            timed.append(arch)
            return STEP_SECONDS[arch]

        measure.eval_costs = {}
        return measure

    return step_timer


@pytest.mark.parametrize(("minutes", "arch", "timed"), [
    (0.3, "conv8m", []),  # ~8 epochs of conv8m: under every wider net's threshold, so no wider net is timed
    (0.5, "conv8m", ["conv8", "conv8w48"]),  # ~14 of conv8m: conv8 gets ~3.5 (< 10), conv8w48 ~7 (< 12)
    (1.0, "conv8w48", ["conv8", "conv8w48"]),  # conv8 ~7 (< 10), conv8w48 ~14 (>= 12)
    (2.0, "conv8", ["conv8"]),  # conv8 ~14 (>= 10): the widest that qualifies, the narrower ones never timed
])
def test_the_width_rule_trains_the_widest_net_whose_own_epochs_reach_its_threshold(minutes, arch, timed,
                                                                                  monkeypatch, capsys):
    widths = [("conv8", 10.0, {"tta_fraction": 0.3}), ("conv8w48", 12.0, {"tta_fraction": 0.3})]
    monkeypatch.setitem(schema.BUDGET_WIDTHS, "fast", widths)
    calls: list[str] = []
    monkeypatch.setattr(tune, "step_timer", _fake_timer(calls))
    cfg = make_config("fast", time_budget=minutes, arch="conv8m", tta="flip_shift", tta_fraction=1.0,
                      precision="fp32", threads=1, channels_last=False)
    cfg = cfg.__class__(**{**cfg.to_dict(), "budget_keep": ["tta"]})  # the rule chose conv8m; it may widen it
    choice = tune.Choice(1, "fp32", False)
    decision = tune.Decision(choice, {choice: STEP_SECONDS["conv8m"]})
    data = SimpleNamespace(train=range(5120), test=range(1000), val=None, classes=list("abcdefghij"))
    dist = SimpleNamespace(main=True, world=1, rank=0, enabled=False)
    widened, precision, chosen = build._widened(cfg, "fp32", torch.device("cpu"), dist, data, decision,
                                                time.perf_counter())
    assert (widened.arch, precision, calls) == (arch, "fp32", timed)
    assert chosen.seconds_per_step == STEP_SECONDS[arch]  # the budget is sized on the chosen net's own step
    assert widened.tta_fraction == (1.0 if arch == "conv8m" else 0.3)
    err = capsys.readouterr().err
    for name in timed:  # one line per width looked at, with its epochs and the verdict
        assert f"epochs of {name} (" in err
    kept = cfg.__class__(**{**cfg.to_dict(), "budget_keep": ["arch"]})  # an explicit --arch is never widened
    assert build._widened(kept, "fp32", torch.device("cpu"), dist, data, decision, time.perf_counter())[0].arch == \
        "conv8m"


def test_the_real_thresholds_grow_with_the_width_and_name_registered_nets():
    from reslab.models import list_models

    widths = schema.BUDGET_WIDTHS["fast"]
    assert [a for a, _, _ in widths] == ["conv8", "conv8w48"] and set(a for a, _, _ in widths) <= set(list_models())
    assert all(values["batch_size"] == 512 and values["lr"] == 1.5 for _, _, values in widths)  # as measured
    assert schema.rule_chooses("fast") >= {"arch", "tta_fraction", "optimizer", "batch_size", "lr"}
    assert make_config("fast", time_budget=10, batch_size=256).budget_keep == ["batch_size", "lr"]


def test_a_budget_leaves_the_presets_accuracy_marks_out_unless_asked_for():
    assert make_config("fast").accuracy_marks == schema.PRESETS["fast"]["accuracy_marks"]
    assert make_config("fast", time_budget=5).accuracy_marks == []
    assert make_config("fast", time_budget=5, accuracy_marks=[0.5]).accuracy_marks == [0.5]


def test_the_budget_reserves_the_final_evaluation_the_guard_and_asked_for_marks():
    cfg = SimpleNamespace(tta="flip_shift", tta_fraction=0.3, batch_size=256, accuracy_marks=[])
    per_pass = 0.4 * 0.25 / 256  # seconds of one image's evaluation forward pass
    views = 1 + 5 * 0.3
    assert eval_seconds(11000, cfg, 0.4, 0.25, 10000) == pytest.approx((11000 * views + GUARD_IMAGES) * per_pass)
    cfg.accuracy_marks = [0.9]  # ... and MARKS_RESERVED scorings of the test split
    assert eval_seconds(11000, cfg, 0.4, 0.25, 10000) == pytest.approx(
        ((11000 + MARKS_RESERVED * 10000) * views + GUARD_IMAGES) * per_pass)


def test_a_budgeted_run_with_marks_ends_inside_its_budget_on_a_fake_clock(tmp_path, monkeypatch):
    """Training steps, the final evaluation, the eval-mode guard, the marks' scoring and the save, each costing what
    it costs on a fake clock: the run is sized with all of it reserved, the scoring stops at the budget (here every
    snapshot is above the mark, so unbounded it would score all nine), and the whole ends inside the budget + 2 %."""
    now = [0.0]
    clock = lambda: now[0]
    step_s, cost = 0.5, 0.25
    per_pass = step_s * cost / 256
    cfg = SimpleNamespace(tta="flip_shift", tta_fraction=1.0, batch_size=256, warmup=0, accuracy_marks=[0.5],
                          time_budget=1.0)
    test = SimpleNamespace(split=range(1000))
    run = SimpleNamespace(step=0, total_steps=10_000, device=torch.device("cpu"), eval_batches={"test": test},
                          clock=0.0, cfg=cfg, train_batches=range(20), dist=SimpleNamespace(main=True, enabled=False),
                          model=nn.Linear(2, 2), out=tmp_path, precision="fp32", data=SimpleNamespace(classes=["a"]),
                          seconds=clock)
    run.set_total_steps = lambda total: setattr(run, "total_steps", total)
    scorings = []

    def evaluate(model, batches, device, precision, classes, tta="none", fraction=1.0):
        now[0] += len(batches.split) * (1 + 5 * fraction if tta == "flip_shift" else 1) * per_pass
        scorings.append(now[0])
        return SimpleNamespace(accuracy=0.9)

    monkeypatch.setattr("reslab.training.hooks.accuracy_marks.evaluate_batches", evaluate)
    budget, marks = TimeBudget(1.0, clock=clock, eval_cost=cost), AccuracyMarks([0.5], tmp_path, clock=clock)
    budget.on_fit_start(run)
    while run.step < run.total_steps:
        now[0] += step_s
        run.step += 1
        budget.on_step_end(run, torch.zeros(()), 0.1)
        marks.on_step_end(run, torch.zeros(()), 0.1)
    evaluate(None, test, None, None, None, cfg.tta, cfg.tta_fraction)  # the final evaluation
    now[0] += GUARD_IMAGES * per_pass  # the eval-mode guard
    marks.on_fit_end(run, {"wall_seconds": now[0], "step": run.step, "test_acc": 0.9})
    now[0] += BUDGET_END_SECONDS  # saving and leaving
    assert now[0] <= 60 * 1.02
    assert len(marks.snapshots) == 9 and 1 <= len(scorings) - 1 < 9  # the scoring stopped at the budget
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["scoring_complete"] is False and last["snapshots_scored"] == len(scorings) - 1


def test_bench_times_what_the_start_up_probe_picks_when_execution_is_left_open(monkeypatch):
    from reslab.training.bench import bench

    # A CPU where one thread in fp32 NCHW is fastest (a busy core, say): the bench must time that, as train would.
    def step_timer(arch, model_kwargs, num_classes, batch_size, image_size, device=None, clock=None):
        def measure(choice):
            layout = 1 if (choice.precision, choice.channels_last) == ("fp32", False) else 2
            return (0.01 if choice.threads == 1 else 0.03) * layout

        measure.eval_costs = {}
        return measure

    monkeypatch.setattr(tune, "step_timer", step_timer)
    monkeypatch.setattr("reslab.core.execution.usable_cores", lambda: 2)
    monkeypatch.setattr(tune, "usable_cores", lambda: 2)
    r = bench(arch="resnet9s", preset="fast", batch_size=8, steps=1, warmup=1)
    assert (r.threads, r.precision, r.channels_last, r.execution) == (1, "fp32", False, "probe")
    r = bench(arch="resnet9s", preset="fast", batch_size=8, steps=1, warmup=1, threads=1, precision="fp32",
              channels_last=True)
    assert (r.threads, r.channels_last, r.execution) == (1, True, "given")
