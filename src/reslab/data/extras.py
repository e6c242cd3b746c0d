"""The optional training augmentations of the photo recipes (timm, torchvision's reference scripts): TrivialAugment or
RandAugment, random erasing, MixUp and CutMix.

Each is a pure function of a seeded generator, like the rest of the batch augmentation, so a resumed run draws the
same augmentations without saving any random state. The per-image operations are torchvision.transforms.v2's own,
run under a random state forked from that generator.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _seed(generator: torch.Generator | None) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def _per_image(op, images: Tensor, generator: torch.Generator | None) -> Tensor:
    """Apply the torchvision transform ``op`` to each image of an NCHW batch, under a forked, seeded random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(generator))
        return torch.stack([op(img) for img in images])


def auto_augment(x: Tensor, policy: str, generator: torch.Generator | None) -> Tensor:
    """TrivialAugmentWide (``trivial``) or RandAugment (``rand``, 2 ops of magnitude 9) on uint8 NHWC images."""
    from torchvision.transforms import v2

    op = v2.TrivialAugmentWide() if policy == "trivial" else v2.RandAugment()
    return _per_image(op, x.permute(0, 3, 1, 2), generator).permute(0, 2, 3, 1)


def random_erasing(x: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    """torchvision's RandomErasing with probability ``p`` on normalised NCHW images (erased to 0, the mean)."""
    from torchvision.transforms import v2

    return _per_image(v2.RandomErasing(p=p, value=0), x, generator)


def mix_batch(x: Tensor, y: Tensor, num_classes: int, mixup: float, cutmix: float,
              generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """MixUp (Zhang et al. 2018) or CutMix (Yun et al. 2019) of each image with the batch's reverse order.

    With both alphas above zero, one of the two is chosen per batch with equal odds (as timm does). Returns the mixed
    images and soft targets (B, num_classes) whose weights follow the mixed proportions.
    """
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand(1, generator=generator).item() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(np.random.default_rng(_seed(generator)).beta(alpha, alpha))
    other = x.flip(0)
    if use_cutmix:
        h, w = x.shape[-2:]
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = (int(torch.randint(0, n, (1,), generator=generator)) for n in (h, w))
        y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the share of the image that is still its own
    else:
        x = lam * x + (1 - lam) * other
    onehot = F.one_hot(y, num_classes).to(x.dtype)
    return x, lam * onehot + (1 - lam) * onehot.flip(0)
