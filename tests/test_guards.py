"""Issue 34, hostile user round 3: no refused command modifies a user's file; exported models are tied to the weights
they came from; uploads and decodes are bounded; what reslab reads back from files is untrusted."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import reslab

from helpers import make_folder, reslab_cmd

TRAIN = ["--epochs", "2", "--batch-size", "16", "--lr", "0.05", "--threads", "1", "--precision", "fp32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A ResNet-20 that tells the colour classes apart, and a second run on the same data (other weights)."""
    from reslab.cli.commands import main

    root = tmp_path_factory.mktemp("guards")
    folder = make_folder(root / "data", per_class=16)
    for name, seed in (("run", "0"), ("other", "1")):
        assert main(["train", "--data", str(folder), "--out", str(root / name), "--arch", "resnet20", "--seed",
                     seed, *TRAIN]) == 0
    return root / "run", root / "other", folder


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    shutil.copytree(run, tmp_path / name)
    return tmp_path / name


def _one_line(err: str) -> None:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# --- 1, 7, 13: predict --output / --resume ------------------------------------------------------------------------

@pytest.mark.parametrize("name, content", [
    ("mydata.csv", b"name,amount\nalice,10\nbob,20"),
    ("notes.jsonl", b'{"note": "buy milk"}'),
    ("noise.csv", bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8))),
    ("noise.jsonl", b"\xff\xfe" + bytes(range(256)) * 4),
])
def test_resume_refuses_a_file_it_did_not_write_and_leaves_it_untouched(trained, tmp_path, cli, name, content):
    run, _, folder = trained
    target = tmp_path / name
    target.write_bytes(content)
    code, _, err = cli("predict", run, folder / "test", "--output", target, "--resume")
    assert code == 1 and "not a reslab predictions file" in err
    _one_line(err)
    assert target.read_bytes() == content  # not one byte changed


def test_resume_is_keyed_by_the_resolved_path_and_refuses_another_models_file(trained, tmp_path, cli, monkeypatch):
    run, other, folder = trained
    monkeypatch.chdir(folder)
    out = tmp_path / "p.csv"
    code, _, err = cli("predict", run, "test", "--output", out)  # relative paths
    assert code == 0, err
    before = out.read_bytes()
    code, _, err = cli("predict", run, folder / "test", "--output", out, "--resume")  # the same, absolute
    assert code == 0 and "predicting the other 0 files" in err
    assert out.read_bytes() == before
    code, _, err = cli("predict", other, "test", "--output", out, "--resume")
    assert code == 1 and "predictions of another model" in err
    assert out.read_bytes() == before
    code, _, err = cli("predict", run, "test", "--output", out, "--resume", "--topk", "2")
    assert code == 1 and "not --topk 2" in err and out.read_bytes() == before


def test_resume_reads_file_names_with_line_breaks_and_formula_characters_exactly(trained, tmp_path, cli,
                                                                                   monkeypatch):
    run, _, _ = trained
    photos = tmp_path / "odd"
    photos.mkdir()
    names = ["a\nb.png", "c\rd.png", "e\x0cf.png", "g\x1dh.png", "i\u2028j.png", "=1+1.png", "-x.png", "@y.png",
             "'q.png", "plain.png"]
    for i, name in enumerate(names):
        Image.new("RGB", (32, 32), (40 + 20 * i, 60, 200)).save(photos / name)
    monkeypatch.chdir(photos)  # the rows' paths are the names themselves: "=1+1.png" starts a cell
    for suffix in ("csv", "jsonl"):
        out = tmp_path / f"p.{suffix}"
        code, _, err = cli("predict", run, ".", "--output", out)
        assert code == 0, err
        size = out.stat().st_size
        code, _, err = cli("predict", run, ".", "--output", out, "--resume")
        assert code == 0 and "holds 10 rows: predicting the other 0 files" in err
        assert out.stat().st_size == size  # nothing written twice
    with open(tmp_path / "p.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0][-1] == "model" and len(rows) == 11
    # OWASP: a cell a spreadsheet would run as a formula starts with a quote (and so does one that starts with a
    # quote, so that reading back is exact); every other path is as given.
    assert not any(c.startswith(("=", "+", "-", "@")) for r in rows[1:] for c in r)
    assert {"'=1+1.png", "'-x.png", "'@y.png", "''q.png", "plain.png", "a\nb.png"} <= {r[0] for r in rows[1:]}
    jsonl = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().split("\n") if line]
    assert sorted(r["path"] for r in jsonl) == sorted(names)  # JSON needs no prefix: its paths are as they are


