"""Measured execution choices (reslab.training.tune), the slow-step line, Muon, TTA on the least-confident images."""

from __future__ import annotations

import json

import pytest
import torch

from reslab.training import tune
from reslab.training.tune import Choice


def _fake(seconds: dict[tuple[int, str, bool], float], calls: list | None = None):
    """A ``measure`` function that answers from a table instead of a clock."""

    def measure(c: Choice) -> float:
        if calls is not None:
            calls.append(c)
        return seconds[(c.threads, c.precision, c.channels_last)]

    return measure


IDLE = {(2, "bf16", True): 0.10, (2, "bf16", False): 0.14, (2, "fp32", True): 0.25, (2, "fp32", False): 0.22,
        (1, "bf16", True): 0.19, (1, "bf16", False): 0.26, (1, "fp32", True): 0.45, (1, "fp32", False): 0.41}
# The same machine with another process busy on one core: two threads wait for it at every step.
BUSY = {**IDLE, (2, "bf16", True): 0.95, (2, "bf16", False): 1.1, (2, "fp32", True): 1.6, (2, "fp32", False): 1.5}


def test_the_probe_picks_the_fastest_choice_in_two_short_stages():
    options = tune.candidates(2, bf16=True)
    assert len(options) == 8 and tune.candidates(2, bf16=False) == [c for c in options if c.precision == "fp32"]
    calls: list[Choice] = []
    d = tune.decide(options, _fake(IDLE, calls))
    assert d.choice == Choice(2, "bf16", True) and d.seconds_per_step == 0.10
    assert len(calls) == 5  # 4 precision x layout at 2 threads, then 1 thread for the winner only
    assert tune.decide(options, _fake(BUSY)).choice == Choice(1, "bf16", True)
    # Fixed options are not searched.
    assert {c.precision for c in tune.candidates(2, True, precision="fp32")} == {"fp32"}
    assert tune.candidates(4, True, threads=3, channels_last=False) == [Choice(3, "bf16", False),
                                                                          Choice(3, "fp32", False)]
    line = d.line(256)
    assert line.startswith("measured: 2 threads bf16 channels-last 2,560 img/s (") and "1 thread 1,347" in line


def test_a_cached_answer_is_rechecked_and_a_busy_machine_does_not_inherit_it():
    options = tune.candidates(2, bf16=True)
    best = Choice(2, "bf16", True)
    calls: list[Choice] = []
    d = tune.recheck(best, 0.10, options, _fake(IDLE, calls))
    assert d.choice == best and d.source == "cache" and len(calls) == 2  # the cached choice and 1 thread
    d = tune.recheck(best, 0.10, options, _fake(BUSY))  # 9.5x slower than cached: everything again
    assert d.choice == Choice(1, "bf16", True) and d.source == "probe"
    # A cached 1-thread answer from a busy hour gives way to 2 threads once the machine is idle again.
    assert tune.recheck(Choice(1, "bf16", True), 0.19, options, _fake(IDLE)).choice == best


def test_choose_caches_per_machine_model_and_batch_and_sets_the_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(tune, "usable_cores", lambda: 2)
    monkeypatch.setattr(tune, "cpu_has_bf16", lambda: True)
    threads = torch.get_num_threads()
    try:
        kw = dict(threads=None, precision=None, channels_last=None)
        d = tune.choose("resnet9s", {}, 10, 256, 32, measure=_fake(BUSY), **kw)
        assert d.choice == Choice(1, "bf16", True) and d.source == "probe" and torch.get_num_threads() == 1
        entries = json.loads((tmp_path / tune.CACHE_FILE).read_text())
        (key, entry), = entries.items()
        assert key.startswith(tune.cpu_model() + "|" + torch.__version__ + "|resnet9s|256|32|2")
        assert (entry["threads"], entry["precision"], entry["channels_last"]) == (1, "bf16", True)
        calls: list[Choice] = []
        d = tune.choose("resnet9s", {}, 10, 256, 32, measure=_fake(IDLE, calls), **kw)
        assert d.source == "cache" and d.choice == Choice(2, "bf16", True) and len(calls) == 2
        assert torch.get_num_threads() == 2
        tune.choose("resnet9s", {}, 10, 128, 32, measure=_fake(IDLE), **kw)  # another batch size: its own entry
        tune.choose("resnet9s", {}, 10, 256, 32, measure=_fake(IDLE), **{**kw, "precision": "fp32"})
        assert len(json.loads((tmp_path / tune.CACHE_FILE).read_text())) == 3
        (tmp_path / tune.CACHE_FILE).write_text("[not json")  # a damaged cache is a miss, then rewritten
        assert tune.choose("resnet9s", {}, 10, 256, 32, measure=_fake(IDLE), **kw).source == "probe"
    finally:
        torch.set_num_threads(threads)


