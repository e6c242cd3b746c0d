"""Phone-photo-sized JPEGs (4000x3000, quality 90): CIFAR-10 JPEG images upscaled (bicubic), 5 classes.

Usage: python gen.py [SPLIT [PER_CLASS]]  (default: train 100 -> /tmp/big/photos/train, 500 images;
the cache measurements add `test 20` from CIFAR-10's test images).
"""
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

SPLIT = sys.argv[1] if len(sys.argv) > 1 else "train"
PER_CLASS = int(sys.argv[2]) if len(sys.argv) > 2 else 100
SRC = Path("/work/shared/data/cifar10-jpeg") / SPLIT
OUT = Path("/tmp/big/photos") / SPLIT


def one(args):
    c, f = args
    d = OUT / c
    d.mkdir(parents=True, exist_ok=True)
    Image.open(f).convert("RGB").resize((4000, 3000), Image.BICUBIC).save(d / (f.stem + ".jpg"), quality=90)


if __name__ == "__main__":
    jobs = [(c, f) for c in ("cat", "dog", "ship", "truck", "frog") for f in sorted((SRC / c).iterdir())[:PER_CLASS]]
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(one, jobs, chunksize=10))
    print("ok", len(jobs))
