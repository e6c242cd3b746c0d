"""Issue 36, photos as users have them: phone photos upright, HEIC, any extension's case, nested class folders, one
folder of class folders split for the user (near-duplicates kept on one side), labels from a CSV."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reslab.data.datasets import load_split
from reslab.data.folder import load_rgb, scan_folder


def _sideways(size=(40, 20)) -> Image.Image:
    """Left half red, right half blue: stored as a phone held sideways stores it."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:, : size[0] // 2] = (220, 20, 20)
    a[:, size[0] // 2:] = (20, 20, 220)
    return Image.fromarray(a)


def _tagged(path: Path, orientation: int = 6) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: rotate 90 degrees clockwise to display
    _sideways().save(path, quality=95, exif=exif)
    return path


def test_an_exif_rotated_photo_is_read_upright_everywhere(tmp_path):
    tagged = _tagged(tmp_path / "phone.jpg")
    im = load_rgb(tagged)
    assert im.size == (20, 40)  # portrait, as the phone showed it
    top, bottom = np.asarray(im)[2, 10], np.asarray(im)[-3, 10]
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]  # red on top, blue below: turned clockwise
    # The training path (decode workers, the decode cache) sees the same upright pixels as an upright copy.
    upright = tmp_path / "data" / "train"
    for c in ("a", "b"):
        (upright / c).mkdir(parents=True)
    _tagged(upright / "a" / "phone.jpg")
    _sideways().rotate(-90, expand=True).save(upright / "b" / "same.png")
    split = load_split(str(tmp_path / "data"), "train", store_size=20, loader="memory")
    rows = split.images.numpy().astype(int)
    assert np.abs(rows[0] - rows[1]).mean() < 6, np.abs(rows[0] - rows[1]).mean()


def test_extensions_in_any_case_and_nested_class_folders(tmp_path):
    root = tmp_path / "train"
    names = ["a.JPG", "b.jpeg", "c.PNG", "d.webp", "e.tif", "f.BMP"]
    for i, name in enumerate(names):
        (root / "cat" / "2024" / f"{i}").mkdir(parents=True)
        _sideways().save(root / "cat" / "2024" / f"{i}" / name)
    (root / "dog").mkdir()
    _sideways().save(root / "dog" / "x.Jpg")
    (root / "dog" / "notes.txt").write_text("not an image")
    paths, labels, classes = scan_folder(root)
    assert classes == ["cat", "dog"] and len(paths) == len(names) + 1
    assert labels.count("cat") == len(names) and labels.count("dog") == 1  # nested folders: their top folder's class


def test_heic_photos_are_read_with_the_photos_extra(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    source = _sideways()
    source.save(tmp_path / "p.heic", quality=95)
    got = np.asarray(load_rgb(tmp_path / "p.heic")).astype(int)
    assert got.shape == (20, 40, 3) and np.abs(got - np.asarray(source)).mean() < 8


def test_without_the_extra_a_heic_photo_is_one_line_naming_it(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")  # to write one; the reader below runs without it
    pillow_heif.register_heif_opener()
    for c in ("a", "b"):
        (tmp_path / "d" / "train" / c).mkdir(parents=True)
        _sideways().save(tmp_path / "d" / "train" / c / "x.png")
    _sideways().save(tmp_path / "d" / "train" / "a" / "phone.HEIC")
    _sideways().save(tmp_path / "p.heic")
    blocked = "import sys; sys.modules['pillow_heif'] = None; "  # as if it were not installed
    r = subprocess.run([sys.executable, "-c", blocked + "from reslab.data.folder import scan_folder; "
                        f"print(len(scan_folder({str(tmp_path / 'd' / 'train')!r})[0]))"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "2" and r.stderr.count("pip install 'reslab[photos]'") == 1, r.stderr
    r = subprocess.run([sys.executable, "-c", blocked + "from reslab.cli import main; import sys; sys.exit(main("
                        f"['audit', {str(tmp_path / 'd')!r}]))"], capture_output=True, text=True, timeout=120)
    assert r.stderr.count("pip install 'reslab[photos]'") == 1, r.stderr
