"""Exact and near-duplicate images: difference hashes compared pairwise, confirmed by the pixels. What ``reslab
audit`` reports, and what a split of one folder keeps on one side (a photo re-saved, resized or shot in a burst on
both sides of a split makes the test accuracy lie)."""

from __future__ import annotations

import numpy as np
import torch

from ..core.progress import CountProgress

HASH_BITS = 6  # dHash bits two near-duplicates may differ in
PIXEL_MAD = 0.08  # and their mean absolute difference at 32x32 (copies re-encoded as JPEG q95, resized or 3 % brighter:
# 0.00-0.06 on the noisy test images; distinct images of one colour class there: ~0.11)
CHUNK = 512  # rows of the pairwise hash comparison at a time (bounded memory: CHUNK x N bytes)


def dhash(images: torch.Tensor) -> np.ndarray:
    """64-bit difference hashes of uint8 images (N, H, W, 3): 9x8 grayscale, each pixel brighter than its right
    neighbour or not (Krawetz's dHash)."""
    out = []
    for start in range(0, len(images), 4096):  # bounded memory: 4096 float images at a time
        gray = images[start:start + 4096].float().mul(torch.tensor([0.299, 0.587, 0.114])).sum(-1)[:, None]
        small = torch.nn.functional.interpolate(gray, size=(8, 9), mode="area")[:, 0]
        bits = (small[:, :, 1:] > small[:, :, :-1]).reshape(len(gray), 64).numpy()
        out.append(np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64))
    return np.concatenate(out) if out else np.zeros(0, np.uint64)


def near_pairs(a: np.ndarray, b: np.ndarray, same: bool) -> list[tuple[int, int]]:
    """Index pairs (i in a, j in b) whose hashes differ in at most HASH_BITS bits (i < j when ``same``)."""
    found = []
    bar = CountProgress(len(a), "comparing image hashes")
    for start in range(0, len(a), CHUNK):
        block = a[start:start + CHUNK, None] ^ b[None, :]
        dist = np.bitwise_count(block)
        i, j = np.nonzero(dist <= HASH_BITS)
        i += start
        keep = i < j if same else np.ones(len(i), bool)
        found += list(zip(i[keep].tolist(), j[keep].tolist()))
        bar.update(min(len(a), start + CHUNK))
    bar.done()
    return found


def duplicate_groups(images: torch.Tensor) -> list[list[int]]:
    """Groups (two or more) of exact or near-duplicate images among uint8 images (N, H, W, 3) at 32x32: pairs
    whose hashes are within ``HASH_BITS`` and whose pixels within ``PIXEL_MAD``, joined transitively."""
    hashes = dhash(images)
    pairs = near_pairs(hashes, hashes, same=True)
    if pairs:
        i, j = (torch.tensor(x) for x in zip(*pairs))
        mad = (images[i].float() - images[j].float()).abs().mean((1, 2, 3)) / 255
        pairs = [p for p, d in zip(pairs, mad.tolist()) if d <= PIXEL_MAD]
    parent = list(range(len(images)))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for a, b in pairs:
        parent[root(a)] = root(b)
    groups: dict[int, list[int]] = {}
    for k in {x for p in pairs for x in p}:
        groups.setdefault(root(k), []).append(k)
    return sorted(sorted(g) for g in groups.values())
