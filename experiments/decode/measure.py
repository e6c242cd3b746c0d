"""Cold decode of a folder into the in-memory array at a given stored size, with an empty cache folder."""
import os
import sys
import tempfile
import time

os.environ["RESLAB_CACHE"] = tempfile.mkdtemp()
from reslab.data.datasets import load_split

root, split, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.perf_counter()
s = load_split(root, split, store_size=size)
dt = time.perf_counter() - t
print(f"{root} {split} store {size}: {len(s)} images in {dt:.1f} s = {len(s) / dt:.0f} img/s")