def test_the_real_step_timer_times_a_training_step_without_touching_the_run_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    measure = tune.step_timer("resnet9s", {}, 10, 8, 32)
    seconds = measure(Choice(1, "fp32", True))
    assert 0 < seconds < 10 and torch.equal(torch.rand(3), expected)
    # It also measures what an evaluation forward pass costs against the step (the time budget reserves that).
    assert 0 < measure.eval_costs[Choice(1, "fp32", True)] < 2


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _Run:
    class dist:  # a stand-in for distributed.Dist
        main = True


def test_steps_much_slower_than_measured_are_said_once(capsys):
    from reslab.training.hooks import SlowSteps

    clock = _Clock()
    hook = SlowSteps(0.1, clock)
    hook.on_epoch_start(_Run())
    for _ in range(3 * SlowSteps.window):  # as fast as measured: nothing said
        clock.t += 0.12
        hook.on_step_end(_Run(), torch.zeros(()), 0.1)
    assert capsys.readouterr().err == ""
    for _ in range(3 * SlowSteps.window):  # another process took a core: 5x slower
        clock.t += 0.5
        hook.on_step_end(_Run(), torch.zeros(()), 0.1)
    err = capsys.readouterr().err
    assert err.count("warning: steps take 0.500 s, 5.0x the 0.100 s measured at the start") == 1
    assert "another process is probably using the cores" in err


def test_a_long_cpu_run_probes_and_records_its_choice(tmp_path, monkeypatch, capsys):
    from reslab.config.schema import make_config
    from reslab.core import rundir
    from reslab.training.train import setup

    from helpers import make_folder

    data = make_folder(tmp_path / "d", per_class=8)
    monkeypatch.setattr(tune, "PROBE_MIN_STEPS", 10)
    run = setup(make_config("paper", arch="resnet20", data=str(data), batch_size=8, steps=12, out=str(tmp_path / "r")))
    err = capsys.readouterr().err
    assert "measured: " in err and " img/s" in err
    saved = rundir.read_config(tmp_path / "r")
    assert saved["threads"] == torch.get_num_threads() and saved["precision"] in ("fp32", "bf16")
    assert isinstance(saved["channels_last"], bool) and run.precision == saved["precision"]
    # A short run keeps the static defaults and says nothing.
    setup(make_config("paper", arch="resnet20", data=str(data), batch_size=8, steps=3, out=str(tmp_path / "s")))
    assert "measured" not in capsys.readouterr().err and rundir.read_config(tmp_path / "s")["threads"] is None


# --- Muon ------------------------------------------------------------------------------------------------------------

