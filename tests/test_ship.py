"""Shipping a model on a CPU: int8 export checked on the test set, the inference benchmark, predict at folder scale."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import reslab

from helpers import make_folder, reslab_cmd

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A ResNet-20 that tells the colour classes apart (test accuracy 1.0), trained once for the module."""
    from reslab.cli.commands import main

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

    from reslab.inference.backends import OnnxModule

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
    assert rows[0] == ["path", "class_1", "prob_1", "class_2", "prob_2", "error", "model"]
    assert len(rows) == 1 + 62 and len({r[0] for r in rows[1:]}) == 62  # one row per file
    broken = [r for r in rows[1:] if r[-2]]
    assert sorted(Path(r[0]).name for r in broken) == ["broken0.jpg", "broken1.jpg"]
    assert err.count("cannot read") == 2 and "60 images predicted" in err and "2 unreadable" in err
    # The same answers as predict without --output, and colour decides: class i % 3.
    expected = {r["path"]: r for r in reslab.predict(run, [photos], topk=2)}
    assert {r[-1] for r in rows[1:]} == {reslab.load_model(run)[1]["weights"]}  # every row names the weights
    for r in rows[1:]:
        if not r[-2]:
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
    cmd = reslab_cmd("predict", str(run), str(photos), "--output", str(out), "--batch-size",
           "8", "--workers", "1")
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


# --- reslab serve -----------------------------------------------------------------------------------------------------

def _multipart(name: str, data: bytes, filename: str = "image.jpg") -> tuple[bytes, str]:
    boundary = "reslab-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _post(url: str, data: bytes, field: str = "file") -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    body, kind = _multipart(field, data)
    request = urllib.request.Request(url, data=body, headers={"Content-Type": kind}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def server(trained, tmp_path):
    """``reslab serve`` on a free loopback port (batches wait up to 50 ms for company; uploads up to 0.05 MB)."""
    import socket
    import urllib.request

    pytest.importorskip("fastapi")
    run, _ = trained
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (the server's output while it runs)
    proc = subprocess.Popen(reslab_cmd("serve", str(run), "--port", str(port), "--topk", "3",
                             "--batch-wait-ms", "50", "--max-upload-mb", "0.05"), stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.1)
    try:
        yield url, run
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_the_server_answers_concurrent_requests_like_predict(server, tmp_path):
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    url, run = server
    photos = _photo_folder(tmp_path / "photos", 24)
    files = sorted(photos.rglob("*.jpg"))
    expected = {r["path"]: r["top"] for r in reslab.predict(run, files, topk=3)}
    with ThreadPoolExecutor(8) as pool:  # 24 requests, 8 at a time: bounded in count and (urlopen) time
        answers = list(pool.map(lambda f: _post(url + "/predict", f.read_bytes()), files))
    for f, (status, answer) in zip(files, answers):
        assert status == 200, answer
        assert [t["class"] for t in answer["top"]] == [t["class"] for t in expected[str(f)]]
        for got, want in zip(answer["top"], expected[str(f)]):
            assert got["prob"] == pytest.approx(want["prob"], abs=1e-4)
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["classes"] == ["blue", "green", "red"]
    assert health["requests"] == 24 and health["batches"] < 24  # requests that arrived together shared a pass


def test_the_server_refuses_bad_uploads_in_one_line_and_keeps_serving(server, tmp_path):
    import io

    url, _ = server
    photo = _photo_folder(tmp_path / "photos", 1)
    good = next(photo.rglob("*.jpg")).read_bytes()
    status, answer = _post(url + "/predict", b"this is not an image")
    assert status == 400 and answer["error"].startswith("not a readable image: UnidentifiedImageError")
    status, answer = _post(url + "/predict", good[: len(good) // 2])  # a truncated JPEG
    assert status == 400 and "truncated" in answer["error"] and "\n" not in answer["error"]
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(big, "PNG")
    assert len(big.getvalue()) > 0.05 * 1024 * 1024 + 65536
    status, answer = _post(url + "/predict", big.getvalue())
    assert status == 413 and "--max-upload-mb 0.05" in answer["error"]
    status, answer = _post(url + "/predict", good, field="image")  # the wrong field name
    assert 400 <= status < 500
    status, answer = _post(url + "/predict", b"")
    assert status == 400
    status, answer = _post(url + "/predict", good)  # still serving
    assert status == 200 and answer["top"][0]["class"] == "blue"


def test_the_upload_page_classifies_an_image_in_a_browser(server, tmp_path):
    from test_insight import _chromium

    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium here (CI installs one)")
    playwright = pytest.importorskip("playwright.sync_api")
    url, _ = server
    photo = next(_photo_folder(tmp_path / "photos", 3).rglob("img00001.jpg"))  # green
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = b.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/", timeout=30000)
            assert "resnet20" in page.title()
            page.set_input_files("#file", str(photo))
            page.click("button[type=submit]")
            page.wait_for_selector("#result[data-top]", timeout=30000)
            assert page.get_attribute("#result", "data-top") == "green"
            assert page.locator("#result tr").count() == 3 and not errors
        finally:
            b.close()


def test_predict_and_serve_run_the_exported_int8_model(trained, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    photos = _photo_folder(tmp_path / "photos", 30)
    code, _, err = cli("predict", run, photos, "--runtime", "onnx-int8")
    assert code == 1 and "make it with reslab export" in err and "--quantize int8" in err
    assert cli("export", run, "--quantize", "int8")[0] == 0  # run/model.int8.onnx
    code, _, err = cli("predict", run, photos, "--runtime", "onnx-int8", "--output", tmp_path / "int8.jsonl")
    assert code == 0, err
    int8 = [json.loads(line) for line in (tmp_path / "int8.jsonl").read_text().splitlines()]
    eager = reslab.predict(run, [photos])
    assert [r["top"][0]["class"] for r in int8] == [r["top"][0]["class"] for r in eager]
    code, _, err = cli("predict", run, photos, "--runtime", "onnx-int8", "--cam", tmp_path / "cams")
    assert code == 1 and "--cam needs" in err
