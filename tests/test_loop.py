"""The training loop and its hooks: resume with new flags, hook state in checkpoints, budgets decided once, no
per-step device synchronisation, and the bugs found in review (each test failed before its fix)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import reslab
from reslab.config.schema import make_config
from reslab.models import create_model
from reslab.models.checkpoint import load_checkpoint
from reslab.training.hooks import BUDGET_END_SECONDS, BUDGET_RESERVE, Hook, Lookahead, TimeBudget, size_to_budget
from reslab.training.train import fit, param_groups, setup

from helpers import make_folder, metrics

TINY = dict(arch="resnet20", batch_size=8, lr=0.02, precision="fp32", threads=1, log_every=1000)



# --- resume -------------------------------------------------------------------------------------------------------

def test_resume_with_more_epochs_trains_on_and_refuses_what_defines_the_run(tmp_path, cli):
    folder = make_folder(tmp_path / "data", per_class=8)  # 24 images: 3 steps per epoch
    run = tmp_path / "run"
    args = ["--arch", "resnet20", "--batch-size", "8", "--precision", "fp32", "--lr", "0.02", "--threads", "1"]
    assert cli("train", "--data", folder, "--out", run, *args, "--epochs", "3")[0] == 0
    code, _, err = cli("train", "--resume", run)
    assert code == 1 and "already finished" in err and "--epochs" in err
    code, _, err = cli("train", "--resume", run, "--epochs", "6", "--eval-every", "2")
    assert code == 0, err
    lines = metrics(run)
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4, 5, 6] and lines[-1]["step"] == 18
    assert "test_acc" not in lines[4] and "test_acc" in lines[5]  # --eval-every 2 took effect: epoch 5 not scored
    assert load_checkpoint(run / "last.pt")["config"]["epochs"] == 6
    code, _, err = cli("train", "--resume", run, "--epochs", "7", "--arch", "resnet32")
    assert code == 1 and "--arch cannot change when resuming" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("train", "--resume", run, "--batch-size", "4")
    assert code == 1 and "--batch-size cannot change" in err


def test_marks_survive_a_crash_at_the_last_step(tmp_path):
    """Checkpointed at its last step, killed before the epoch's end: the resume finishes the epoch, and the marks
    come from the snapshots taken before the crash too."""
    folder = make_folder(tmp_path / "data", per_class=8)
    kw = dict(data=str(folder), epochs=10, accuracy_marks=[0.5, 0.99], checkpoint_every=30, **TINY)
    full = reslab.train(out=str(tmp_path / "full"), **kw)

    class Crash(Hook):
        def on_step_end(self, run, loss, lr):
            if run.step == 30:
                raise SystemExit("killed")

    run = setup(make_config(out=str(tmp_path / "part"), **kw))
    run.hooks.append(Crash())  # after the checkpointer: last.pt holds step 30, the epoch's end never ran
    with pytest.raises(SystemExit):
        fit(run)
    assert load_checkpoint(tmp_path / "part" / "last.pt")["step"] == 30
    resumed = reslab.train(resume=str(tmp_path / "part"))
    assert resumed.step == full.step == 30 and resumed.test_acc == full.test_acc
    strip = lambda marks: {m: (r["step"], r["test_acc"]) for m, r in marks.items()}
    assert strip(resumed.accuracy_marks) == strip(full.accuracy_marks)
    assert full.accuracy_marks["0.5"]["step"] is not None
    assert metrics(tmp_path / "part")[-2]["train_loss"] == pytest.approx(metrics(tmp_path / "full")[-2]["train_loss"])
    assert not (tmp_path / "part" / "snapshots").exists()  # scored, then removed


# --- hooks ----------------------------------------------------------------------------------------------------------

def test_lookahead_pulls_toward_the_average_and_ends_on_the_weights():
    lin = torch.nn.Linear(2, 2)
    la = Lookahead(lin)
    start = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    la.update(4, 10)  # not a multiple of 5: nothing happens
    assert torch.equal(lin.weight, start + 1)
    la.update(5, 10)  # decay 0.95^5 * 0.5^3 of the average survives; the weights are reset to the average
    d = 0.95**5 * 0.125
    assert torch.allclose(lin.weight, start + (1 - d), atol=1e-6) and torch.equal(lin.weight, la.average[0])
    with torch.no_grad():
        lin.weight.add_(1.0)
    before = lin.weight.detach().clone()
    la.update(10, 10)  # the last step: the average moves onto the weights, which stay as they are
    assert torch.equal(lin.weight, before) and torch.equal(la.average[0], before)
    state = la.state_dict()
    other = Lookahead(torch.nn.Linear(2, 2))
    other.load_state_dict(state)
    assert torch.equal(other.average[0], before)


def test_size_to_budget_pins_the_arithmetic():
    # 60 s budget, 10 s spent, 4 s of evaluation to come, 0.5 s per step, 11 steps done.
    left = 60 * (1 - BUDGET_RESERVE) - 10 - 4 - BUDGET_END_SECONDS
    assert size_to_budget(60, 10, 11, 0.5, 4) == 11 + int(left / 0.5)
    assert size_to_budget(60, 70, 11, 0.5, 4) == 12  # over budget: one more step, never fewer than done
    assert size_to_budget(60, 70, 11, 0.5, 4, min_steps=20) == 20  # ... and at least to the end of the warm-up


def test_time_budget_hook_with_a_fake_clock_ends_inside_the_budget():
    """A fake clock ticks 0.5 s per step, then 0.55 s per step from step 30: the run is sized at step 11 and shortened
    at the later tenths, and ends inside its minute."""
    now = [0.0]
    hook = TimeBudget(1.0, clock=lambda: now[0])
    run = SimpleNamespace(step=0, total_steps=1000, device=torch.device("cpu"), eval_batches={}, clock=0.0,
                          cfg=SimpleNamespace(tta="none", tta_fraction=1.0, batch_size=8, warmup=0, accuracy_marks=[]),
                          train_batches=range(10),
                          dist=SimpleNamespace(main=False, enabled=False))
    run.set_total_steps = lambda total: setattr(run, "total_steps", total)  # the one call a hook changes a run by
    hook.on_fit_start(run)
    sized = []
    while run.step < run.total_steps:
        now[0] += 0.5 if run.step < 30 else 0.55
        run.step += 1
        hook.on_step_end(run, torch.zeros(()), 0.1)
        sized.append(run.total_steps)
    first = 11 + int((60 * (1 - BUDGET_RESERVE) - 5.5 - BUDGET_END_SECONDS) / 0.5)
    assert sized[10] == first == 112  # step 11: 0.5 s per step measured over steps 4..11
    assert run.total_steps < first  # the slowdown shortened the run
    assert now[0] + BUDGET_END_SECONDS <= 60  # and it still ends inside the budget
    assert hook.state_dict() == {"total_steps": run.total_steps}


def test_param_groups_give_the_fast_lr_to_bn_biases_only():
    m = create_model("resnet20")  # trainable BatchNorm scales
    groups = param_groups(m, weight_decay=1e-3, decay_bn_bias=True, bias_lr_scale=64)
    fast = {id(p) for g in groups if g["lr_scale"] == 64 for p in g["params"]}
    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert fast == {id(bn.bias) for bn in bns}
    scales = {id(bn.weight) for bn in bns}
    assert all(g["lr_scale"] == 1 for g in groups if scales & {id(p) for p in g["params"]})
    trainable = [id(p) for p in m.parameters()]
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(trainable)  # each exactly once


def test_no_device_sync_per_step(tmp_path, monkeypatch):
    """Between log lines, a training step reads nothing back from the device (no .item(), no bool(tensor))."""
    folder = make_folder(tmp_path / "data", per_class=8)
    run = setup(make_config(data=str(folder), out=str(tmp_path / "run"), epochs=3, **{**TINY, "log_every": 4}))
    reads = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            reads.append(name)
            return original(self, *a, **k)
        return wrapper

    for name in ("item", "__bool__", "tolist", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))

    class Count(Hook):
        def __init__(self):
            self.per_step = {}

        def on_step_end(self, run, loss, lr):
            self.per_step[run.step] = len(reads)

    count = Count()
    run.hooks.insert(0, count)
    fit(run)
    n = count.per_step
    # Steps 1-3 and 5-6 read nothing (step 4 logs; epoch 1 ends after step 3 and its evaluation reads results).
    assert n[2] == n[1] and n[3] == n[2]
    assert n[6] == n[5]
    assert n[4] > n[3]  # a log step does read: the check has teeth


# --- the review's bugs ------------------------------------------------------------------------------------------------

def test_folders_load_where_the_os_has_no_affinity_mask(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "data", per_class=2, splits=("train",))
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    from reslab.core.execution import usable_cores
    from reslab.data import load_split
    assert usable_cores() >= 1
    assert len(load_split(str(folder), "train", store_size=32)) == 6


def test_bench_on_a_folder_of_twenty_classes(tmp_path, cli):
    colours = {f"c{i:02d}": (10 * i, 255 - 10 * i, 128) for i in range(20)}
    folder = make_folder(tmp_path / "data", per_class=2, classes=colours)
    code, out, err = cli("bench", "--arch", "resnet20", "--preset", "paper", "--data", folder, "--batch-size", "8",
                         "--steps", "2", "--warmup", "1", "--precision", "fp32", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["num_classes"] == 20 and r["images_per_sec"] > 0


def test_compare_refuses_a_finished_run_of_another_recipe(tmp_path, cli):
    folder = make_folder(tmp_path / "data", per_class=4)
    args = ["--data", folder, "--epochs", "1", "--batch-size", "8", "--precision", "fp32", "--out", tmp_path / "cmp"]
    assert cli("compare", "--archs", "resnet20", "--lr", "0.01", *args)[0] == 0
    code, _, err = cli("compare", "--archs", "resnet20", "--lr", "0.01", "--threads", "1", *args)
    assert code == 0 and "reused" in err  # threads do not change the experiment
    code, _, err = cli("compare", "--archs", "resnet20", "--lr", "0.05", *args)
    assert code == 1 and "another recipe" in err and "--lr 0.01 (asked 0.05)" in err
    assert len(err.strip().splitlines()) == 1


def test_a_bug_shows_its_traceback(tmp_path, monkeypatch):
    """Only the UserError family becomes one line; an unexpected exception is a bug and keeps its traceback."""
    import reslab.cli.commands

    def broken(json: bool = False) -> None:
        raise KeyError("internal")

    monkeypatch.setitem(reslab.cli.commands.COMMANDS, "models", broken)
    with pytest.raises(KeyError):
        reslab.cli.commands.main(["models"])


# --- torchrun ---------------------------------------------------------------------------------------------------------

def test_time_budget_under_torchrun_ends_both_ranks_at_the_same_step(tmp_path):
    folder = make_folder(tmp_path / "data", per_class=24)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "reslab",
           "train", "--data", str(folder), "--out", str(run), "--arch", "resnet20", "--batch-size", "16",
           "--precision", "fp32", "--threads", "1", "--epochs", "1000", "--time-budget", "0.5", "--lr", "0.05"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)  # a disagreement hangs: the timeout fails
    assert r.returncode == 0, r.stderr[-3000:]
    step = load_checkpoint(run / "last.pt")["step"]
    assert metrics(run)[-1]["step"] == step < 1000 * 4
    assert "time budget 0.5 min" in r.stderr and r.stderr.count("time budget 0.5 min") == 1  # rank 0 speaks
