"""Residual networks of He et al. 2015, "Deep Residual Learning for Image Recognition" (arXiv:1512.03385).

One ``ResNet`` class covers every variant: the ImageNet nets (section 3.4, Table 1), the CIFAR-10 nets
(section 4.2) and their *plain* twins (``residual=False``: the same layers without shortcuts). Parameter names
follow torchvision (``conv1, bn1, layer1..layer4, fc, downsample``) so weights move between the two unchanged.

Deviations from the paper, each on purpose:
- Bottleneck puts the stride on the 3x3 conv (torchvision's "ResNet V1.5"), not on the first 1x1 conv.
- ``zero_init_residual`` (off by default) starts each residual branch at zero (Goyal et al. 2017).

The seed tutorial's bugs are not reproduced: every block owns two distinct conv+BN pairs (the seed applied one
conv and one BatchNorm twice), the projection shortcut has its BatchNorm, and the seed's network (``stem="seed"``)
simply has no max-pool instead of declaring one and never calling it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.errors import ModelError
from ._registry import register_model
from .layers import get_stages, he_init, set_stages

Stem = Literal["imagenet", "cifar", "seed"]
Shortcut = Literal["A", "B", "C"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding; no bias because a BatchNorm follows."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution; no bias because a BatchNorm follows."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class ShortcutA(nn.Module):
    """Option A of section 3.3: a parameter-free shortcut that subsamples by ``stride`` and zero-pads channels."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.extra, self.stride = out_planes - in_planes, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))  # (W, H, C) pads: new channels are zeros


def make_shortcut(kind: Shortcut, in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    """The shortcut of one block, or None for the identity.

    A: identity, or ``ShortcutA`` where the shape changes. B: identity, or 1x1 conv + BN projection where the shape
    changes (the seed's down-sampling block, with the BatchNorm it forgot). C: projection on every block.
    """
    changes = stride != 1 or in_planes != out_planes
    if kind == "A":
        return ShortcutA(in_planes, out_planes, stride) if changes else None
    if kind == "B" and not changes:
        return None
    if kind not in ("B", "C"):
        raise ModelError(f"shortcut must be 'A', 'B' or 'C', got {kind!r}")
    return nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers; the shortcut is added before the last ReLU (Fig. 2)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 residual: bool = True) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (Fig. 5 right), used by ResNet-50/101/152."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 residual: bool = True) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)  # stride here: torchvision's V1.5 placement
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class ResNet(nn.Module):
    """A residual (or, with ``residual=False``, plain) network.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18 or ``(3, 3, 3)`` for ResNet-20.
        widths: channels of each stage (before ``block.expansion``); the stem has ``widths[0]`` channels.
        num_classes: outputs of the final fully-connected layer.
        stem: ``"imagenet"`` 7x7/2 conv + 3x3/2 max-pool; ``"cifar"`` 3x3/1 conv; ``"seed"`` 7x7/2 conv, no pool.
        shortcut: option ``"A"``, ``"B"`` or ``"C"`` of section 3.3 (ignored when ``residual=False``).
        residual: False builds the paper's plain counterpart: identical layers, no shortcuts.
        zero_init_residual: start the last BN of every branch at zero, so each block starts as the identity
            (Goyal et al. 2017). Residual nets only: the same flag leaves a plain net's initialisation unchanged.
        in_channels: input image channels.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 widths: Sequence[int] = (64, 128, 256, 512), num_classes: int = 1000, stem: Stem = "imagenet",
                 shortcut: Shortcut = "B", residual: bool = True, zero_init_residual: bool = False,
                 in_channels: int = 3) -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise ModelError(f"layers {tuple(layers)} and widths {tuple(widths)} must have the same length")
        if stem not in ("imagenet", "cifar", "seed"):
            raise ModelError(f"stem must be 'imagenet', 'cifar' or 'seed', got {stem!r}")
        self.inplanes = widths[0]
        self.shortcut, self.residual = shortcut, residual
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        # The first stage keeps the resolution; every later one halves it in its first block (section 3.3).
        set_stages(self, [self._make_layer(block, width, n, stride=1 if i == 0 else 2)
                          for i, (n, width) in enumerate(zip(layers, widths))])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = widths[-1] * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes)
        self._init_weights(zero_init_residual)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out_planes = planes * block.expansion
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            down = make_shortcut(self.shortcut, self.inplanes, out_planes, s) if self.residual else None
            layers.append(block(self.inplanes, planes, s, down, residual=self.residual))
            self.inplanes = out_planes
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        he_init(self)
        if zero_init_residual and self.residual:  # a plain net has no branch to start at zero: nothing changes
            for m in self.modules():
                last_bn = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
                if last_bn is not None:
                    nn.init.zeros_(last_bn.weight)

    def stages(self) -> list[nn.Sequential]:
        """The residual stages ``layer1..layerN`` in order."""
        return get_stages(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Feature maps before pooling: (B, num_features, H', W')."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            x = stage(x)
        return x

    def forward_head(self, x: Tensor) -> Tensor:
        """Global average pool and classifier: (B, C, H, W) -> (B, num_classes)."""
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final layer with a fresh one of ``num_classes`` outputs."""
        self.fc = nn.Linear(self.num_features, num_classes)


# --- ImageNet nets (Table 1). Default stem "imagenet"; stem="cifar" gives the usual CIFAR ResNet-18. ---------------

_IMAGENET = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def _imagenet_builder(depth: int, residual: bool):
    block, layers = _IMAGENET[depth]

    def build(*, num_classes: int = 1000, **kwargs) -> ResNet:
        return ResNet(block, layers, num_classes=num_classes, residual=residual, **kwargs)

    kind = "ResNet" if residual else "plain net"
    build.__doc__ = f"{kind}-{depth} of He et al. 2015, Table 1 (torchvision parameter names)."
    return build


for _depth in _IMAGENET:
    register_model(f"resnet{_depth}", input_size=224, family="imagenet", residual=True, depth=_depth)(
        _imagenet_builder(_depth, residual=True))
for _depth in (18, 34):  # the plain nets of Table 2
    register_model(f"plain{_depth}", input_size=224, family="imagenet", residual=False, depth=_depth)(
        _imagenet_builder(_depth, residual=False))


# --- CIFAR-10 nets (section 4.2): 6n+2 layers, 16/32/64 filters, option A shortcuts. ---------------------------------

def _cifar_builder(depth: int, residual: bool):
    n = (depth - 2) // 6

    def build(*, num_classes: int = 10, shortcut: Shortcut = "A", **kwargs) -> ResNet:
        kwargs.setdefault("stem", "cifar")
        return ResNet(BasicBlock, (n, n, n), widths=(16, 32, 64), num_classes=num_classes, shortcut=shortcut,
                      residual=residual, **kwargs)

    kind = "ResNet" if residual else "plain net"
    build.__doc__ = f"CIFAR {kind}-{depth} of He et al. 2015, section 4.2 (n={n}, option A shortcuts)."
    return build


for _depth in (20, 32, 44, 56, 110, 1202):
    register_model(f"resnet{_depth}", input_size=32, family="cifar", residual=True, depth=_depth)(
        _cifar_builder(_depth, residual=True))
for _depth in (20, 32, 44, 56, 110):  # Fig. 6 left
    register_model(f"plain{_depth}", input_size=32, family="cifar", residual=False, depth=_depth)(
        _cifar_builder(_depth, residual=False))
