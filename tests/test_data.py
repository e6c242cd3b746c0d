"""Data: sources, the decode cache, and batched augmentation against torchvision's per-image transforms."""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from reslab.data import BatchTransform, DataError, balanced_indices, load_data, load_split
from reslab.data.augment import _shift_hue, color_jitter, crop_flip, resize_crop
from reslab.data.datasets import load_cifar10

from helpers import make_folder


def test_hue_brightness_contrast_match_torchvision():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    for shift in (-0.3, 0.05, 0.29):
        ours = _shift_hue(x, torch.full((4,), shift))
        assert (ours - torch.stack([TF.adjust_hue(i, shift) for i in x])).abs().max() < 1e-5
    ours = color_jitter(x, torch.tensor([[1.4, 0.6, 0.0]] * 4), [0, 1])
    ref = torch.stack([TF.adjust_contrast(TF.adjust_brightness(i, 1.4), 0.6) for i in x])
    assert (ours - ref).abs().max() < 1e-6


def test_resize_crop_equals_resize_then_crop():
    x = torch.rand(3, 3, 32, 32)
    big = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)
    top, left, flip = torch.tensor([0, 192, 77]), torch.tensor([100, 7, 192]), torch.tensor([False, True, False])
    ours = resize_crop(x, 256, 64, top, left, flip)
    for i in range(3):
        ref = big[i, :, top[i]:top[i] + 64, left[i]:left[i] + 64]
        assert (ours[i] - (ref.flip(-1) if flip[i] else ref)).abs().max() < 1e-5


def test_crop_flip_equals_pad_crop_flip():
    x = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    dy, dx, flip = torch.tensor([0, 8]), torch.tensor([3, 5]), torch.tensor([True, False])
    out = crop_flip(x, 32, 4, dy, dx, flip)
    padded = F.pad(x.permute(0, 3, 1, 2), (4, 4, 4, 4))
    for i in range(2):
        ref = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        assert torch.equal(out[i].permute(2, 0, 1), ref.flip(-1) if flip[i] else ref)


def test_batch_transforms_shapes_ranges_and_determinism():
    x = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    seed_t = BatchTransform("seed", True, 64, (0.5,) * 3, (0.5,) * 3)
    a = seed_t(x, torch.Generator().manual_seed(1))
    b = seed_t(x, torch.Generator().manual_seed(1))
    assert a.shape == (6, 3, 64, 64) and torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, seed_t(x, torch.Generator().manual_seed(2)))
    ev = BatchTransform("seed", False, 64, (0.5,) * 3, (0.5,) * 3)
    assert torch.equal(ev(x), ev(x))  # evaluation is deterministic (the seed's was not)
    paper = BatchTransform("paper", True, 32, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))(x, torch.Generator().manual_seed(0))
    assert paper.shape == (6, 3, 32, 32)
    none = BatchTransform("none", False, 32, (0.0,) * 3, (1.0,) * 3)(x)
    assert torch.allclose(none, x.permute(0, 3, 1, 2).float() / 255)


def test_balanced_subset_is_seeded_and_even():
    labels = torch.arange(10).repeat_interleave(50)
    a, b = balanced_indices(labels, 100, seed=3), balanced_indices(labels, 100, seed=3)
    assert torch.equal(a, b) and len(a.unique()) == 100
    assert labels[a].bincount().tolist() == [10] * 10
    assert not torch.equal(a, balanced_indices(labels, 100, seed=4))


