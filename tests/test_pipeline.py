"""The seed's pipeline end to end: train -> files -> eval -> predict -> resume, on tiny generated data."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

import reslab
from reslab.config.schema import PRESETS, make_config
from reslab.training.schedule import lr_at

from helpers import COLOURS

# A step schedule: the lr of a step does not depend on the run length, so a shortened run is a true prefix.
TINY = dict(arch="resnet20", epochs=3, batch_size=8, lr=0.01, precision="fp32", schedule="step", step_size=1,
            gamma=0.7)
FLAGS = [x for k, v in TINY.items() for x in (f"--{k}", v)]


def test_train_eval_predict_resume_end_to_end(folder, tmp_path, cli):
    run = tmp_path / "run"
    code, out, err = cli("train", "--data", folder, "--out", run, *FLAGS)
    assert code == 0, err
    assert {"config.yaml", "metrics.jsonl", "last.pt", "model.safetensors"} <= {p.name for p in run.iterdir()}
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3]
    for key in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds", "images_per_sec"):
        assert key in lines[-1]
    assert lines[-1]["test_acc"] >= 0.9  # three colours: easy
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["arch"] == "resnet20" and cfg["batch_size"] == 8 and cfg["data"] == str(folder)
    assert "epoch 2" in err  # the per-epoch line goes to stderr

    code, out, err = cli("eval", run, "--data", folder, "--json")
    assert code == 0, err
    r = json.loads(out)  # stdout holds only JSON
    assert r["accuracy"] == pytest.approx(lines[-1]["test_acc"], abs=1e-6)
    assert r["n"] == 72 and set(r["per_class"]) == set(COLOURS)
    assert sum(map(sum, r["confusion"])) == 72

    code, out, err = cli("predict", run, folder / "test" / "red", "--topk", "2", "--json")
    preds = [json.loads(l) for l in out.splitlines()]
    assert code == 0 and len(preds) == 24 and all(len(p["top"]) == 2 for p in preds)
    assert sum(p["top"][0]["class"] == "red" for p in preds) >= 20
    assert abs(sum(t["prob"] for t in preds[0]["top"]) - 1) < 0.5

    plot = tmp_path / "confusion.png"
    code, out, _ = cli("eval", run / "model.safetensors", "--data", folder, "--plot", plot)
    assert code == 0 and plot.stat().st_size > 1000 and "confusion matrix" in out

    # Resume: a run interrupted after epoch 1 and resumed ends with exactly the uninterrupted weights.
    half = tmp_path / "half"
    assert cli("train", "--data", folder, "--out", half, *FLAGS,
               "--steps", "10")[0] == 0
    cfg_half = yaml.safe_load((half / "config.yaml").read_text())
    cfg_half["steps"] = None
    (half / "config.yaml").write_text(yaml.safe_dump(cfg_half))
    ckpt = torch.load(half / "last.pt", weights_only=True)
    ckpt["config"]["steps"] = None  # continue as the full-length run would
    torch.save(ckpt, half / "last.pt")
    assert cli("train", "--resume", half)[0] == 0
    a, _ = reslab.load_model(run)
    b, _ = reslab.load_model(half)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_classes_are_matched_by_name_with_a_partial_reordered_test_folder(folder, tmp_path):
    result = reslab.train(data=str(folder), out=str(tmp_path / "run"), **TINY)
    partial = tmp_path / "partial" / "test"
    # Only two of the three classes, under names that sort in a different order than the training folders.
    shutil.copytree(folder / "test" / "red", partial / "red")
    shutil.copytree(folder / "test" / "blue", partial / "blue")
    r = reslab.evaluate(result.out, str(tmp_path / "partial"))
    assert r.n == 48 and set(r.per_class) == {"red", "blue"}
    assert r.accuracy >= 0.9
    (partial / "purple").mkdir()
    shutil.copy(folder / "test" / "red" / "0000.png", partial / "purple" / "x.png")
    with pytest.raises(reslab.data.DataError, match="purple"):
        reslab.evaluate(result.out, str(tmp_path / "partial"))


def test_digits_train_and_eval_api(tmp_path):
    pytest.importorskip("sklearn")
    r = reslab.train(data="digits", arch="resnet20", epochs=1, batch_size=64, train_samples=320, test_samples=100,
                     out=str(tmp_path / "d"))
    assert r.epoch == 1 and 0 <= r.test_acc <= 1
    e = reslab.evaluate(r.out, "digits", samples=100)
    assert e.n == 100 and len(e.classes) == 10


def test_presets_hold_the_seed_and_paper_values():
    seed = make_config("seed")
    assert (seed.arch, seed.stem, seed.input_size, seed.batch_size, seed.lr, seed.momentum) == \
        ("resnet18", "seed", 64, 8, 0.001, 0.9)
    assert (seed.schedule, seed.step_size, seed.gamma, seed.epochs, seed.augment) == ("step", 10, 0.1, 3, "seed")
    assert seed.shuffle and seed.drop_last and seed.weight_decay == 0
    paper = make_config("paper")
    assert (paper.batch_size, paper.lr, paper.momentum, paper.weight_decay) == (128, 0.1, 0.9, 1e-4)
    assert (paper.milestones, paper.steps, paper.schedule_unit, paper.augment) == ([32000, 48000], 64000, "step",
                                                                                   "paper")
    assert make_config("seed", epochs=1).epochs == 1  # flags override presets
    assert set(PRESETS) >= {"seed", "paper"}


def test_preset_then_yaml_then_flags(tmp_path, monkeypatch):
    from reslab.cli import commands as cli

    seen = {}
    monkeypatch.setattr("reslab.training.train.train", lambda config, **kw: seen.update(cfg=config))
    yml = tmp_path / "c.yaml"
    yml.write_text("lr: 0.5\nbatch_size: 32\n")
    assert cli.main(["train", "--preset", "seed", "--config", str(yml), "--batch-size", "16"]) == 0
    cfg = seen["cfg"]
    assert (cfg.arch, cfg.lr, cfg.batch_size, cfg.epochs) == ("resnet18", 0.5, 16, 3)


def test_lr_is_a_pure_function_of_the_step():
    seed = make_config("seed")
    assert [lr_at(s, seed, 100, 5000) for s in (0, 999, 1000, 2000)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-5])
    paper = make_config("paper")
    assert [lr_at(s, paper, 390, 64000) for s in (0, 31999, 32000, 48000)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    cos = make_config(schedule="cosine", lr=1.0, warmup=1)
    assert lr_at(0, cos, 10, 110) == pytest.approx(0.1) and lr_at(10, cos, 10, 110) == pytest.approx(1.0)
    assert lr_at(110, cos, 10, 110) == pytest.approx(0.0, abs=1e-9)
    one = make_config(schedule="onecycle", lr=1.0)
    assert lr_at(30, one, 10, 100) == pytest.approx(1.0) and lr_at(100, one, 10, 100) == 0
    assert lr_at(7, make_config(schedule="constant", lr=0.3), 10, 100) == 0.3
