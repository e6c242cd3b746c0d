"""Seeing the model and the data: the learning-rate finder (and, below it, the tools that read a trained run)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from reslab import build
from reslab.config import make_config
from reslab.lrfind import range_test, smooth, suggest

TINY = ["--arch", "resnet20", "--batch-size", "16", "--precision", "fp32", "--threads", "1"]


def test_lr_find_writes_the_curve_and_the_plot_and_suggests_a_tenth_of_the_minimum(tmp_path, folder, cli):
    out = tmp_path / "lr"
    code, stdout, err = cli("lr-find", "--data", folder, *TINY, "--out", out, "--range-steps", "40",
                            "--end-lr", "1000", "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert (out / "lr_find.png").stat().st_size > 10_000 and json.loads((out / "lr_find.json").read_text()) == r
    lrs = r["lrs"]
    assert lrs[0] == pytest.approx(1e-6) and all(b > a for a, b in itertools.pairwise(lrs))
    assert r["suggested_lr"] == pytest.approx(r["min_loss_lr"] / 10) and r["preset_lr"] == 0.1
    assert r["min_loss_lr"] == lrs[min(range(len(lrs)), key=r["smoothed"].__getitem__)]
    # An lr of 1000 diverges: the test stops there, before its last step.
    assert len(lrs) < 40 and r["stopped"].startswith("diverged at lr")
    code, stdout, _ = cli("lr-find", "--data", folder, *TINY, "--out", tmp_path / "lr2", "--range-steps", "12")
    assert code == 0 and stdout.startswith("suggested lr ") and "the config's --lr is 0.1" in stdout


def test_the_range_test_trains_a_copy_and_leaves_the_run_as_it_was(folder):
    cfg = make_config(data=str(folder), arch="resnet20", batch_size=16, precision="fp32", augment="paper",
                      image_size=32, momentum=0.9)
    from reslab.data import load_data

    data = load_data(cfg.data, augment=cfg.augment, input_size=32)
    run = build.bare_run(cfg, data, torch.device("cpu"), "fp32")
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    state = run.optimizer.state_dict()
    result = range_test(run, 1e-4, 1.0, 8, progress=False)
    assert len(result.lrs) == 8 and all(math.isfinite(v) for v in result.losses)
    assert all(torch.equal(weights[k], v) for k, v in run.model.state_dict().items())
    assert run.optimizer.state_dict()["state"] == state["state"] == {} and run.step == 0


def test_the_suggestion_rule_on_a_known_curve():
    lrs = [10 ** (-6 + 7 * i / 99) for i in range(100)]
    losses = [(math.log10(lr) + 2) ** 2 for lr in lrs]  # lowest at lr 1e-2, steepest far below it
    suggested, at_min, steepest = suggest(lrs, losses)
    assert at_min == pytest.approx(1e-2, rel=0.1) and suggested == pytest.approx(1e-3, rel=0.1)
    assert steepest < at_min
    assert smooth([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # bias-corrected: no start at zero


def test_lr_find_refuses_a_run_directory_as_its_output(tmp_path, folder, cli):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("arch: resnet20\n")
    code, _, err = cli("lr-find", "--data", folder, *TINY, "--out", tmp_path / "run")
    assert code == 1 and "holds a training run" in err