def test_a_failed_predict_leaves_no_header_only_file_and_unwritable_outputs_are_one_line(trained, tmp_path, cli):
    run, _, folder = trained
    out = tmp_path / "p.csv"
    code, _, err = cli("predict", tmp_path / "no-such-run", folder / "test", "--output", out)
    assert code == 1 and not out.exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    code, _, err = cli("predict", run, folder / "test", "--output", a_file / "sub" / "p.csv")
    assert code == 1 and "cannot write --output" in err
    _one_line(err)
    code, _, err = cli("predict", run, folder / "test", "--cam", a_file / "cams")
    assert code == 1 and "--cam folder" in err
    _one_line(err)


# --- 8: --cam names ---------------------------------------------------------------------------------------------------

def test_cam_overlays_of_files_that_share_a_name_do_not_overwrite_each_other(trained, tmp_path, cli):
    run, _, _ = trained
    files = ["a/x.png", "a/x.jpg", "p/a/y.png", "q/a/y.png", "solo.png"]
    for i, name in enumerate(files):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (40, 60 + 30 * i, 200)).save(tmp_path / "in" / name)
    code, out, err = cli("predict", run, tmp_path / "in", "--cam", tmp_path / "cams", "--json")
    assert code == 0, err
    cams = [json.loads(line)["cam"] for line in out.splitlines()]
    assert len(set(cams)) == 5 and all(Path(c).is_file() for c in cams)
    assert sorted(Path(c).name for c in cams if "solo" in c) == ["solo.cam.png"]
    code, _, err = cli("predict", run, tmp_path / "in", "--cam", tmp_path / "maps.png")
    assert code == 1 and "looks like an image file name" in err and not (tmp_path / "maps.png").exists()


# --- 2, 3, 6, 15, 16: export ------------------------------------------------------------------------------------------

def test_int8_export_never_writes_over_a_sidecar_it_did_not_make(trained, tmp_path, cli):
    pytest.importorskip("onnxruntime")
    run = _copy(trained[0], tmp_path)
    mine = tmp_path / "X.json"
    mine.write_text('{"my": "settings"}')
    code, _, err = cli("export", run, "--quantize", "int8", "--out", tmp_path / "X.onnx")
    assert code == 1 and "X.json" in err and "--force" in err and mine.read_text() == '{"my": "settings"}'
    machine = (run / "machine.json").read_bytes()
    for force in ((), ("--force",)):
        code, _, err = cli("export", run, "--quantize", "int8", "--out", run / "machine.onnx", *force)
        assert code == 1 and "a file of a run" in err
        assert (run / "machine.json").read_bytes() == machine and not (run / "machine.onnx").exists()


def test_a_failed_export_keeps_the_previous_model_and_leaves_no_temporary_file(trained, tmp_path, cli):
    pytest.importorskip("onnxruntime")
    run = _copy(trained[0], tmp_path)
    assert cli("export", run)[0] == 0
    good = (run / "model.onnx").read_bytes()

    def small_files() -> None:  # `ulimit -f`: writes past 200 KB fail (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    for fmt in ("onnx", "torchscript"):
        p = subprocess.run(reslab_cmd("export", str(run), "--format", fmt), text=True,
                           capture_output=True, preexec_fn=small_files, timeout=300)
        assert p.returncode == 1 and "cannot write" in p.stderr, p.stderr
        _one_line(p.stderr)
    assert (run / "model.onnx").read_bytes() == good and not (run / "model.ts").exists()
    assert not [f for f in run.iterdir() if ".tmp" in f.name]


