"""The fast preset (issue 9): its network, schedule, weight averaging, test-time augmentation, time budget and
accuracy marks, on tiny generated data."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from reslab.config.schema import make_config
from reslab.core import rundir
from reslab.data.augment import BatchTransform, crop_flip
from reslab.inference.evaluate import tta_logits
from reslab.models import FastResNet, create_model, list_models, model_info
from reslab.training.train import lr_at

# The fast preset shrunk to the tiny colour folders: same recipe, a few steps.
TINY_FAST = ["--preset", "fast", "--batch-size", "16", "--precision", "fp32", "--log-every", "5"]


def test_fast_nets_are_registered_residual_and_whitened():
    fast = [n for n in list_models() if model_info(n).family == "fast"]
    assert {"resnet9", "resnet9s"} <= set(fast) and all(model_info(n).residual for n in fast if "resnet" in n)
    assert model_info("resnet9").depth == 9
    # The airbench layout: two convs per stage, GELU, no shortcut (a plain net), 8 weighted layers.
    conv8m = create_model("conv8m")
    assert not model_info("conv8m").residual and model_info("conv8m").depth == 8
    assert isinstance(conv8m.layer2[0].relu, torch.nn.GELU) and conv8m.layer3[0].conv2.in_channels == 128
    assert conv8m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    torch.manual_seed(0)
    # Correlated channels and neighbouring pixels, as in natural images.
    base = torch.randn(64, 1, 17, 17).repeat_interleave(2, -1).repeat_interleave(2, -2)[..., :32, :32]
    x = base * torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1) + 0.3 * torch.randn(64, 3, 32, 32)
    m = create_model("resnet9s")
    assert isinstance(m, FastResNet) and not m.conv1.weight.requires_grad
    m.init_whitening(x)
    out = F.conv2d(x, m.conv1.weight[:12])  # the first half of the filters; the rest are their negatives
    cov = torch.cov(out.permute(1, 0, 2, 3).reshape(12, -1))
    assert torch.allclose(cov, torch.eye(12), atol=0.05)  # decorrelated, unit variance
    assert torch.equal(m.conv1.weight[12:], -m.conv1.weight[:12])


def test_linear_schedule_warms_up_then_anneals_to_zero():
    cfg = make_config("fast", warmup=1)
    lrs = [lr_at(s, cfg, steps_per_epoch=10, total_steps=100) for s in range(101)]
    assert lrs[0] == pytest.approx(cfg.lr / 10) and max(lrs) == pytest.approx(cfg.lr)
    assert lrs[10] == pytest.approx(cfg.lr) and lrs[100] == 0.0
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_fast_augmentation_translates_with_reflection_and_flips():
    x = torch.randint(0, 255, (4, 32, 32, 3), dtype=torch.uint8)
    dy, dx = torch.tensor([0, 4, 2, 1]), torch.tensor([4, 0, 3, 2])
    flip = torch.tensor([False, True, False, True])
    out = crop_flip(x, 32, 2, dy, dx, flip, reflect=True)
    ref = F.pad(x.permute(0, 3, 1, 2).float(), (2, 2, 2, 2), mode="reflect")
    for i in range(4):
        r = ref[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        r = r.flip(-1) if flip[i] else r
        assert torch.equal(r.permute(1, 2, 0).to(torch.uint8), out[i])
    t = BatchTransform("fast", True, 32, (0.5,) * 3, (0.25,) * 3)
    assert t(x, torch.Generator().manual_seed(0)).shape == (4, 3, 32, 32)


def test_tta_views_agree_on_a_symmetric_image():
    torch.manual_seed(0)
    m = create_model("resnet9s").eval()
    x = torch.full((2, 3, 32, 32), 0.3)  # invariant under flips and reflected shifts
    with torch.no_grad():
        plain = tta_logits(m, x, "none")
        assert torch.allclose(tta_logits(m, x, "flip"), plain, atol=1e-5)
        assert torch.allclose(tta_logits(m, x, "flip_shift"), plain, atol=1e-5)
        y = torch.randn(2, 3, 32, 32)
        assert not torch.allclose(tta_logits(m, y, "flip"), tta_logits(m, y, "none"))
    with pytest.raises(ValueError, match="tta"):
        tta_logits(m, x, "rotate")


def test_time_budget_sizes_the_run_and_marks_are_recorded(folder, tmp_path, cli):
    import reslab

    run = tmp_path / "fast"
    # Without a budget the run would take 200 epochs (800 steps); the budget cuts it to what fits in 20 seconds.
    # Through the API the budget counts from the call (the CLI counts from process start).
    result = reslab.train(preset="fast", data=str(folder), out=str(run), batch_size=16, precision="fp32",
                          epochs=200, time_budget=0.33, accuracy_marks=[0.5, 1.0], lr=0.2, log_every=5)
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    final = [l for l in lines if "test_acc" in l][-1]
    sized = torch.load(run / "last.pt", weights_only=True)["hooks"]["time_budget"]["total_steps"]
    assert final["step"] == sized == result.step  # the run ended where the budget sized it
    assert final["lr"] < 0.2 * 0.1  # annealed: the linear schedule ended close to zero
    marks = lines[-1]["accuracy_marks"]
    assert set(marks) == {"0.5", "1"} and result.accuracy_marks == marks
    if final["test_acc"] >= 0.5:
        assert 0 < marks["0.5"]["seconds"] <= final["wall_seconds"] and marks["0.5"]["test_acc"] >= 0.5
    assert (marks["1"]["seconds"] is None) == (final["test_acc"] < 1.0)
    code, out, _err = cli("eval", run, "--data", folder, "--json")  # evaluates with the run's TTA (flip)
    assert code == 0 and json.loads(out)["accuracy"] == pytest.approx(final["test_acc"], abs=1e-6)


def test_compare_budgets_writes_the_frontier(folder, tmp_path, cli):
    out = tmp_path / "frontier"
    code, stdout, err = cli("compare", "--preset", "fast", "--data", folder, "--batch-size", "16", "--lr", "0.2",
                            "--budgets", "0.15", "--seeds", "0,1", "--out", out, "--accuracy-marks", "[0.5]")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["0.15min-seed0", "0.15min-seed1"]
    (row,) = summary["frontier"]
    accs = [r["final_test_acc"] for r in summary["runs"]]
    assert row["seeds"] == 2 and row["mean"] == pytest.approx(sum(accs) / 2) and row["min"] == min(accs)
    report = (out / "report.md").read_text()
    chosen = rundir.read_config(out / "0.15min-seed0")  # what the budget rule picked for that many epochs
    model = chosen["arch"] + (" + Muon" if chosen["optimizer"] == "muon" else "")
    tta = chosen["tta"] + ("" if chosen["tta_fraction"] == 1 else f"@{chosen['tta_fraction']:g}")
    assert "Accuracy against time budget" in report and f"| 0.15 | {model} | {tta} | 2 |" in report
    assert (out / "frontier.png").stat().st_size > 0 and "budget min" in stdout


def test_alternating_flips_show_every_image_both_ways_in_two_epochs():
    from reslab.data import Batches, BatchTransform, Split

    images = torch.zeros(64, 32, 32, 3, dtype=torch.uint8)
    images[:, :, 16:] = 255  # dark left half, bright right half: a flip is visible
    split = Split(torch.zeros(64, dtype=torch.long), ["x"], images=images)
    t = BatchTransform("fast", True, 32, (0.5,) * 3, (0.25,) * 3)

    def flipped(epoch: int, alternate: bool) -> torch.Tensor:
        b = Batches(split, t, 64, shuffle=False, drop_last=True, seed=0, device=torch.device("cpu"),
                    alternate_flips=alternate)
        (x, _), = list(b.epoch(epoch))
        return x[..., :16].mean(dim=(1, 2, 3)) > x[..., 16:].mean(dim=(1, 2, 3))

    first, second, third = flipped(0, True), flipped(1, True), flipped(2, True)
    assert 16 < first.sum() < 48 and torch.equal(second, ~first) and torch.equal(third, first)
    random = [flipped(e, False) for e in range(3)]
    assert not torch.equal(random[1], ~random[0])  # random flips repeat views


def test_the_whitening_bias_trains_for_its_epochs_then_holds(tmp_path, folder):
    from reslab.training.hooks import Hook
    from reslab.training.train import fit, setup

    biases = []

    class Record(Hook):
        def on_epoch_end(self, run, metrics):
            biases.append(run.model.conv1.bias.detach().clone())

    cfg = make_config("fast", data=str(folder), epochs=3, batch_size=16, whiten_bias_epochs=1, precision="fp32",
                      accuracy_marks=[], out=str(tmp_path / "run"))
    run = setup(cfg)
    run.hooks.insert(0, Record())
    fit(run)
    assert biases[0].abs().sum() > 0  # it trained in the first epoch
    assert torch.equal(biases[0], biases[1]) and torch.equal(biases[0], biases[2])  # and held after it
    with pytest.raises(Exception, match="whitening stem"):
        setup(make_config("paper", data=str(folder), whiten_bias_epochs=1, out=str(tmp_path / "r2")))


def test_the_fast_preset_picks_its_net_and_tta_from_the_epochs_its_budget_buys(folder, tmp_path, cli, monkeypatch):
    from reslab.config import schema
    from reslab.training import tune

    # The real rule, keyed on epochs of the preset's own net: the fewest epochs keep its choices; more buy the
    # two-conv net with Muon and partial TTA, then full TTA; an explicit option always wins (with the options that
    # go with it); a --config file switches the rule off.
    rules = schema.BUDGET_RULES["fast"]
    assert schema.budget_choices("fast", rules[0][0] - 0.01) == {} and schema.budget_choices("fast", None) == {}
    for at_least, values in rules:
        assert values.items() <= schema.budget_choices("fast", at_least).items()
    assert schema.budget_choices("fast", 100)["arch"] == "conv8m"
    assert "arch" not in schema.budget_choices("fast", 100, keep={"arch"})
    assert schema.budget_choices("fast", 100, keep={"config"}) == {}
    cfg = make_config("fast", time_budget=5)
    assert (cfg.arch, cfg.budget_rule, cfg.budget_keep) == ("resnet9s", "fast", [])  # decided when the run starts
    assert make_config("fast", time_budget=5, arch="resnet9s").budget_keep == ["arch", "optimizer",
                                                                              "whiten_bias_epochs"]
    assert make_config("fast", time_budget=5, tta="flip").budget_keep == ["tta", "tta_fraction"]
    assert make_config("fast").budget_rule is None

    # The mechanism end to end on tiny data, with a step time fixed at 10 ms so that a 3-second budget buys ~10-20
    # epochs here and a 7-second one ~100: the line says what was chosen and why, the config records it, a flag
    # wins, and `compare --budgets` gives each budget its own choice.
    monkeypatch.setattr(tune, "step_timer", lambda *a, **k: (lambda choice: 0.01))
    monkeypatch.setitem(schema.BUDGET_RULES, "fast", [(50, {"arch": "resnet9m", "tta": "flip_shift"})])
    monkeypatch.setitem(schema.BUDGET_WIDTHS, "fast", [])  # no wider net (tests/test_budget.py tests those)
    import reslab

    reslab.train(preset="fast", data=str(folder), batch_size=16, precision="fp32", time_budget=0.12,
                 out=str(tmp_path / "a"), accuracy_marks=[])
    saved = rundir.read_config(tmp_path / "a")
    assert (saved["arch"], saved["tta"]) == ("resnet9m", "flip_shift")
    out = tmp_path / "frontier"
    code, _, err = cli("compare", *TINY_FAST, "--data", folder, "--budgets", "0.05,0.12", "--out", out,
                       "--accuracy-marks", "[]")
    assert code == 0, err
    assert "fast preset, 0.12-minute budget: ~" in err and "epochs of resnet9s here, so --arch resnet9m, --tta " \
        "flip_shift" in err
    runs = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["runs"]}
    assert runs["0.05min-seed0"]["arch"] == "resnet9s" and runs["0.12min-seed0"]["arch"] == "resnet9m"
    assert runs["0.12min-seed0"]["tta"] == "flip_shift"
    code, _, err = cli("compare", *TINY_FAST, "--data", folder, "--budgets", "0.12", "--arch", "resnet9s",
                       "--out", tmp_path / "kept", "--accuracy-marks", "[]")
    assert code == 0, err
    assert "so --tta flip_shift\n" in err and rundir.read_config(tmp_path / "kept" / "0.12min-seed0")["arch"] == \
        "resnet9s"


def test_bn_momentum_sets_how_fast_the_running_statistics_follow(folder, tmp_path, cli):
    from reslab.training.train import setup

    cfg = make_config("fast", data=str(folder), epochs=1, batch_size=16, bn_momentum=1.0, precision="fp32",
                      accuracy_marks=[], out=str(tmp_path / "run"))
    run = setup(cfg)
    # With weight 1 the running statistics are exactly the last batch's: a train-mode forward of one batch
    # leaves the running mean at that batch's mean of the first BatchNorm's input.
    bn, x = run.model.layer1[0].bn, next(iter(run.train_batches.epoch(0)))[0]
    seen = []
    handle = bn.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].mean((0, 2, 3))))
    run.model.train()
    run.model(x)
    handle.remove()
    assert torch.allclose(bn.running_mean, seen[0], atol=1e-5)
    code, _, err = cli("train", "--preset", "fast", "--data", folder, "--bn-momentum", "0", "--out", tmp_path / "b")
    assert code == 1 and "--bn-momentum is a weight in (0, 1]" in err
