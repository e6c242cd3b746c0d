"""The decoded-image cache on disk: memory-mapped batches, concurrent first use, invalidation and failures."""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from reslab.core.progress import CountProgress
from reslab.data import Batches, BatchTransform, DataError, load_data, load_split

from helpers import make_folder

pytestmark = pytest.mark.usefixtures("own_cache")  # these tests count the entries


def cache() -> Path:
    return Path(os.environ["RESLAB_CACHE"])


def entries() -> list[Path]:
    return sorted(cache().glob("*.u8")) if cache().is_dir() else []


def test_memory_mapped_batches_are_bit_identical_to_in_memory_ones(tmp_path):
    root = make_folder(tmp_path / "d", per_class=20, size=40)
    kw = dict(augment="paper", input_size=32, val_split=6, train_samples=40, seed=3)
    mem, disk = load_data(str(root), loader="memory", **kw), load_data(str(root), loader="disk", **kw)
    assert disk.train.mapped and not mem.train.mapped and disk.train.rows is not None
    assert (mem.mean, mem.std) == (disk.mean, disk.std)
    for name in ("train", "val", "test"):
        a, b = getattr(mem, name), getattr(disk, name)
        for train in (True, False):
            t = BatchTransform("paper", train, 32, mem.mean, mem.std)
            for epoch in (0, 1):
                ba = Batches(a, t, 4, shuffle=train, drop_last=train, seed=1, device=torch.device("cpu"))
                bb = Batches(b, t, 4, shuffle=train, drop_last=train, seed=1, device=torch.device("cpu"))
                for (xa, ya), (xb, yb) in zip(ba.epoch(epoch), bb.epoch(epoch), strict=True):
                    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_above_the_memory_budget_training_reads_a_memory_map(tmp_path, cli, monkeypatch):
    root = make_folder(tmp_path / "d", per_class=8)
    monkeypatch.setenv("RESLAB_MEMORY_BUDGET", "10K")  # 24 images of 32 px = 72 KiB
    assert load_split(str(root), "train", store_size=32).mapped
    code, _, err = cli("train", "--data", root, "--arch", "resnet20", "--epochs", "1", "--batch-size", "8",
                       "--out", tmp_path / "run")
    assert code == 0, err
    monkeypatch.setenv("RESLAB_MEMORY_BUDGET", "lots")
    code, _, err = cli("train", "--data", root, "--epochs", "1", "--out", tmp_path / "run2")
    assert code == 1 and "RESLAB_MEMORY_BUDGET='LOTS'" in err


CHILD = textwrap.dedent("""
    import hashlib, sys, time
    from pathlib import Path
    from reslab.data import folder
    from reslab.data.datasets import load_split

    decodes = []
    original = folder._decode
    def counted(*args, **kwargs):
        decodes.append(1)
        return original(*args, **kwargs)
    folder._decode = counted
    Path(sys.argv[2]).touch()
    while not Path(sys.argv[3]).exists():  # start together with the other process
        time.sleep(0.001)
    split = load_split(sys.argv[1], "train", store_size=32)
    print(len(decodes), hashlib.sha256(split.images.numpy().tobytes()).hexdigest())
""")


def test_two_runs_started_together_decode_the_folder_once(tmp_path):
    root = make_folder(tmp_path / "d", per_class=150, size=48, splits=("train",))
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(tmp_path / f"ready{i}"), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.time() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.time() < deadline:
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [out.split() for out, _ in outs]
    assert sorted(int(r[0]) for r in results) == [0, 1], outs  # one decoded, the other read its result
    assert results[0][1] == results[1][1]
    assert len(entries()) == 1 and not [f for f in cache().iterdir() if ".tmp" in f.name]


def test_a_truncated_entry_is_said_and_decoded_again(tmp_path, capsys):
    root = make_folder(tmp_path / "d", per_class=3, splits=("train",))
    first = load_split(str(root), "train", store_size=32)
    (entry,) = entries()
    entry.write_bytes(entry.read_bytes()[:1000])
    again = load_split(str(root), "train", store_size=32)
    assert "has 1000 bytes, not the 27648 its record states (truncated?)); decoding again" in \
        capsys.readouterr().err
    assert torch.equal(first.images, again.images)
    load_split(str(root), "train", store_size=32)
    assert capsys.readouterr().err == ""  # rebuilt: read silently


