"""Reliability: crash-safe checkpoints, exact resume after kill -9, safe loading, hostile inputs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import reslab
from reslab.core.errors import UserError
from reslab.data import DataError, load_split
from reslab.models.checkpoint import atomic_write, clean_state_dict, load_checkpoint, save_checkpoint

from helpers import make_folder, reslab_cmd

ARGS = ["--arch", "resnet20", "--batch-size", "8", "--lr", "0.01", "--precision", "fp32", "--schedule", "step",
        "--step-size", "2", "--gamma", "0.5", "--threads", "1"]


# The fast preset adds lookahead weight averaging and accuracy-mark snapshots: both live in the checkpoint.
FAST = ["--preset", "fast", "--batch-size", "16", "--lr", "0.2", "--precision", "fp32", "--threads", "1",
        "--accuracy-marks", "[0.5,0.9]"]


def _train_cmd(folder, out, *extra, args=ARGS):
    return [sys.executable, "-m", "reslab", "train", "--data", str(folder), "--out", str(out), *args, *extra]


def _weights(run):
    model, _ = reslab.load_model(run)
    return model.state_dict()


def _marks(run):
    marks = reslab.core.rundir.read_marks(run)
    return {m: (r["step"], r["test_acc"]) for m, r in marks.items()}


@pytest.mark.parametrize("args", [ARGS, FAST, [*FAST, "--optimizer", "muon"]],
                         ids=["resnet20", "fast-lookahead-marks", "fast-muon"])
def test_kill_9_then_resume_is_bit_identical(tmp_path, args):
    folder = make_folder(tmp_path / "data", per_class=16)  # 48 images: 6 steps per epoch (3 at batch 16)
    epochs = ["--epochs", "5" if args is ARGS else "10", "--checkpoint-every", "2"]
    full = tmp_path / "full"
    subprocess.run(_train_cmd(folder, full, *epochs, args=args), check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(folder, killed, *epochs, args=args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = killed / "last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(0.3)  # let it run on a little: the kill lands at an arbitrary later point
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "model.safetensors").exists()
    step = load_checkpoint(ckpt)["step"]
    assert 0 < step < 30

    r = subprocess.run(reslab_cmd("train", "--resume", str(killed)), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    a, b = _weights(full), _weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert _marks(killed) == _marks(full)
    read_metrics = reslab.core.rundir.read_metrics
    assert read_metrics(killed)[-1]["train_loss"] == read_metrics(full)[-1]["train_loss"]


def test_sigterm_saves_and_says_how_to_resume(tmp_path):
    folder = make_folder(tmp_path / "data", per_class=16)
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(folder, run, "--epochs", "50", "--log-every", "1"), stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stderr:  # wait until training is under way
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 130
    assert "SIGTERM received" in err and f"reslab train --resume {run}" in err and "Traceback" not in err
    assert load_checkpoint(run / "last.pt")["step"] >= 3


def test_nan_loss_stops_with_a_clear_line_and_keeps_the_checkpoint(tmp_path, cli):
    folder = make_folder(tmp_path / "data", per_class=8)
    run = tmp_path / "run"
    # A sane first epoch (lr 0.01, 3 steps), then lr 0.01 * 1e40: the weights overflow in the second epoch.
    code, _, err = cli("train", "--data", folder, "--out", run, "--arch", "resnet20", "--batch-size", "8",
                       "--precision", "fp32", "--epochs", "3", "--lr", "0.01", "--schedule", "step", "--step-size",
                       "1", "--gamma", "1e40", "--checkpoint-every", "1")
    assert code == 1 and "became" in err and "at step" in err and "--lr" in err
    assert "Traceback" not in err
    good = load_checkpoint(run / "last.pt")  # the last good checkpoint stays
    assert good["step"] >= 3 and all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())
    assert not (run / "model.safetensors").exists()


def test_a_new_run_never_overwrites_an_old_one(tmp_path, cli):
    folder = make_folder(tmp_path / "data", per_class=4)
    run = tmp_path / "run"
    assert cli("train", "--data", folder, "--out", run, *ARGS, "--epochs", "1")[0] == 0
    before = (run / "model.safetensors").read_bytes()
    code, _, err = cli("train", "--data", folder, "--out", run, *ARGS, "--epochs", "1")
    assert code == 1 and "--resume" in err
    assert (run / "model.safetensors").read_bytes() == before


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / "last.pt"
    save_checkpoint(target, {"step": 1})

    def boom(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, boom)
    assert load_checkpoint(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_a_pickle_that_runs_code_is_refused(tmp_path, cli):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, bad)
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(bad)
    code, _, err = cli("eval", bad, "--arch", "resnet20", "--data", "digits")
    assert code != 0 and "refused" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_bad_files_are_one_line_errors(tmp_path, cli, content):
    path = tmp_path / "model.pt"
    if content is None:  # a truncated real checkpoint
        torch.save(reslab.create_model("resnet20").state_dict(), path)
        path.write_bytes(path.read_bytes()[:5000])
    else:
        path.write_bytes(content)
    code, _, err = cli("eval", path, "--arch", "resnet20", "--data", "digits")
    assert code == 1 and err.startswith("reslab: error:") and len(err.strip().splitlines()) == 1


def test_architecture_and_class_mismatch(tmp_path, cli):
    path = tmp_path / "r20.pth"
    torch.save(reslab.create_model("resnet20", num_classes=10).state_dict(), path)
    code, _, err = cli("eval", path, "--arch", "resnet32", "--data", "digits")
    assert code == 1 and "does not match architecture resnet32" in err
    with pytest.raises(UserError, match="has 10 output classes, expected 3"):
        reslab.load_model(path, arch="resnet20", num_classes=3)


@pytest.mark.parametrize("wrap", ["module.", "_orig_mod.", "state_dict", "model", "net"])
def test_checkpoints_from_other_tools_load(tmp_path, wrap):
    model = reslab.create_model("resnet20")
    sd = model.state_dict()
    obj = {wrap + k: v for k, v in sd.items()} if wrap.endswith(".") else {wrap: sd, "epoch": 3}
    path = tmp_path / "other.pth"
    torch.save(obj, path)
    loaded, _meta = reslab.load_model(path, arch="resnet20")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    assert set(clean_state_dict({"module._orig_mod.fc.weight": torch.zeros(1)})) == {"fc.weight"}


def test_bad_images_are_skipped_with_a_warning_or_fail_in_strict_mode(tmp_path):
    root = make_folder(tmp_path / "d", per_class=3, splits=("train",))
    red = root / "train" / "red"
    (red / "empty.png").write_bytes(b"")
    (red / "text.jpg").write_text("not an image")
    good = (red / "0000.png").read_bytes()
    (red / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("CMYK", (32, 32), (0, 50, 100, 0)).save(red / "cmyk.jpg")
    (root / "train" / "empty_class").mkdir()
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable image file\(s\)") as rec:
        s = load_split(str(root), "train", store_size=32)
    assert "empty.png" in str(rec[0].message)
    assert len(s) == 10 and s.images.shape[1:] == (32, 32, 3)
    with pytest.raises(DataError, match="cannot read image"):
        load_split(str(root), "train", store_size=32, strict=True)


def test_decompression_bomb_is_skipped(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", per_class=2, splits=("train",))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40)  # make a 48x48 image count as a bomb, in-process
    Image.new("RGB", (48, 48)).save(root / "train" / "red" / "bomb.png")
    with pytest.warns(UserWarning, match="bomb.png"):
        s = load_split(str(root), "train", store_size=32)
    assert len(s) == 6


def test_a_folder_with_no_usable_images_is_one_error(tmp_path):
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    (tmp_path / "d" / "train" / "a" / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="no usable images"):  # one error, no warning before it
        load_split(str(tmp_path / "d"), "train", store_size=32)


def test_cuda_asked_for_where_none_exists(tmp_path, cli):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = cli("train", "--data", "digits", "--device", "cuda", "--out", tmp_path / "r")
    assert code == 1 and "CUDA is not available" in err
