"""Measurement data for the photo issue, from the CIFAR-10 JPEG copy (nothing is copied into the project).

pre5/: the 5 classes airplane, automobile, bird, cat, deer (symlinks to the CIFAR-10 folders) for pretraining.
ft5/:  the other 5 classes, 100 training and 100 test images each, upscaled to photo-like sizes (width 256-320,
       height 192-240, bicubic) and saved as JPEG quality 90: a small 'photo folder' of classes never pretrained on.
"""
import random
from pathlib import Path

from PIL import Image

src = Path("/work/shared/data/cifar10-jpeg")
pre, ft = Path("/tmp/photo/pre5"), Path("/tmp/photo/ft5")
for split in ("train", "test"):
    for c in ("airplane", "automobile", "bird", "cat", "deer"):
        (pre / split).mkdir(parents=True, exist_ok=True)
        if not (pre / split / c).exists():
            (pre / split / c).symlink_to(src / split / c)
rng = random.Random(0)
for split in ("train", "test"):
    for c in ("dog", "frog", "horse", "ship", "truck"):
        d = ft / split / c
        d.mkdir(parents=True, exist_ok=True)
        files = sorted((src / split / c).iterdir())[:100]
        for f in files:
            w, h = rng.randint(256, 320), rng.randint(192, 240)
            Image.open(f).convert("RGB").resize((w, h), Image.BICUBIC).save(d / (f.stem + ".jpg"), quality=90)
print("ok")