def test_onnx_runtimes_refuse_a_model_exported_from_other_weights(trained, tmp_path, cli):
    pytest.importorskip("onnxruntime")
    run, other, folder = trained
    run = _copy(run, tmp_path)
    other = _copy(other, tmp_path, "other")
    assert cli("export", run)[0] == 0
    code, _, err = cli("predict", run, folder / "test", "--runtime", "onnx")
    assert code == 0, err
    shutil.copy(run / "model.onnx", other / "model.onnx")  # an export of other weights, with the same classes
    code, _, err = cli("predict", other, folder / "test", "--runtime", "onnx")
    assert code == 1 and "exported from other weights" in err and f"reslab export {other}" in err
    _one_line(err)
    import onnx

    m = onnx.load(str(run / "model.onnx"))
    del m.metadata_props[:]  # an older reslab's export, or another tool's
    onnx.save(m, str(other / "model.onnx"))
    code, _, err = cli("predict", other, folder / "test", "--runtime", "onnx")
    assert code == 1 and "does not record the weights" in err
    (other / "model.onnx").write_bytes(b"\x08\x07 not an onnx model" * 50)
    code, _, err = cli("predict", other, folder / "test", "--runtime", "onnx")
    assert code == 1 and "not a readable ONNX model" in err
    _one_line(err)


