"""The commands of the README and the manual (docs/), run as written (on a tiny generated folder instead of the
CIFAR-10 copy). tests/test_docs.py parses every other command of theirs with the real parser."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MANUAL = README + "".join(p.read_text() for p in sorted((ROOT / "docs").rglob("*.md")))


def _block(title: str) -> list[str]:
    """The shell commands of the first ```bash block after the heading ``title`` (README or docs/)."""
    section = MANUAL.split(f"# {title}", 1)[1]
    body = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in body.splitlines() if line.split("#")[0].strip()]


def test_the_tour_runs_as_written(tmp_path, folder, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = _block("Tour")
    assert [c.split()[1] for c in commands] == ["models", "summary", "train", "eval", "predict", "compare", "export",
                                                "bench"]
    for command in commands:
        command = command.replace("../shared/data/cifar10-jpeg", str(folder))
        args = shlex.split(command)[1:]
        if args[0] in ("train", "compare"):
            args += ["--batch-size", "8", "--lr", "0.01"]  # 72 images instead of 50,000
        if args[0] == "bench":
            args += ["--batch-size", "8", "--steps", "2"]
        if args[0] == "predict":
            args[2] = str(folder / "test" / "red")  # the tiny folder has no cat
        code, _out, err = cli(*args)
        assert code == 0, f"{command}: {err}"
    assert (tmp_path / "runs" / "r20" / "confusion.png").stat().st_size > 1000
    assert (tmp_path / "runs" / "cmp" / "report.md").is_file() and (tmp_path / "runs" / "r20" / "model.onnx").is_file()


def test_the_first_command_trains_evaluates_and_predicts_digits(tmp_path, cli, monkeypatch):
    pytest.importorskip("sklearn")
    first = README.split("```bash\n", 1)[1].splitlines()[0]
    assert first.startswith('pip install -e ".[demo]" && reslab train --data digits')
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    for command in first.split(" && ")[1:]:
        code, out, err = cli(*shlex.split(command)[1:])
        assert code == 0, f"{command}: {err}"
    assert "digit7.png" in out  # predict printed its three example images
    assert (tmp_path / "runs" / "digits" / "model.safetensors").is_file()


def test_the_fast_preset_commands_run_as_written(tmp_path, folder, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = _block("Training in minutes")
    section = MANUAL.split("# Training in minutes", 1)[1]
    commands += [line.strip() for line in re.findall(r"```bash\n(.*?)```", section, re.S)[1].splitlines()]
    assert [c.split()[1] for c in commands] == ["train", "compare"]
    for command in commands:
        command = command.replace("../shared/data/cifar10-jpeg", str(folder))
        # Seconds instead of minutes, one seed, and batches the 72 tiny images can fill.
        command = re.sub(r"--time-budget \S+", "--time-budget 0.1", command)
        command = command.replace("--budgets 2.5,5,10,20 --seeds 0,1,2", "--budgets 0.1 --seeds 0")
        code, _out, err = cli(*shlex.split(command)[1:], "--batch-size", "16", "--lr", "0.2")
        assert code == 0, f"{command}: {err}"
    assert (tmp_path / "runs" / "fast5" / "model.safetensors").is_file()
    assert "Accuracy against time budget" in (tmp_path / "runs" / "frontier" / "report.md").read_text()


def test_the_photo_commands_run_as_written(tmp_path, cli, monkeypatch):
    """The fine-tuning section on a tiny photo folder, with torchvision's resnet18 weights built into $TORCH_HOME."""
    import torch
    import torchvision

    from helpers import make_folder

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "torch" / "hub" / "checkpoints" /
               Path(weights.url).name)
    make_folder(tmp_path, per_class=10, size=96, ext="jpg", splits=("my_photos",))  # one folder of class folders
    make_folder(tmp_path / "holiday", per_class=2, size=120, ext="jpg", splits=("x",))
    commands = [c for line in _block("Your own photos: fine-tuning") for c in line.split(" && ")]
    assert [shlex.split(c)[1] for c in commands] == ["train", "train", "eval", "predict"]
    for command in commands:
        args = [a.replace("runs/big", "runs/mine") for a in shlex.split(command)[1:]]
        if args[0] == "train":  # a few steps at 64 px
            args += ["--epochs", "1", "--batch-size", "8", "--image-size", "64", "--precision", "fp32"]
        code, out, err = cli(*args)
        assert code == 0, f"{command}: {err}"
    assert (tmp_path / "runs" / "probe" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "mine" / "split.json").is_file()  # held out for the user, recorded
    assert out.count("holiday") == 6  # predict: one line per image of the folder


def test_the_depth_and_decay_commands_run_as_written(tmp_path, folder, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = _block("Depth: plain against residual")
    assert [c.split()[1:4] for c in commands] == [["compare", "--preset", "degradation"],
                                                 ["compare", "--preset", "decay"]]
    for command in commands:
        command = command.replace("../shared/data/cifar10-jpeg", str(folder))
        # One epoch of 16 tiny images instead of 10 of 10,000.
        args = [*shlex.split(command)[1:], "--epochs", "2", "--step-size", "1", "--batch-size", "8",
                "--train-samples", "16", "--test-samples", "9"]
        code, out, err = cli(*args)
        assert code == 0, f"{command}: {err}"
        assert "points" in out or "schedule" in out  # the lesson, in words
    assert (tmp_path / "runs" / "degradation" / "depth.png").is_file()
    assert (tmp_path / "runs" / "decay" / "loss.png").is_file()


def test_the_seeing_commands_run_as_written(tmp_path, folder, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("train", "--data", folder, "--arch", "resnet20", "--epochs", "2", "--batch-size", "8",
               "--out", "runs/r20")[0] == 0
    commands = _block("Seeing the model and the data")
    assert [c.split()[1] for c in commands] == ["lr-find", "eval", "predict", "audit", "audit", "report"]
    for command in commands:
        args = shlex.split(command.replace("../shared/data/cifar10-jpeg", str(folder)))[1:]
        if args[0] == "lr-find":
            args += ["--batch-size", "8", "--range-steps", "10"]  # 72 images instead of 50,000
        if args[0] == "predict":
            args[2] = str(folder / "test" / "red")  # the tiny folder has no cat
        if "--folds" in args:
            args += ["--fold-epochs", "2"]
        code, _out, err = cli(*args)
        assert code == 0, f"{command}: {err}"
    for made in ("lr-find/lr_find.png", "r20/gallery/gallery.json", "r20/cams/0000.cam.png", "r20/report.html"):
        assert (tmp_path / "runs" / made).is_file(), made


def test_the_shipping_commands_run_as_written(tmp_path, folder, cli, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    assert cli("train", "--data", folder, "--arch", "resnet20", "--epochs", "2", "--batch-size", "8",
               "--out", "runs/r20")[0] == 0
    commands = _block("Shipping it on a CPU")
    assert [c.split()[1] if c.startswith("reslab") else c.split()[0] for c in commands] == [
        "pip", "export", "bench", "predict", "predict", "serve", "curl"]  # serve and curl: tests/test_ship.py
    for command in commands:
        if not command.startswith("reslab") or " serve " in command:
            continue
        args = shlex.split(command.replace("~/photos", str(folder / "test")))[1:]
        if args[0] == "bench":
            args += ["--seconds", "0.1"]
        code, _out, err = cli(*args)
        assert code == 0, f"{command}: {err}"
    assert (tmp_path / "runs" / "r20" / "model.int8.json").is_file()
    assert len((tmp_path / "preds.csv").read_text().splitlines()) == 1 + 72  # the header and one row per image