def _reference_orthogonalize(g: torch.Tensor, steps: int) -> torch.Tensor:
    """The Newton–Schulz quintic written out in float64, one matrix product at a time."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double() / (g.double().norm() + 1e-7)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.t()
    for _ in range(steps):
        gram = x @ x.t()
        x = a * x + b * (gram @ x) + c * (gram @ (gram @ x))
    return x.t() if transposed else x


@pytest.mark.parametrize("shape", [(32, 24 * 9), (128, 32 * 9), (300, 40)])
def test_orthogonalize_matches_the_reference_and_flattens_the_spectrum(shape):
    from reslab.training.optim import orthogonalize

    gen = torch.Generator().manual_seed(0)
    u, _, vt = torch.linalg.svd(torch.randn(*shape, generator=gen), full_matrices=False)
    g = u @ torch.diag(torch.logspace(0, -1.5, len(vt))) @ vt  # singular values from 1 down to 0.03
    ours = orthogonalize(g, steps=5)
    assert torch.allclose(ours.double(), _reference_orthogonalize(g, 5), atol=2e-4)
    s = torch.linalg.svdvals(ours.double())
    assert s.min() > 0.6 and s.max() < 1.25  # roughly orthogonal (condition 31 -> < 2); not exact by design


def test_a_muon_step_is_normalise_then_step_along_the_orthogonalised_nesterov_momentum():
    from reslab.training.optim import Chain, Muon

    gen = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.randn(16, 8, 3, 3, generator=gen))
    grads = [torch.randn(16, 8, 3, 3, generator=gen) for _ in range(3)]
    opt = Muon([w], lr=0.1, momentum=0.6)
    expected, buf = w.detach().double().clone(), torch.zeros_like(w, dtype=torch.float64)
    for g in grads:
        w.grad = g.clone()
        opt.step()
        buf = 0.6 * buf + g.double()
        update = g.double() + 0.6 * buf
        expected = expected * (16 ** 0.5 / expected.norm())
        expected = expected - 0.1 * _reference_orthogonalize(update.view(16, -1), 5).view_as(expected)
    assert torch.allclose(w.detach().double(), expected, atol=1e-4)
    # Its state round-trips inside a chain with SGD, as a checkpoint would hold it.
    from reslab.training.optim import SGD

    b = torch.nn.Parameter(torch.zeros(16))
    b.grad = torch.ones(16)
    chain = Chain(SGD([b], lr=0.1, momentum=0.9), Muon([w], lr=0.1))
    w.grad = grads[0].clone()
    chain.step()
    again = Chain(SGD([b], lr=0.1, momentum=0.9), Muon([w], lr=0.1))
    again.load_state_dict(chain.state_dict())
    assert torch.equal(again.optimizers[1].state[w]["momentum_buffer"], chain.optimizers[1].state[w]["momentum_buffer"])
    assert len(chain.param_groups) == 2
    with pytest.raises(ValueError, match="chain"):
        Chain(SGD([b], lr=0.1)).load_state_dict(chain.state_dict())


def test_training_with_muon_learns_and_records_it(tmp_path, folder, cli):
    code, _, err = cli("train", "--arch", "resnet20", "--optimizer", "muon", "--data", folder, "--batch-size", "16",
                       "--lr", "0.05", "--precision", "fp32", "--epochs", "4", "--out", tmp_path / "a")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["test_acc"] > 0.9 and rows[-1]["train_loss"] < rows[0]["train_loss"]
    state = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["optimizer"]
    sgd, muon = state["chain"]
    assert len(sgd["param_groups"]) >= 1 and len(muon["state"]) == 19  # resnet20's 19 conv filter banks
    assert muon["param_groups"][0]["lr_scale"] == pytest.approx(0.24 / 0.05)
    code, _, err = cli("train", "--arch", "resnet20", "--optimizer", "muon", "--muon-lr", "0", "--data", folder,
                       "--out", tmp_path / "b")
    assert code == 1 and "--muon-lr must be positive" in err


# --- TTA on the least-confident images ----------------------------------------------------------------------------

def test_partial_tta_augments_only_the_least_confident_images():
    from reslab.inference.evaluate import tta_cost, tta_logits
    from reslab.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet9s").eval()
    x = torch.randn(40, 3, 32, 32)
    with torch.no_grad():
        plain, full = tta_logits(model, x, "none"), tta_logits(model, x, "flip_shift")
        part = tta_logits(model, x, "flip_shift", fraction=0.25)
        assert torch.equal(tta_logits(model, x, "flip_shift", fraction=1.0), full)
    confidence = plain.softmax(1).amax(1)
    unsure = confidence.argsort()[:10]  # the 25 % least confident
    sure = confidence.argsort()[10:]
    assert torch.allclose(part[unsure], full[unsure], atol=1e-5)
    assert torch.equal(part[sure], plain[sure])  # confident images keep their plain logits (one forward pass)
    assert tta_cost("flip_shift", 0.2) == pytest.approx(2.0) and tta_cost("flip") == 2
    with pytest.raises(ValueError, match="fraction"):
        tta_logits(model, x, "flip", fraction=0)


def test_bench_tune_prints_every_choice_and_the_probes_pick(cli):
    from reslab.core.execution import cpu_has_bf16, usable_cores

    code, out, err = cli("bench", "--tune", "--preset", "fast", "--batch-size", "8", "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == len(tune.candidates(usable_cores(), cpu_has_bf16()))
    assert sum(r["chosen"] for r in rows) == 1 and all(r["roof_fraction"] > 0 for r in rows)
    speeds = [r["images_per_sec"] for r in rows]
    assert speeds == sorted(speeds, reverse=True)
    code, out, _ = cli("bench", "--tune", "--preset", "fast", "--batch-size", "8")
    assert code == 0 and "<- the probe picks this" in out and "of roof" in out.splitlines()[0]
