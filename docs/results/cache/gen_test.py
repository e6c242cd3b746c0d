"""A test split for the 500-photo folder of docs/results/decode/gen.py: 5 classes x 20 CIFAR-10 test images,
upscaled (bicubic) to 4000x3000 JPEGs, quality 90."""
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

SRC = Path("/work/shared/data/cifar10-jpeg/test")
OUT = Path("/tmp/big/photos/test")


def one(args):
    c, f = args
    d = OUT / c
    d.mkdir(parents=True, exist_ok=True)
    Image.open(f).convert("RGB").resize((4000, 3000), Image.BICUBIC).save(d / (f.stem + ".jpg"), quality=90)


jobs = [(c, f) for c in ("cat", "dog", "ship", "truck", "frog") for f in sorted((SRC / c).iterdir())[:20]]
with ProcessPoolExecutor(2) as pool:
    list(pool.map(one, jobs, chunksize=10))
print("ok", len(jobs))
