"""Issue 36, photos as users have them: phone photos upright, HEIC, any extension's case, nested class folders, one
folder of class folders split for the user (near-duplicates kept on one side), labels from a CSV."""

from __future__ import annotations

import shutil
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


# --- one folder of class folders, split for the user --------------------------------------------------------------

CLASSES = {"cat": (200, 60, 40), "dog": (40, 60, 200), "fox": (40, 190, 60), "owl": (180, 180, 40),
           "bee": (120, 40, 160)}
TINY = ["--arch", "resnet20", "--epochs", "1", "--batch-size", "16", "--threads", "1", "--precision", "fp32"]


def _flat_folder(root: Path, per_class: int = 14, planted: int = 3) -> dict[str, list[str]]:
    """Photos of 5 colour classes in one folder of class folders; the first ``planted`` of each class also saved
    re-encoded (JPEG q70) and resized (1.5x, PNG). Returns each planted photo's group of relative paths."""
    rng = np.random.default_rng(0)
    groups = {}
    for c, colour in CLASSES.items():
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            noise = rng.normal(0, 40, (48, 64, 3)) + rng.integers(-60, 60, 3)
            img = Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8))
            img.save(root / c / f"{i:03d}.jpg", quality=92)
            if i < planted:
                img.save(root / c / f"{i:03d}_copy.jpg", quality=70)
                img.resize((96, 72)).save(root / c / f"{i:03d}_big.png")
                groups[f"{c}/{i:03d}"] = [f"{c}/{i:03d}.jpg", f"{c}/{i:03d}_copy.jpg", f"{c}/{i:03d}_big.png"]
    return groups


def test_one_folder_of_class_folders_is_split_and_evaluated_on_exactly_its_held_out_images(tmp_path, cli):
    import json

    photos = tmp_path / "photos"
    planted = _flat_folder(photos)
    run = tmp_path / "run"
    code, _, err = cli("train", "--data", photos, "--out", run, *TINY)
    assert code == 0, err
    assert "held out as the test set" in err and f"{len(planted)} groups of duplicate images kept on one side" in err
    split = json.loads((run / "split.json").read_text())
    test = set(split["test"])
    assert len(test) == 5 * round(0.2 * (14 + 2 * 3)) and split["images"] == 5 * 20
    for group in planted.values():  # every planted copy on the side of its original
        assert len({f in test for f in group}) == 1, group
    code, out, err = cli("eval", run, "--data", photos, "--json")
    assert code == 0, err
    assert json.loads(out)["n"] == len(test)  # exactly the held-out images
    code, _, err = cli("export", run, "--quantize", "int8", "--max-drop", "1")  # calibrated on the trained part
    assert code == 0 and f"on {len(test)} test images" in err, err
    # the same split for every run of the folder, whatever its --seed (a comparison's runs included)
    assert cli("train", "--data", photos, "--out", tmp_path / "other", *TINY, "--seed", "7")[0] == 0
    assert json.loads((tmp_path / "other" / "split.json").read_text())["digest"] == split["digest"]
    # and the audit of the split finds no pair across it (the planted copies are pairs within one side)
    code, out, _ = cli("audit", photos, "--run", run, "--json")
    findings = json.loads(out)["findings"]
    assert not [f for f in findings if f["kind"] == "leak"]
    assert [f for f in findings if f["kind"] == "duplicate" or "near-duplicate" in f["message"]]


def test_a_split_run_refuses_to_resume_when_held_out_images_are_gone(tmp_path, cli):
    import json

    photos = tmp_path / "photos"
    _flat_folder(photos, per_class=8, planted=0)
    run = tmp_path / "run"
    assert cli("train", "--data", photos, "--out", run, *TINY)[0] == 0
    gone = json.loads((run / "split.json").read_text())["test"][0]
    (photos / gone).unlink()
    code, _, err = cli("train", "--resume", run, "--epochs", "2")
    assert code == 1 and "held out for testing are gone" in err and "--data-changed ok" in err
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "split.json").unlink()  # a model that cannot say which images it never saw
    code, _, err = cli("eval", copy, "--data", photos)
    assert code == 1 and "records no split" in err and len(err.strip().splitlines()) == 1
    assert cli("train", "--resume", run, "--epochs", "2", "--data-changed", "ok")[0] == 0


# --- labels from a file (the Kaggle layout) ------------------------------------------------------------------------

