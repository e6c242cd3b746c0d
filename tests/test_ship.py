"""Shipping a model on a CPU: int8 export checked on the test set, the inference benchmark, predict at folder scale."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import reslab

from conftest import make_folder

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A ResNet-20 that tells the colour classes apart (test accuracy 1.0), trained once for the module."""
    from reslab.cli import main

    root = tmp_path_factory.mktemp("ship")
    folder = make_folder(root / "data", per_class=24)
    run = root / "run"
    assert main(["train", "--data", str(folder), "--out", str(run), "--arch", "resnet20", "--epochs", "3",
                 "--batch-size", "16", "--lr", "0.05", "--threads", "1", "--precision", "fp32"]) == 0
    return run, folder


def test_int8_export_keeps_the_test_accuracy_and_stores_the_check(trained, tmp_path, cli):
    run, _ = trained
    out = tmp_path / "model.int8.onnx"
    code, stdout, err = cli("export", run, "--format", "onnx", "--quantize", "int8", "--out", out)
    assert code == 0, err
    check = json.loads(out.with_suffix(".json").read_text())
    assert check["written"] and check["n"] == 72 and check["calibration"] == 72  # the run's own data, all of it
    assert check["float_accuracy"] == 1.0 and check["drop"] <= check["max_drop"] == 0.01
    assert check["agreement"] >= 0.98  # int8 picks the float model's class for (nearly) every test image
    assert f"int8 {100 * check['int8_accuracy']:.2f}% against float 100.00% on 72 test images" in stdout
    # The int8 model answers like the float one on images it never saw in calibration.
    import torch

    from reslab.runtimes import OnnxModule

    net = reslab.load_model(run)[0].eval()
    images = torch.from_numpy(np.random.default_rng(1).normal(0, 1, (16, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        assert (OnnxModule(out)(images).argmax(1) == net(images).argmax(1)).float().mean() >= 0.75


def test_int8_export_refuses_a_model_calibrated_on_the_wrong_images(trained, tmp_path, cli):
    run, folder = trained
    # Calibration images unlike the deployment ones (all black): the activation ranges are far too narrow, every real
    # image saturates, and int8 loses most of the accuracy. The margin is what catches it.
    bad = tmp_path / "bad"
    shutil.copytree(folder / "test", bad / "test")
    for src in (folder / "train").rglob("*.png"):
        dst = bad / "train" / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32)).save(dst)
    out = tmp_path / "model.int8.onnx"
    code, _, err = cli("export", run, "--quantize", "int8", "--data", bad, "--out", out)
    assert code == 1 and "more than --max-drop 0.01; not written (--force writes it)" in err, err
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not any(p.name.startswith(".reslab-") for p in tmp_path.iterdir())  # no temporary files left
    code, _, err = cli("export", run, "--quantize", "int8", "--data", bad, "--out", out, "--force")
    assert code == 0 and out.exists()
    check = json.loads(out.with_suffix(".json").read_text())
    assert check["written"] and check["drop"] > 0.01


def test_int8_export_of_a_bare_model_file_needs_data(trained, tmp_path, cli):
    run, _ = trained
    model = tmp_path / "model.safetensors"
    shutil.copy(run / "model.safetensors", model)
    code, _, err = cli("export", model, "--quantize", "int8")
    assert code == 1 and "give --data FOLDER" in err
    code, _, err = cli("export", run, "--format", "torchscript", "--quantize", "int8")
    assert code == 1 and "of ONNX models" in err


def test_the_inference_benchmark_times_every_runtime_side_by_side(trained, cli):
    run, _ = trained
    code, stdout, err = cli("bench", "--inference", run, "--seconds", "0.1", "--threads", "1", "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["runtime"] for r in rows] == ["eager-fp32", "eager-bf16", "onnx-fp32", "onnx-int8"]
    for r in rows:
        assert r["threads"] == 1 and r["batch"] == 64
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["images_per_sec"] > 0
    code, stdout, _ = cli("bench", "--inference", run, "--seconds", "0.1", "--runtimes", "onnx-fp32",
                          "--batch-size", "8")
    assert code == 0 and "onnx-fp32" in stdout and "eager" not in stdout and " 8 " in stdout
    code, _, err = cli("bench", "--inference", run, "--runtimes", "tpu")
    assert code == 1 and "eager-fp32" in err


def _photo_folder(root: Path, n: int, bad: int = 0) -> Path:
    """``n`` photo-sized JPEGs (colour classes at 320x240, noisy) and ``bad`` files that are not images."""
    rng = np.random.default_rng(0)
    colours = [(40, 60, 200), (40, 190, 60), (210, 40, 40)]
    for i in range(n):
        c = colours[i % 3]
        img = np.clip(np.array(c) + rng.normal(0, 25, (240, 320, 3)), 0, 255).astype(np.uint8)
        (root / f"{i // 50:02d}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / f"{i // 50:02d}" / f"img{i:05d}.jpg", quality=85)
    for i in range(bad):
        (root / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def _csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_predict_streams_a_folder_to_csv_and_jsonl_skipping_unreadable_files(trained, tmp_path, cli):
    run, _ = trained
    photos = _photo_folder(tmp_path / "photos", 60, bad=2)
    code, _, err = cli("predict", run, photos, "--output", tmp_path / "p.csv", "--batch-size", "16", "--workers",
                       "2", "--topk", "2")
    assert code == 0, err
    rows = _csv_rows(tmp_path / "p.csv")
    assert rows[0] == ["path", "class_1", "prob_1", "class_2", "prob_2", "error"]
    assert len(rows) == 1 + 62 and len({r[0] for r in rows[1:]}) == 62  # one row per file
    broken = [r for r in rows[1:] if r[-1]]
    assert sorted(Path(r[0]).name for r in broken) == ["broken0.jpg", "broken1.jpg"]
    assert err.count("cannot read") == 2 and "60 images predicted" in err and "2 unreadable" in err
    # The same answers as predict without --output, and colour decides: class i % 3.
    expected = {r["path"]: r for r in reslab.predict(run, [photos], topk=2)}
    for r in rows[1:]:
        if not r[-1]:
            assert r[1] == expected[r[0]]["top"][0]["class"]
            assert float(r[2]) == pytest.approx(expected[r[0]]["top"][0]["prob"], abs=1e-5)
            assert r[1] == ["blue", "green", "red"][int(Path(r[0]).stem[3:]) % 3]
    code, _, err = cli("predict", run, photos, "--output", tmp_path / "p.jsonl", "--batch-size", "16")
    assert code == 0
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(lines) == 62 and sum("error" in r for r in lines) == 2
    code, _, err = cli("predict", run, photos, "--output", tmp_path / "p.csv")
    assert code == 1 and "exists: add --resume" in err
    code, _, err = cli("predict", run, photos, "--output", tmp_path / "p.txt")
    assert code == 1 and ".csv or .jsonl" in err


def test_a_killed_predict_keeps_its_rows_and_resume_does_the_rest(trained, tmp_path, cli):
    run, _ = trained
    photos = _photo_folder(tmp_path / "photos", 600)
    out = tmp_path / "p.jsonl"
    cmd = [sys.executable, "-m", "reslab", "predict", str(run), str(photos), "--output", str(out), "--batch-size",
           "8", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 40:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    kept = out.read_text().splitlines()
    assert 40 <= len(kept) < 600
    with open(out, "a") as f:  # a row cut short by the kill: dropped on resume, its file done again
        f.write('{"path": "' + str(photos / "00" / "img00000.jpg")[:10])
    code, _, err = cli("predict", run, photos, "--output", out, "--resume")
    assert code == 0, err
    assert f"holds {len(kept)} rows: predicting the other {600 - len(kept)} files" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in photos.rglob("*.jpg"))  # each file once
    whole = {r["path"]: r for r in reslab.predict(run, [photos])}
    assert all(r["top"] == whole[r["path"]]["top"] for r in rows)
