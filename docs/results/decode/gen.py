"""500 phone-photo-sized JPEGs (4000x3000, quality 90): CIFAR-10 JPEG images upscaled (bicubic), 5 classes x 100."""
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

SRC = Path("/work/shared/data/cifar10-jpeg/train")
OUT = Path("/tmp/big/photos/train")

def one(args):
    c, f = args
    d = OUT / c
    d.mkdir(parents=True, exist_ok=True)
    Image.open(f).convert("RGB").resize((4000, 3000), Image.BICUBIC).save(d / (f.stem + ".jpg"), quality=90)

jobs = [(c, f) for c in ("cat", "dog", "ship", "truck", "frog") for f in sorted((SRC / c).iterdir())[:100]]
with ProcessPoolExecutor(2) as pool:
    list(pool.map(one, jobs, chunksize=10))
print("ok", len(jobs))