def _kaggle_folder(root: Path, per_class: int = 10) -> list[tuple[str, str]]:
    """One folder of images named by id, no class folders; returns (id, class) rows."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    rows = []
    for c, colour in list(CLASSES.items())[:3]:
        for i in range(per_class):
            noise = rng.normal(0, 30, (24, 24, 3))
            Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(root / f"{c[0]}{i}.jpg")
            rows.append((f"{c[0]}{i}", c))
    return rows


def test_labels_from_a_csv_train_and_evaluate_with_each_kind_of_bad_row_reported_once(tmp_path, cli):
    import json

    images = tmp_path / "images"
    rows = _kaggle_folder(images)
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")
    bad = [("gone1", "cat"), ("gone2", "dog"), ("gone3", "cat"),  # no such file
           ("broken", "cat"),  # not an image
           ("c0", "dog"),  # the same image again
           ("c1", "")]  # empty label (its image is labelled on a later row)
    rows = rows[:1] + bad + rows[1:]  # row 1 is the header, as a spreadsheet numbers it
    csv = tmp_path / "labels.csv"
    csv.write_text("id,label\n" + "".join(f"{i},{c}\n" for i, c in rows))
    run = tmp_path / "run"
    code, _, err = cli("train", "--data", images, "--labels", csv, "--out", run, *TINY)
    assert code == 0, err
    lines = err.splitlines()
    for kind, count, named in [("name a file that is not there", 3, "row 4: gone2"),
                               ("name a file that is not a readable image", 1, "row 6: broken"),
                               ("repeat an image already labelled", 1, "row 7: c0"),
                               ("have an empty label", 1, "row 8: c1")]:
        hits = [line for line in lines if kind in line]
        assert len(hits) == 1 and f"{count} row(s) {kind}" in hits[0] and named in hits[0], (kind, err)
    assert "labels.csv assigns no image to test" in err and "held out as the test set" in err
    split = json.loads((run / "split.json").read_text())
    assert split["images"] == 30 and len(split["test"]) == 3 * 2 and split["labels"] == str(csv)
    # eval reads the labels from the run's config: the held-out images, scored by their CSV classes
    code, out, err = cli("eval", run, "--data", images, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["n"] == 6 and sorted(result["per_class"]) == ["cat", "dog", "fox"]


def test_a_labels_file_with_a_split_column_gives_the_splits_and_one_class_is_refused(tmp_path, cli):
    import json

    images = tmp_path / "images"
    rows = _kaggle_folder(images, per_class=8)
    split_of = {0: "test", 1: "val", 2: "valid"}  # valid is val
    tsv = tmp_path / "labels.tsv"
    tsv.write_text("image\tclass\tsplit\n" + "".join(
        f"{i}.jpg\t{c}\t{split_of.get(int(i[1:]), 'train')}\n" for i, c in rows) + "c5.jpg\tcat\tholdout\n")
    run = tmp_path / "run"
    code, _, err = cli("train", "--data", images, "--labels", tsv, "--out", run, *TINY)
    assert code == 0, err
    assert "1 row(s) give a split that is not train, val or test" in err and "c5.jpg 'holdout'" in err
    assert not (run / "split.json").exists()  # the file says which images are the test set
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last.get("val_acc") is not None, last
    code, out, err = cli("eval", run, "--data", images, "--json")
    assert code == 0 and json.loads(out)["n"] == 3, err
    code, out, err = cli("eval", run, "--data", images, "--split", "val", "--json")
    assert code == 0 and json.loads(out)["n"] == 6, err
    code, out, err = cli("audit", images, "--labels", tsv, "--json")  # the audit reads the file's splits too
    assert json.loads(out)["splits"] == {"train": 15, "val": 6, "test": 3}, err
    one = tmp_path / "one.csv"
    one.write_text("path,label\n" + "".join(f"{i}.jpg,cat\n" for i, _ in rows))
    code, _, err = cli("train", "--data", images, "--labels", one, "--out", tmp_path / "r1", *TINY)
    assert code == 1 and "every usable row has the label 'cat'" in err and len(err.strip().splitlines()) == 1, err


def test_a_first_row_taken_as_a_header_is_said(tmp_path, caplog):
    import logging

    from reslab.data.labels import read_labels

    images = tmp_path / "images"
    rows = _kaggle_folder(images, per_class=2)
    headerless = tmp_path / "plain.csv"
    headerless.write_text("".join(f"{i}.jpg,{c}\n" for i, c in rows))
    with caplog.at_level(logging.INFO, logger="reslab"):
        assert len(read_labels(images, headerless).paths) == 6  # no header: every row is an image
        assert "read as the header" not in caplog.text
        odd = tmp_path / "odd.csv"
        odd.write_text("gone.jpg,cat\n" + "".join(f"{i}.jpg,{c}\n" for i, c in rows))
        assert len(read_labels(images, odd).paths) == 6
    assert "its first row 'gone.jpg, cat' is read as the header" in caplog.text