def test_a_killed_exports_temporary_folder_is_removed_when_the_run_is_next_used(trained, tmp_path, cli):
    pytest.importorskip("onnxruntime")
    run = _copy(trained[0], tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = run / f".reslab-export.tmp{gone.pid}.abc123"
    stale.mkdir()
    (stale / "float.onnx").write_bytes(b"x" * 1000)
    live = run / f".reslab-int8.tmp{os.getpid()}.def456"  # a running writer's: left alone
    live.mkdir()
    assert cli("export", run)[0] == 0
    assert not stale.exists() and live.exists()


# --- 4, 5: serve and predict bounds -----------------------------------------------------------------------------------

def _bomb(path: Path, size: tuple[int, int] = (9000, 8000), mode: str = "L") -> Path:
    """72 megapixels, a few hundred KB as PNG: between 1x and 2x PIL's limit, where PIL itself only warns."""
    Image.new(mode, size).save(path)
    return path


def test_every_reader_refuses_an_image_over_the_pixel_limit(trained, tmp_path, cli):
    run, _, _ = trained
    photos = tmp_path / "in"
    photos.mkdir()
    _bomb(photos / "bomb.png")
    Image.new("RGB", (32, 32), (40, 60, 200)).save(photos / "ok.png")
    code, out, err = cli("predict", run, photos, "--json")
    assert code == 0 and "bomb.png" in err and "megapixels, over the limit of 64" in err
    assert [json.loads(line)["path"].endswith("ok.png") for line in out.splitlines()] == [True]


def test_audit_names_what_training_will_skip_and_exits_1_on_errors(tmp_path, cli):
    root = make_folder(tmp_path / "d", per_class=6)
    _bomb(root / "train" / "red" / "huge.png")
    (root / "train" / "violet").mkdir()  # an empty class folder
    outside = make_folder(tmp_path / "elsewhere", per_class=2, splits=("x",))
    os.symlink(outside / "x" / "red", root / "train" / "red" / "linked")
    code, out, err = cli("audit", root, "--json")
    assert code == 1 and "the audit found 1 error" in err
    findings = {f["kind"]: f for f in json.loads(out)["findings"]}
    assert findings["too_large"]["severity"] == "error" and findings["too_large"]["files"][0].endswith("huge.png")
    assert "train/violet" in findings["empty_class"]["message"]
    assert len(findings["outside_link"]["files"]) == 2 and "mode" not in findings  # the bomb is not "L, not RGB"
    os.remove(root / "train" / "red" / "huge.png")
    code, out, err = cli("audit", root)
    assert code == 0 and "[warning] 1 class folders hold no images" in out


@pytest.fixture
def serve(trained, tmp_path):
    """Start ``reslab serve`` with extra options on a free loopback port; yields a function returning the URL."""
    import urllib.request

    pytest.importorskip("fastapi")
    procs = []

    def start(*options: str) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (the server's output while it runs)
        proc = subprocess.Popen(reslab_cmd("serve", trained[0], "--port", port, *options), stdout=log, stderr=log)
        procs.append((proc, log))
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                with urllib.request.urlopen(url + "/health", timeout=1):
                    return url
            except OSError:
                time.sleep(0.1)
        raise AssertionError("the server did not start")

    yield start
    for proc, log in procs:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _post(url: str, body: bytes, kind: str, timeout: float = 30) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers={"Content-Type": kind}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _form(*parts: tuple[str, bytes]) -> tuple[bytes, str]:
    """A multipart body of ``(field name, file bytes)`` parts, and its content type."""
    b = "guards-boundary"
    body = b"".join(f"--{b}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"x.png\"\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in parts)
    return body + f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


def _png(size=(32, 32), mode="RGB") -> bytes:
    import io

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def test_the_server_refuses_bombs_and_images_too_large_to_decode_in_memory_at_once(serve, tmp_path):
    url = serve("--decode-memory-mb", "100")
    status, answer = _post(url + "/predict", *_form(("file", _bomb(tmp_path / "b.png").read_bytes())))
    assert status == 413 and "megapixels" in answer["error"]
    # 16-bit, 25 megapixels: under the pixel limit, yet its decode needs ~550 MB (a float copy): over the bound.
    status, answer = _post(url + "/predict", *_form(("file", _png((5000, 5000), "I;16"))))
    assert status == 413 and "--decode-memory-mb 100" in answer["error"]
    status, answer = _post(url + "/predict", *_form(("file", _png())))  # still serving, small images pass
    assert status == 200


def test_a_chunked_upload_is_refused_as_it_arrives_not_after_it_is_spooled(serve):
    url = serve("--max-upload-mb", "0.05")
    port = int(url.rsplit(":", 1)[1])
    _, kind = _form()
    prefix = (b'--guards-boundary\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
              b"Content-Type: application/octet-stream\r\n\r\n")
    chunk, sent, answer = b"\0" * 16384, 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n"
                  f"Transfer-Encoding: chunked\r\n\r\n".encode() + b"%x\r\n%s\r\n" % (len(prefix), prefix))
        try:  # 16 KB a millisecond, up to 20 MB, looking for an answer after every chunk
            while sent < 20 * 2**20 and not answer:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    answer = s.recv(65536)
                s.setblocking(True)
                time.sleep(0.001)
            if not answer:
                s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while the body was still coming
        s.settimeout(30)
        try:
            while b"\r\n\r\n" not in answer and (more := s.recv(65536)):
                answer += more
        except ConnectionResetError:
            pass
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 2 * 2**20, sent  # answered within the first 2 MB of a 20 MB body, not after spooling it


def test_a_client_that_trickles_its_headers_is_cut_off_and_kept_alive_clients_are_not(serve):
    import http.client

    url = serve("--header-timeout", "1")
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
        start, answer = time.time(), b""
        try:  # one header byte every 0.2 s: the request head is never complete within a second
            for byte in b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 50:
                slow.sendall(bytes([byte]))
                slow.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    answer += slow.recv(4096)
                slow.setblocking(True)
                if answer:
                    break
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            pass
        slow.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            while more := slow.recv(4096):
                answer += more
        elapsed = time.time() - start
    assert answer.startswith(b"HTTP/1.1 408") and b"--header-timeout 1 s" in answer, answer[:200]
    assert elapsed < 4, elapsed
    # requests on one kept-alive connection are not cut: the clock stops at each head and restarts after each answer
    body, kind = _form(("file", _png()))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(3):
        conn.request("POST", "/predict", body, {"Content-Type": kind})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        response.read()
        time.sleep(0.6)
    conn.close()


def test_the_server_answers_malformed_requests_in_one_line_and_checks_its_port(serve, trained, tmp_path, cli):
    url = serve()
    status, answer = _post(url + "/predict", *_form(("file", _png()), ("file", _png())))
    assert status == 400 and "two 'file' parts" in answer["error"]
    status, answer = _post(url + "/predict", b"garbage", "multipart/form-data; boundary=zz")
    assert 400 <= status < 500 and set(answer) == {"error"}
    status, answer = _post(url + "/predict", b"{}", "application/json")
    assert 400 <= status < 500 and set(answer) == {"error"}
    code, _, err = cli("serve", trained[0], "--port", "80000")
    assert code == 2 and "--port must be 0-65535, got 80000" in err
    port = int(url.rsplit(":", 1)[1])
    p = subprocess.run(reslab_cmd("serve", trained[0], "--port", port), capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "cannot listen on 127.0.0.1" in p.stderr and "serving" not in p.stdout
    _one_line(p.stderr)


def test_decode_memory_admits_small_images_while_large_ones_wait(tmp_path):
    import asyncio

    from reslab.ship.serve import DecodeMemory

    async def scenario() -> list[str]:
        memory, order = DecodeMemory(100), []

        async def decode(name: str, cost: int, seconds: float) -> None:
            await memory.take(cost)
            order.append(f"{name} in")
            await asyncio.sleep(seconds)
            await memory.give(cost)

        await asyncio.gather(decode("big1", 60, 0.2), decode("big2", 60, 0.01), decode("small", 5, 0.01))
        assert memory.used == 0
        return order

    order = asyncio.run(scenario())
    assert order.index("small in") < order.index("big2 in")  # the second large one waited for the first


# --- 9, 12: training's own files --------------------------------------------------------------------------------------

def test_keep_checkpoints_deletes_only_the_files_it_made(tmp_path, cli):
    folder = make_folder(tmp_path / "d", per_class=8)
    out = tmp_path / "r"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step-best.pt").write_text("mine")
    (out / "checkpoints" / "step-00000004.pt").write_text("mine too")  # a name the rotation would use (step 4)
    code, _, err = cli("train", "--data", folder, "--out", out, "--arch", "resnet20", "--epochs", "3",
                       "--batch-size", "8", "--threads", "1", "--keep-checkpoints", "1", "--checkpoint-every", "2")
    assert code == 0, err
    # 24 images, batch 8: 9 steps, saved at 2, 3, 4, 6, 8, 9; the last one kept, the user's two untouched.
    names = sorted(f.name for f in (out / "checkpoints").iterdir())
    assert names == ["step-00000004.pt", "step-00000009.pt", "step-best.pt"]
    assert (out / "checkpoints" / "step-00000004.pt").read_text() == "mine too"
    assert "exists and this run did not write it" in err


def test_a_folder_holding_a_users_machine_json_is_not_a_run_to_write_over(tmp_path, cli):
    folder = make_folder(tmp_path / "d", per_class=4)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "machine.json").write_text('{"my": "inventory"}')
    code, _, err = cli("train", "--data", folder, "--out", out, "--epochs", "1", "--threads", "1")
    assert code == 1 and "machine.json" in err and "--force" in err
    assert (out / "machine.json").read_text() == '{"my": "inventory"}'


def test_a_failed_checkpoint_never_leaves_the_metrics_ahead_of_it(tmp_path, monkeypatch):
    from reslab.core.errors import CheckpointError
    from reslab.models.checkpoint import load_checkpoint
    from reslab.training import loop

    folder = make_folder(tmp_path / "d", per_class=8)
    real, calls = loop.save_checkpoint, []

    def disk_full_at_the_second_epoch(path, state):
        calls.append(state["step"])
        if len(calls) == 2:
            raise CheckpointError(f"cannot write {path}: No space left on device (disk full?)")
        real(path, state)

    monkeypatch.setattr(loop, "save_checkpoint", disk_full_at_the_second_epoch)
    with pytest.raises(CheckpointError):
        reslab.train(data=str(folder), out=str(tmp_path / "r"), arch="resnet20", epochs=3, batch_size=8,
                     threads=1)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    saved = load_checkpoint(tmp_path / "r" / "last.pt")
    assert epochs == [1] and saved["step"] == calls[0]  # what metrics.jsonl says is what last.pt holds


# --- 10, 11: pages and figures from names and files anyone may have written -------------------------------------------

def test_class_names_with_dollars_and_carets_are_drawn_as_plain_text(tmp_path, cli):
    classes = {"under $5 ^_^ over $10": (40, 60, 200), "a $x$ b": (210, 40, 40)}
    folder = make_folder(tmp_path / "d", per_class=6, classes=classes)
    run = tmp_path / "r"
    assert cli("train", "--data", folder, "--out", run, "--arch", "resnet20", "--epochs", "1", "--batch-size", "8",
               "--threads", "1")[0] == 0
    code, _, err = cli("eval", run, "--data", folder, "--plot", tmp_path / "c.png", "--gallery", tmp_path / "g")
    assert code == 0, err
    assert (tmp_path / "c.png").stat().st_size > 1000 and (tmp_path / "g" / "gallery.json").is_file()


def test_the_report_quotes_every_attribute_and_survives_edited_files(trained, tmp_path, cli):
    run = _copy(trained[0], tmp_path)
    (run / "audit.json").write_text(json.dumps({"data": "d", "findings": [
        {"severity": "x onmouseover=alert(1)", "message": "<b>m</b>", "advice": "a"}]}))
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    last = json.loads(metrics[-1])
    last["train_loss"] = None
    (run / "metrics.jsonl").write_text("\n".join([*metrics[:-1], json.dumps(last)]) + "\n")
    (run / "gallery").mkdir()
    (run / "gallery" / "gallery.json").write_text('{"mistakes": [1], "pairs": [{}]}')
    code, _, err = cli("report", run, "--no-evaluate")
    assert code == 0, err
    page = (run / "report.html").read_text()
    assert "onmouseover" not in page and '<li class="note">' in page and "&lt;b&gt;m&lt;/b&gt;" in page


# --- 16 and the low items: options checked before any work ------------------------------------------------------------

def test_options_are_range_checked_before_any_work_in_one_line(trained, tmp_path, cli):
    run = trained[0]
    for args, line in [
        (("bench", "--inference", run, "--seconds", "0"), "--seconds must be positive, got 0"),
        (("bench", "--batch-size", "0"), "--batch-size must be positive, got 0"),
        (("lr-find", "--data", tmp_path / "missing", "--range-steps", "2"), "--range-steps must be at least 3"),
        (("lr-find", "--data", tmp_path / "missing", "--start-lr", "1", "--end-lr", "0.1"), "0 < --start-lr"),
        (("export", run, "--quantize", "int8", "--max-drop", "2"), "--max-drop must be in [0, 1], got 2"),
    ]:
        code, _, err = cli(*args)
        assert code != 0 and line in err, (args, err)
        _one_line(err)


def _outside(kind) -> list[str]:
    """A value just outside each bound of a range-restricted number type."""
    import operator

    step = {operator.gt: 0, operator.ge: -1, operator.lt: 0, operator.le: 1}
    return [str(bound + step[op]) for op, bound in kind._restrictions]


def _number_kind(annotation):
    """The number type under ``Optional[...]``, or None for a non-number."""
    import typing

    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return next((k for k in kinds if isinstance(k, type) and issubclass(k, (int, float)) and k is not bool), None)


def test_every_numeric_option_of_every_command_is_range_checked_before_any_work(cli):
    """The general rule behind item 16: every number a command takes has a declared range, refused at parse time
    (exit 2, one line naming the option), before any file is read. Enumerates every command, so a new option
    without a range fails here."""
    import dataclasses
    import inspect
    import typing

    from reslab.cli.commands import COMMANDS
    from reslab.cli.options import RANGED
    from reslab.config.schema import TrainConfig

    checked = 0
    for name, fn in COMMANDS.items():
        if name in ("train", "compare"):  # TrainConfig's fields, below
            continue
        hints = typing.get_type_hints(fn)
        params = list(inspect.signature(fn).parameters.values())
        required = [("x" if p.annotation is not bool else None) for p in params
                    if p.default is inspect.Parameter.empty and p.kind is not inspect.Parameter.KEYWORD_ONLY
                    and p.name != "config"]
        for p in params:
            kind = _number_kind(hints.get(p.name))
            if kind is None:
                continue
            assert kind in RANGED, f"reslab {name} --{p.name.replace('_', '-')} takes {kind.__name__} with no range"
            flag = "--" + p.name.replace("_", "-")
            for value in _outside(kind):
                code, _, err = cli(name, *[r for r in required if r], flag, value)
                assert code == 2 and err.startswith(f"reslab: error: {flag} "), (name, flag, value, err)
                _one_line(err)
                checked += 1
    assert checked >= 30, checked  # the enumeration found the options (32 when written)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if _number_kind(hints[f.name]) or typing.get_args(hints[f.name]) == (float,):
            assert f.metadata["check"] is not None, f"train --{f.name.replace('_', '-')} has no range"


def test_resume_auto_on_a_copied_run_does_not_name_the_folder_it_was_copied_from(tmp_path, cli):
    folder = make_folder(tmp_path / "d", per_class=4)
    assert cli("train", "--data", folder, "--out", tmp_path / "first", "--arch", "resnet20", "--epochs", "1",
               "--batch-size", "8", "--threads", "1")[0] == 0
    shutil.copytree(tmp_path / "first", tmp_path / "copy")
    (tmp_path / "copy" / "model.safetensors").unlink()  # a run that did not finish, carried elsewhere
    code, _, err = cli("train", "--resume", "auto", "--data", folder, "--out", tmp_path / "copy", "--arch",
                       "resnet20", "--epochs", "2", "--batch-size", "8", "--threads", "1")
    assert code == 0, err
    assert "has a checkpoint: resuming it" in err and "kept the run's own --out" not in err
