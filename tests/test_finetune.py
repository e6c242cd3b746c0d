"""Fine-tuning and photos: pretrained weights from torchvision (a state_dict placed in a temporary $TORCH_HOME, no
network), files and runs; new heads; frozen backbones; EMA; AdamW; photo defaults and the photo augmentation."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image, ImageFilter

import reslab
from reslab.config.schema import make_config
from reslab.data.augment import BatchTransform, pil_transform, store_size
from reslab.data.folder import fit_square
from reslab.models.checkpoint import load_checkpoint
from reslab.training.train import fit, param_groups, setup

from helpers import make_folder

SMALL = ["--arch", "resnet18", "--epochs", "1", "--batch-size", "8", "--image-size", "64", "--precision", "fp32",
         "--threads", "1", "--lr", "0.01"]


@pytest.fixture
def photos(tmp_path) -> Path:
    return make_folder(tmp_path / "photos", per_class=8, size=96, ext="jpg")


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def _torchvision_file(torch_home: Path) -> tuple[Path, dict]:
    """torchvision's resnet18 weights where its weights API looks for them (built here: nothing is downloaded)."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    path = torch_home / "hub" / "checkpoints" / Path(weights.url).name
    path.parent.mkdir(parents=True)
    torch.manual_seed(1)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    torch.save(state, path)
    return path, state