def test_an_entry_of_an_older_reslab_is_said_and_replaced(tmp_path, capsys, cli):
    root = make_folder(tmp_path / "d", per_class=3, splits=("train",))
    first = load_split(str(root), "train", store_size=32)
    (entry,) = entries()
    meta = entry.with_suffix(".json")
    old = json.loads(meta.read_text())
    meta.write_text(json.dumps({"source": old["source"], "images": 9, "store_size": 32}))  # reslab 0.1's record
    entry.with_suffix(".npz").write_bytes(b"an old entry")
    _, out, _ = cli("cache")
    assert "format 2 of an older reslab: never read" in out
    again = load_split(str(root), "train", store_size=32)
    assert "written by an older reslab (format unknown); decoding again" in capsys.readouterr().err
    assert torch.equal(first.images, again.images) and not entry.with_suffix(".npz").exists()


@pytest.mark.parametrize("preallocate", [True, False])
def test_a_full_disk_while_writing_goes_on_without_the_cache(tmp_path, monkeypatch, capsys, preallocate):
    root = make_folder(tmp_path / "d", per_class=3, splits=("train",))
    expected = load_split(str(root), "train", store_size=32).images
    if not preallocate:  # a filesystem without fallocate: the failure comes from a write in the middle
        monkeypatch.delattr(os, "posix_fallocate")
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path / "empty-cache"))
    # Files over 10 kB cannot be written: writes fail with an OSError, as on a full disk.
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, old_limit[1]))
        split = load_split(str(root), "train", store_size=32)
        streamed = load_split(str(root), "train", store_size=32, loader="disk")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    err = capsys.readouterr().err
    assert torch.equal(split.images, expected)
    assert "File too large); continuing without it" in err
    assert streamed.images is None and len(streamed.paths) == 9  # no room for a memory map: files are streamed
    assert "streaming the images from their files instead" in err
    assert not entries() and not list(cache().glob("*tmp*"))


def test_an_unwritable_cache_folder_is_one_line(tmp_path, monkeypatch, capsys):
    root = make_folder(tmp_path / "d", per_class=3, splits=("train",))
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path / "a-file" / "cache"))
    split = load_split(str(root), "train", store_size=32)
    err = capsys.readouterr().err
    assert split.images.shape == (9, 32, 32, 3) and err.count("\n") == 1 and "decoding without it" in err


def test_an_image_rewritten_while_decoding_is_one_error_and_not_cached(tmp_path, monkeypatch):
    from reslab.data import folder as folder_module

    root = make_folder(tmp_path / "d", per_class=2, splits=("train",))
    victim = str(root / "train" / "red" / "0001.png")
    original = folder_module._decode_one

    def decode_and_rewrite(job):
        out = original(job)
        if job[0].endswith("0000.png") and "red" in job[0]:  # another program saves over a file mid-decode
            Image.new("RGB", (32, 32), (0, 0, 0)).save(victim)
            os.utime(victim, ns=(time.time_ns(), time.time_ns() + 10**9))
        return out

    monkeypatch.setattr(folder_module, "_decode_one", decode_and_rewrite)
    with pytest.raises(DataError, match="changed while they were decoded"):
        load_split(str(root), "train", store_size=32)
    assert not entries() and not list(cache().glob("*tmp*"))  # nothing half-old, half-new was cached
    monkeypatch.setattr(folder_module, "_decode_one", original)
    again = load_split(str(root), "train", store_size=32)  # a stable folder decodes (and caches) normally
    assert again.images[again.paths.index(victim)].max() == 0 and len(entries()) == 1


def test_long_decodes_show_progress_and_an_eta():
    stream = io.StringIO()
    p = CountProgress(1000, "decoding 1000 images of x", quiet=0, stream=stream)
    for i in range(1, 1001):
        p.update(i)
    lines = stream.getvalue().splitlines()
    assert 9 <= len(lines) <= 11 and lines[-1].startswith("decoding 1000 images of x: 1000/1000 (100%)")
    assert all("ETA" in line for line in lines)
    quiet = io.StringIO()
    q = CountProgress(1000, "x", stream=quiet)  # quick work says nothing
    for i in range(1, 1001):
        q.update(i)
    assert quiet.getvalue() == ""


def test_training_does_not_import_the_compiler(tmp_path):
    root = make_folder(tmp_path / "d", per_class=8)
    code = (f"import sys, reslab; reslab.train(preset='fast', data={str(root)!r}, epochs=1, batch_size=8, "
            f"accuracy_marks=[], out={str(tmp_path / 'run')!r}); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