def test_folder_modes_become_rgb_and_the_cache_is_reused(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", per_class=3, splits=("train", "test"))
    Image.new("L", (32, 32), 128).save(root / "train" / "red" / "gray.png")
    Image.new("P", (32, 32), 3).save(root / "train" / "red" / "palette.png")
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(root / "train" / "red" / "rgba.png")
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(root / "train" / "red" / "sixteen.png")
    s = load_split(str(root), "train", store_size=32)
    assert s.images.shape == (13, 32, 32, 3) and s.images.dtype == torch.uint8
    assert s.classes == ["blue", "green", "red"]
    assert list(Path(os.environ["RESLAB_CACHE"]).glob("*.u8"))
    again = load_split(str(root), "train", store_size=32)
    assert torch.equal(again.images, s.images)
    # A changed file invalidates the cache: the new content is decoded, never the stale array.
    time.sleep(0.01)
    Image.new("RGB", (32, 32), (0, 0, 0)).save(root / "train" / "red" / "gray.png")
    fresh = load_split(str(root), "train", store_size=32)
    assert not torch.equal(fresh.images, s.images)


def test_mixed_sizes_any_size_works(tmp_path):
    root = make_folder(tmp_path / "d", per_class=2, size=40)
    Image.new("RGB", (100, 60), (200, 10, 10)).save(root / "train" / "red" / "wide.png")
    bundle = load_data(str(root), augment="paper", input_size=32)
    assert bundle.train.images.shape[1:] == (32, 32, 3) and len(bundle.train) == 7
    seed = load_data(str(root), augment="seed", input_size=64)
    assert seed.train.images.shape[1:] == (64, 64, 3)  # mixed sizes are kept as 64-px squares for the seed resize


def test_val_split_and_subsets(tmp_path):
    root = make_folder(tmp_path / "d", per_class=10)
    b = load_data(str(root), augment="paper", input_size=32, val_split=6, train_samples=12, test_samples=9)
    assert len(b.val) == 6 and len(b.train) == 12 and len(b.test) == 9
    assert b.val.labels.bincount().tolist() == [2, 2, 2]


def _fake_cifar(root, n=20):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        with open(base / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    return base


def test_cifar10_reads_the_torchvision_layout(tmp_path):
    base = _fake_cifar(tmp_path)
    images, labels, classes = load_cifar10(tmp_path, train=True)
    assert images.shape == (100, 32, 32, 3) and labels.shape == (100,) and classes[3] == "c3"
    with open(base / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][0]
    assert np.array_equal(images[0], raw.reshape(3, 32, 32).transpose(1, 2, 0))
    s = load_split("cifar10", "test", store_size=32, data_dir=str(tmp_path))
    assert len(s) == 20


def test_cifar10_batches_cannot_run_code(tmp_path):
    base = _fake_cifar(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(base / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_cifar10(tmp_path, train=False)
    assert not marker.exists()


def test_cifar10_offline_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"could not be downloaded.*--data"):
        load_split("cifar10", "train", store_size=32, data_dir=str(tmp_path / "none"))
    assert time.perf_counter() - t0 < 30


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not 'cifar10', 'digits' or an existing folder"):
        load_split(str(tmp_path / "nope"), "train", store_size=32)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders"):
        load_split(str(tmp_path / "empty"), "train", store_size=32)


def test_shared_cifar10_copy_loads_by_name(cifar_dir):
    s = load_split(str(cifar_dir), "test", store_size=32)
    assert len(s) == 10000 and s.classes[0] == "airplane" and s.images.shape == (10000, 32, 32, 3)


@pytest.mark.parametrize("size", [256, 73])
def test_reduced_jpeg_decoding_matches_a_full_decode(tmp_path, size):
    """A large JPEG decoded at a reduced scale (PIL's draft) and fitted to ``size`` is, within a stated tolerance
    (mean 1 level of 255, no pixel off by more than 16), the full decode fitted to ``size``."""
    from PIL import Image, ImageFilter

    from reslab.data.folder import fit_square, load_rgb

    rng = np.random.default_rng(0)
    # Texture at several scales, as in photos: blurred noise plus sharp-edged blocks.
    base = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
    big = base.resize((2400, 1800), Image.BICUBIC)
    blocks = np.kron(rng.integers(0, 256, (18, 24, 3)), np.ones((100, 100, 1))).astype(np.uint8)
    big = Image.blend(big, Image.fromarray(blocks), 0.3)
    path = tmp_path / "big.jpg"
    big.save(path, quality=92)
    full = np.asarray(fit_square(load_rgb(path), size), dtype=np.float64)
    reduced = np.asarray(fit_square(load_rgb(path, min_side=size), size), dtype=np.float64)
    diff = np.abs(full - reduced)
    assert full.shape == reduced.shape == (size, size, 3)
    print(f"size {size}: mean |diff| {diff.mean():.3f}, max {diff.max():.0f}")
    assert diff.mean() <= 1.0 and diff.max() <= 16, (diff.mean(), diff.max())
    with Image.open(path) as im:
        im.draft(im.mode, (size * 4 // 3 + 1, size + 1))
        assert min(im.size) >= size  # the draft never goes below the size the network needs


def test_cache_command_lists_and_clears(tmp_path, cli, monkeypatch):
    from helpers import make_folder

    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "d", per_class=3)
    load_split(str(root), "train", store_size=32)
    code, out, _ = cli("cache")
    assert code == 0 and "1 entries" in out and f"9 images at 32 px  {root / 'train'}" in out
    code, out, _ = cli("cache", "--json")
    entry = json.loads(out)
    assert entry["images"] == 9 and entry["source"] == str(root / "train") and entry["bytes"] == 9 * 32 * 32 * 3
    code, out, _ = cli("cache", "--clear")
    assert code == 0 and out.startswith("removed 3 files") and not list((tmp_path / "cache").iterdir())
    assert load_split(str(root), "train", store_size=32).images.shape == (9, 32, 32, 3)  # rebuilt on the next load