def test_torchvision_weights_load_with_a_new_head_and_freeze_keeps_the_backbone(photos, tmp_path, torch_home, cli):
    _, state = _torchvision_file(torch_home)
    run = tmp_path / "probe"
    code, _, err = cli("train", "--data", photos, "--out", run, *SMALL, "--pretrained", "torchvision", "--freeze")
    assert code == 0, err
    total = len(reslab.create_model("resnet18", num_classes=3).state_dict())
    assert f"loaded {total - 2} of {total} tensors from torchvision resnet18 IMAGENET1K_V1; new head for 3 " in err
    model, meta = reslab.load_model(run)
    trained = model.state_dict()
    # A linear probe: every backbone tensor, BatchNorm statistics included, is exactly the pretrained one.
    assert all(torch.equal(trained[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert trained["fc.weight"].shape == (3, 512)
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    assert meta["pretrained"] == "torchvision resnet18 IMAGENET1K_V1"
    assert yaml.safe_load((run / "config.yaml").read_text())["pretrained"] == "torchvision"


def test_torchvision_weights_offline_say_which_file_to_put_where(photos, tmp_path, torch_home, cli, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    code, _, err = cli("train", "--data", photos, "--out", tmp_path / "r", *SMALL, "--pretrained", "torchvision")
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    expected = torch_home / "hub" / "checkpoints" / Path(weights.url).name
    assert code == 1 and weights.url in err and str(expected) in err
    assert err.strip().splitlines()[-1].startswith("reslab: error: could not download") and "Traceback" not in err


@pytest.mark.parametrize("layout", ["lightning", "ddp", "safetensors"])
def test_weights_files_of_other_tools_load(photos, tmp_path, layout, cli):
    torch.manual_seed(2)
    state = torchvision.models.resnet18(num_classes=7).state_dict()
    if layout == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        prefix = "model." if layout == "lightning" else "module."
        wrapped = {prefix + k: v for k, v in state.items()}
        path = tmp_path / "w.ckpt"
        torch.save({"state_dict": wrapped, "epoch": 3} if layout == "lightning" else wrapped, path)
    code, _, err = cli("train", "--data", photos, "--out", tmp_path / "r", *SMALL, "--pretrained", path, "--freeze")
    assert code == 0, err
    assert "new head for 3 classes" in err  # 7 outputs in the file, 3 classes here
    trained, _ = reslab.load_model(tmp_path / "r")
    assert torch.equal(trained.state_dict()["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])


def test_a_reslab_run_keeps_its_classifier_for_the_same_classes(photos, tmp_path, cli):
    first = tmp_path / "first"
    assert cli("train", "--data", photos, "--out", first, *SMALL)[0] == 0
    code, _, err = cli("train", "--data", photos, "--out", tmp_path / "second", *SMALL, "--pretrained", first,
                       "--epochs", "1")
    assert code == 0, err
    assert "classifier kept" in err
    meta = reslab.load_model(first)[1]
    assert reslab.load_model(tmp_path / "second")[1]["mean"] == meta["mean"]  # its normalisation travels along


def test_weights_that_do_not_fit_name_the_first_tensors(photos, tmp_path, cli):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    code, _, err = cli("train", "--data", photos, "--out", tmp_path / "a", *SMALL, "--pretrained", path,
                       "--stem", "cifar")
    assert code == 1 and "shapes differ: conv1.weight (64, 3, 7, 7) vs (64, 3, 3, 3)" in err
    torch.save(torchvision.models.resnet50().state_dict(), path)
    code, _, err = cli("train", "--data", photos, "--out", tmp_path / "b", *SMALL, "--pretrained", path)
    assert code == 1 and "does not fit" in err and "layer1.0.conv1.weight" in err


def test_photo_defaults_and_cifar_sized_data_unchanged(tmp_path, photos):
    run = setup(make_config(arch="resnet18", data=str(photos), out=str(tmp_path / "p"), epochs=1, batch_size=8))
    assert (run.cfg.augment, run.cfg.image_size) == ("photo", 224)
    assert run.data.train.images.shape[1:] == (256, 256, 3)  # the square the crops come from
    assert run.meta["augment"] == "photo" and run.meta["input_size"] == 224
    small = make_folder(tmp_path / "small", per_class=4)  # 32 px: CIFAR-sized
    for arch in ("resnet20", "resnet18"):
        run = setup(make_config(arch=arch, data=str(small), out=str(tmp_path / arch), epochs=1, batch_size=8))
        assert (run.cfg.augment, run.cfg.image_size) == ("paper", 32)
    run = setup(make_config(arch="resnet20", data=str(photos), out=str(tmp_path / "r20"), epochs=1, batch_size=8))
    assert (run.cfg.augment, run.cfg.image_size) == ("paper", 32)  # a CIFAR net keeps its size, with a note


def test_photo_evaluation_is_torchvisions_resize_and_centre_crop():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (180, 300, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(3))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    stored = np.array(fit_square(im, store_size("photo", 224)))
    ours = BatchTransform("photo", False, 224, mean, std)(torch.from_numpy(stored)[None])[0]
    theirs = pil_transform("photo", False, 224, mean, std)(im)
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert (ours - theirs).abs().mean() < 0.02  # the same pixels, up to the two resizers' rounding


def test_random_resized_crops_differ_per_image_and_stay_inside():
    x = torch.arange(256, dtype=torch.float32).repeat(256, 1)[None, :, :, None].expand(4, 256, 256, 3)
    x = x.to(torch.uint8).contiguous()
    t = BatchTransform("photo", True, 64, (0.0,) * 3, (1 / 255,) * 3)  # output in pixel values
    out = t(x, torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 64, 64)
    assert out.min() >= 0 and out.max() <= 255
    assert len({round(float(o.mean()), 3) for o in out}) == 4  # four different crops


def test_ema_is_what_is_saved_and_resumes_exactly(photos, tmp_path):
    kw = dict(arch="resnet20", data=str(photos), batch_size=8, lr=0.002, precision="fp32", threads=1, ema=0.9,
              schedule="constant", optimizer="adamw", clip_grad=1.0, head_lr_scale=10.0)
    full = setup(make_config(out=str(tmp_path / "full"), epochs=2, **kw))
    assert isinstance(full.optimizer, torch.optim.AdamW)
    assert {g["lr_scale"] for g in full.optimizer.param_groups} == {1.0, 10.0}
    fit(full)
    ema = next(h for h in full.hooks if h.name == "ema")
    saved, _ = reslab.load_model(tmp_path / "full")
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in ema.module.state_dict().items())
    live = reslab.train(out=str(tmp_path / "half"), epochs=1, **kw)
    assert live.epoch == 1
    reslab.train(resume=str(tmp_path / "half"), epochs=2)
    resumed, _ = reslab.load_model(tmp_path / "half")
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in saved.state_dict().items())


def test_small_and_imbalanced_folders(tmp_path, cli):
    folder = make_folder(tmp_path / "d", per_class=4)
    for i in range(4, 16):  # red gets 16 training images, blue and green 4
        Image.open(folder / "train" / "red" / "0000.png").save(folder / "train" / "red" / f"x{i}.png")
    code, _, err = cli("train", "--data", folder, "--out", tmp_path / "r", "--arch", "resnet20", "--epochs", "1",
                       "--batch-size", "128", "--precision", "fp32")
    assert code == 0, err
    assert "training on 24 images of 3 classes (red 16, blue 4, green 4)" in err
    assert "imbalanced" in err and "--balance loss" in err
    assert "--batch-size 128 is more than the 24 training images: using 24" in err
    code, _, err = cli("train", "--data", folder, "--out", tmp_path / "b", "--arch", "resnet20", "--epochs", "1",
                       "--batch-size", "8", "--precision", "fp32", "--balance", "loss")
    assert code == 0 and "imbalanced" not in err
    assert load_checkpoint(tmp_path / "b" / "last.pt")["config"]["balance"] == "loss"


def test_head_lr_scale_groups():
    m = reslab.create_model("resnet18", num_classes=4)
    groups = param_groups(m, 1e-4, False, head_lr_scale=10)
    head = {id(p) for p in m.fc.parameters()}
    assert all(g["lr_scale"] == 10 for g in groups if {id(p) for p in g["params"]} & head)
    assert sum(len(g["params"]) for g in groups if g["lr_scale"] == 10) == 2


def test_mixup_cutmix_trivialaugment_and_erasing(photos, tmp_path):
    """The photo recipes' extras: each a pure function of its seed, so a run with all of them resumes exactly."""
    from reslab.data.extras import mix_batch

    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()
    y = torch.tensor([0, 1, 2, 3])
    mixed, target = mix_batch(x, y, 4, mixup=0.4, cutmix=0.0, generator=torch.Generator().manual_seed(0))
    lam = target[0, 0].item()
    assert torch.allclose(target.sum(1), torch.ones(4)) and 0 < lam < 1 and target[0, 3] == pytest.approx(1 - lam)
    assert torch.allclose(mixed[0], lam * x[0] + (1 - lam) * x[3])
    cut, target = mix_batch(x, y, 4, mixup=0.0, cutmix=1.0, generator=torch.Generator().manual_seed(1))
    own = (cut[0] == 0).float().mean().item()  # image 0 is all zeros; pasted pixels come from image 3
    assert target[0, 0].item() == pytest.approx(own) and target[0, 3].item() == pytest.approx(1 - own)

    kw = dict(arch="resnet20", data=str(photos), batch_size=8, lr=0.002, precision="fp32", threads=1,
              schedule="constant", augment="photo", image_size=32, auto_augment="trivial", random_erasing=0.5,
              mixup=0.2, cutmix=1.0)
    full = reslab.train(out=str(tmp_path / "full"), epochs=2, **kw)
    reslab.train(out=str(tmp_path / "half"), epochs=1, **kw)
    resumed = reslab.train(resume=str(tmp_path / "half"), epochs=2)
    assert resumed.train_loss == full.train_loss
    a, b = (reslab.load_model(tmp_path / r)[0].state_dict() for r in ("full", "half"))
    assert all(torch.equal(a[k], b[k]) for k in a)
