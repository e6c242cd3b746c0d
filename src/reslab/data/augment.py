"""Augmentation presets, in two forms that draw from the same distributions:

- ``BatchTransform``: whole uint8 batches on the training device, with per-sample randomness (the fast path);
- ``pil_transform``: torchvision transforms per PIL image in a DataLoader (the seed's way, kept for folders too
  large for memory and as the baseline of ``reslab bench``).

Presets:
- ``seed``: the tutorial's Resize(256) -> RandomHorizontalFlip -> RandomCrop(64) -> ColorJitter(brightness 0.5,
  contrast 0.5, hue 0.3) -> Normalize(0.5, 0.5). Evaluation uses Resize(256) -> CenterCrop(64); the seed evaluated
  with its random *training* transforms, which makes test accuracy itself random. Note that on 32x32 CIFAR images
  a 64-pixel crop of the 256-pixel upscale shows one sixteenth of the picture: faithful to the seed, not a good idea.
- ``paper``: He et al. section 4.2: 4 zero pixels of padding, a random 32x32 crop, a random horizontal flip, and
  per-channel mean/std normalisation (statistics of the training images, computed, not copied from elsewhere).
- ``fast``: the fast trainers' translation by up to 2 pixels (reflection padding) and a random horizontal flip.
- ``photo``: torchvision's ImageNet recipe. Images are kept as the centre square of the shorter side resized to
  input/0.875 (256 px for 224), which is exactly what Resize(256) + CenterCrop(224) evaluates; training takes a random
  resized crop (area 8-100 %, aspect 3/4-4/3) of that square and a random flip. Deviation: the crop is drawn from the
  stored square, not the whole picture, so the far ends of a wide photo are never seen (memory: one square per image).
- ``none``: normalisation only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import extras

SEED_RESIZE = 256  # the seed's Resize(256); its crop is the input size (64 in its preset)
PHOTO_CROP_RATIO = 0.875  # evaluate the centre 224 of 256 (torchvision's ImageNet protocol)
PHOTO_SCALE, PHOTO_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # RandomResizedCrop's defaults
SEED_JITTER = dict(brightness=0.5, contrast=0.5, hue=0.3)
PAPER_PAD = 4
FAST_PAD = 2


def store_size(augment: str, input_size: int) -> int | None:
    """Size images are kept at in memory: native for ``seed`` (its resize does the rest), input/0.875 for ``photo``
    (room for the crops), else the input size."""
    if augment == "seed":
        return None
    return round(input_size / PHOTO_CROP_RATIO) if augment == "photo" else input_size


def channel_stats(histogram: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation in [0, 1] (4 decimals) from per-channel uint8 value counts (3, 256)."""
    counts = np.asarray(histogram, dtype=np.float64)
    values = np.arange(256, dtype=np.float64) / 255
    n = counts.sum(1)
    mean = counts @ values / n
    std = np.sqrt(np.maximum(counts @ values**2 / n - mean**2, 1e-12))
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def crop_flip(x: Tensor, size: int, pad: int, dy: Tensor, dx: Tensor, flip: Tensor, reflect: bool = False) -> Tensor:
    """Per-sample crops of ``size`` at offsets (dy, dx) of the uint8 NHWC batch padded by ``pad`` pixels (zeros, or
    a reflection of the border with ``reflect``), mirrored where ``flip``."""
    b, h, w = x.shape[:3]
    ar = torch.arange(size, device=x.device)
    rows = dy[:, None] + ar
    cols = dx[:, None] + torch.where(flip[:, None], size - 1 - ar, ar)  # a flip is a reversed column index
    if reflect:  # index the original image: -1 -> 1, h -> h - 2 (numpy/PyTorch "reflect")
        rows, cols = rows - pad, cols - pad
        rows = torch.where(rows < 0, -rows, torch.where(rows >= h, 2 * (h - 1) - rows, rows))
        cols = torch.where(cols < 0, -cols, torch.where(cols >= w, 2 * (w - 1) - cols, cols))
        xp = x
    else:
        xp = F.pad(x, (0, 0, pad, pad, pad, pad))  # pads (C, W, H) of NHWC
    return xp[torch.arange(b, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]


def resize_crop(x: Tensor, resize: int, crop: int, top: Tensor, left: Tensor, flip: Tensor) -> Tensor:
    """Bilinear Resize(``resize``) followed by a ``crop`` x ``crop`` crop at (top, left), per sample, in one pass.

    Sampling the crop's pixels straight from the small image avoids building the 256x256 upscale. With
    ``align_corners=False`` the normalised coordinate of pixel u of the resized image is (u + 0.5) / resize * 2 - 1,
    whatever the input size, and "border" padding reproduces the resize's edge clamping.
    """
    b = x.shape[0]
    ar = torch.arange(crop, device=x.device, dtype=x.dtype)
    ys = ((top[:, None].to(x.dtype) + ar + 0.5) / resize) * 2 - 1  # (B, crop)
    xs = ((left[:, None].to(x.dtype) + ar + 0.5) / resize) * 2 - 1
    xs = torch.where(flip[:, None], xs.flip(1), xs)
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)  # (B, crop, crop, 2) as (x, y)
    return F.grid_sample(x, grid.view(b, crop, crop, 2), mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop(x: Tensor, size: int, generator: torch.Generator | None, flip: Tensor) -> Tensor:
    """torchvision's RandomResizedCrop (10 tries, then the whole image) + flip, per sample, on a float NCHW batch.

    Each crop box is mapped onto a ``size`` x ``size`` grid and sampled bilinearly in one ``grid_sample`` call.
    """
    b, _, h, w = x.shape
    tries = 10
    area = h * w * torch.empty(b, tries).uniform_(*PHOTO_SCALE, generator=generator)
    log_ratio = torch.empty(b, tries).uniform_(math.log(PHOTO_RATIO[0]), math.log(PHOTO_RATIO[1]),
                                               generator=generator)
    cw, ch = (area * log_ratio.exp()).sqrt().round(), (area / log_ratio.exp()).sqrt().round()
    ok = (cw <= w) & (ch <= h) & (cw > 0) & (ch > 0)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1))
    pick = first.clamp_min(0)[:, None]
    cw = torch.where(first >= 0, cw.gather(1, pick).squeeze(1), torch.tensor(float(w)))
    ch = torch.where(first >= 0, ch.gather(1, pick).squeeze(1), torch.tensor(float(h)))
    u = torch.rand(2, b, generator=generator)
    x0, y0 = ((w - cw + 1) * u[0]).floor(), ((h - ch + 1) * u[1]).floor()
    # Output pixel centres at (-1, 1) normalised coordinates -> the crop box in the input's normalised coordinates.
    sx, sy = cw / w, ch / h
    tx, ty = (2 * x0 + cw) / w - 1, (2 * y0 + ch) / h - 1
    sx = torch.where(flip.cpu(), -sx, sx)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
    grid = F.affine_grid(theta.to(x.device, x.dtype), [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _grayscale(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of RGB images in [0, 1] by ``shift`` turns, per sample (as torchvision's adjust_hue)."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(delta > 0, h / 6 % 1, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    h = (h + shift.view(-1, 1, 1)) % 1
    # HSV -> RGB: channel n takes v - v*s*clamp(min(k, 4-k), 0, 1) with k = (n + 6h) mod 6, n = 5, 3, 1.
    out = []
    for n in (5, 3, 1):
        k = (n + 6 * h) % 6
        out.append(maxc - maxc * s * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(out, 1)


def color_jitter(x: Tensor, factors: Tensor, order: list[int]) -> Tensor:
    """Brightness, contrast and hue jitter of float RGB images in [0, 1] with per-sample ``factors`` (B, 3)."""
    for op in order:
        f = factors[:, op].view(-1, 1, 1, 1)
        if op == 0:
            x = (x * f).clamp(0, 1)
        elif op == 1:
            mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
            x = (f * x + (1 - f) * mean).clamp(0, 1)
        else:
            x = _shift_hue(x, factors[:, 2])
    return x


@dataclass
class BatchTransform:
    """uint8 (B, H, W, 3) batch -> normalised float (B, 3, S, S) on the batch's device.

    Randomness comes from ``generator`` (a CPU generator, so CPU and GPU runs draw the same augmentations).
    """

    augment: str
    train: bool
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    auto_augment: str = "none"  # trivial or rand, in training (see extras.py)
    erasing: float = 0.0  # probability of random erasing, in training

    def __call__(self, x: Tensor, generator: torch.Generator | None = None, flip: Tensor | None = None) -> Tensor:
        """``flip`` (bool per image) replaces the random flips of the paper and fast crops (alternating flips)."""
        b, dev = x.shape[0], x.device
        rand = lambda *shape: torch.rand(*shape, generator=generator).to(dev)
        if self.train and self.auto_augment != "none":  # on the stored uint8 images, before the crop
            x = extras.auto_augment(x, self.auto_augment, generator)
        if self.augment in ("paper", "fast") and self.train:
            pad = PAPER_PAD if self.augment == "paper" else FAST_PAD
            dy, dx = (torch.randint(0, 2 * pad + 1, (2, b), generator=generator)).to(dev)
            random_flip = rand(b) < 0.5  # drawn either way, so the draws after it do not depend on ``flip``
            x = crop_flip(x, self.input_size, pad, dy, dx, random_flip if flip is None else flip.to(dev),
                          reflect=self.augment == "fast")
        x = x.permute(0, 3, 1, 2).float().div_(255)  # NCHW view with channels-last strides
        if self.augment == "seed":
            crop, span = self.input_size, SEED_RESIZE - self.input_size
            if self.train:
                top, left = torch.randint(0, span + 1, (2, b), generator=generator).to(dev)
                flip = rand(b) < 0.5
            else:  # deterministic counterpart: the centre crop, no flip, no jitter
                top = left = torch.full((b,), span // 2, device=dev)
                flip = torch.zeros(b, dtype=torch.bool, device=dev)
            x = resize_crop(x, SEED_RESIZE, crop, top, left, flip)
            if self.train:
                lo = torch.tensor([1 - SEED_JITTER["brightness"], 1 - SEED_JITTER["contrast"], -SEED_JITTER["hue"]])
                hi = torch.tensor([1 + SEED_JITTER["brightness"], 1 + SEED_JITTER["contrast"], SEED_JITTER["hue"]])
                factors = (lo + (hi - lo) * torch.rand(b, 3, generator=generator)).to(dev)
                # torchvision draws the order per image; one order per batch keeps the work batched.
                order = torch.randperm(3, generator=generator).tolist()
                x = color_jitter(x, factors, order)
        elif self.augment == "photo":
            if self.train:
                x = random_resized_crop(x, self.input_size, generator, rand(b) < 0.5)
            else:  # the centre crop of the stored square
                top = (x.shape[-2] - self.input_size) // 2
                left = (x.shape[-1] - self.input_size) // 2
                x = x[..., top:top + self.input_size, left:left + self.input_size]
        if self.augment != "seed" and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True)
        mean = torch.tensor(self.mean, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=dev).view(1, 3, 1, 1)
        x = (x - mean) / std
        return extras.random_erasing(x, self.erasing, generator) if self.train and self.erasing else x


def pil_transform(augment: str, train: bool, input_size: int, mean, std, auto_augment: str = "none",
                  erasing: float = 0.0):
    """The same preset as per-image torchvision transforms on PIL images (the seed's pipeline)."""
    import torchvision.transforms as T

    if augment == "seed":
        if train:
            ops = [T.Resize(SEED_RESIZE), T.RandomHorizontalFlip(), T.RandomCrop(input_size),
                   T.ColorJitter(**SEED_JITTER)]
        else:
            ops = [T.Resize(SEED_RESIZE), T.CenterCrop(input_size)]
    elif augment == "photo":
        keep = store_size(augment, input_size)
        ops = [T.Resize(keep), T.CenterCrop(keep)]
        ops += [T.RandomResizedCrop(input_size, PHOTO_SCALE, PHOTO_RATIO), T.RandomHorizontalFlip()] if train else \
            [T.CenterCrop(input_size)]
    else:
        ops = [T.Resize(input_size), T.CenterCrop(input_size)]
        if augment == "paper" and train:
            ops += [T.RandomCrop(input_size, padding=PAPER_PAD), T.RandomHorizontalFlip()]
        elif augment == "fast" and train:
            ops += [T.RandomCrop(input_size, padding=FAST_PAD, padding_mode="reflect"), T.RandomHorizontalFlip()]
    if train and auto_augment != "none":
        ops.insert(0, T.TrivialAugmentWide() if auto_augment == "trivial" else T.RandAugment())
    post = [T.RandomErasing(p=erasing, value=0)] if train and erasing else []
    return T.Compose([*ops, T.ToTensor(), T.Normalize(mean, std), *post])
