"""A small residual network for training CIFAR-10 in minutes: the net of ``--preset fast``.

It follows the ResNet-9 design of the DAWNBench-era fast trainers (a conv + max-pool per stage, identity
residual blocks at constant width, no strided convs) with what later fast-training work found to help, each
named where it is built:

- a 2x2 first convolution initialised to *whiten* image patches (``init_whitening``) and then frozen;
- conv, then pool, then BatchNorm: the normalisation runs on a quarter of the pixels;
- a global max-pool head and a fixed 1/9 scale on the logits, which makes large learning rates stable;
- optionally (``stage_convs=2``, ``act="gelu"``) a second conv + BN in each stage instead of residual blocks, the
  layout of the airbench94 record net (conv, pool, BN, GELU, conv, BN, GELU): the ``conv8`` variants. They are
  plain nets (no shortcut), registered with ``residual=False``; ``conv8w48r`` adds an identity shortcut around each
  stage's second conv (``shortcut=True``), the residual form of the same layout.

Widths are data (``widths``, ``blocks``, ``stage_convs``, ``act``, ``shortcut``); the registered variants differ
only in them. Layer names follow torchvision's ResNet (``conv1``, ``layer1..3``, ``fc``), and the residual units are
``resnet.BasicBlock``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..core.errors import ModelError
from ._registry import register_model
from .layers import get_stages, he_init, set_stages
from .resnet import BasicBlock, conv3x3

WHITEN_KERNEL = 2


ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}


class ConvPool(nn.Module):
    """3x3 conv, 2x2 max-pool, BatchNorm, activation: one stage's change of width and resolution; with ``convs=2``
    a second 3x3 conv + BatchNorm + activation at the new resolution (``conv2``, ``bn2``). With ``shortcut`` the
    second conv is a residual branch: act(x + BN(conv2(x))), He et al.'s addition before the last activation (with
    one weighted layer in the branch where the paper's blocks have two: a deviation, to keep airbench's layout)."""

    def __init__(self, inplanes: int, planes: int, convs: int = 1, act: str = "relu", shortcut: bool = False) -> None:
        super().__init__()
        if convs not in (1, 2) or act not in ACTIVATIONS:
            raise ModelError(f"a stage has 1 or 2 convs and a relu or gelu activation, not {convs}, {act!r}")
        if shortcut and convs != 2:
            raise ModelError("a stage's shortcut goes around its second conv: it needs convs=2")
        self.shortcut = shortcut
        self.conv = conv3x3(inplanes, planes)
        self.pool = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm2d(planes)
        self.relu = ACTIVATIONS[act]()  # named relu for the layer names of the ReLU variants' weights
        if convs == 2:
            self.conv2 = conv3x3(planes, planes)
            self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn(self.pool(self.conv(x))))
        if hasattr(self, "conv2"):
            y = self.bn2(self.conv2(x))
            x = self.relu(x + y if self.shortcut else y)
        return x


class FastResNet(nn.Module):
    """Whitening stem, then per stage a ``ConvPool`` and ``blocks[i]`` residual ``BasicBlock``s; max-pool head.

    Args:
        widths: channels of each stage.
        blocks: residual blocks (two 3x3 convs each, identity shortcut) after each stage's ConvPool.
        stage_convs: convolutions of each stage's ConvPool (1, or 2 for the airbench layout).
        act: the activation of the stem and the ConvPools: relu, or gelu (airbench).
        shortcut: an identity shortcut around each two-conv stage's second conv (a residual form of airbench's net).
        num_classes: outputs of the final linear layer.
        logit_scale: fixed multiplier on the logits (1/9, as in the airbench trainers).
    """

    def __init__(self, widths: Sequence[int] = (64, 128, 256), blocks: Sequence[int] = (1, 0, 1),
                 num_classes: int = 10, logit_scale: float = 1 / 9, in_channels: int = 3,
                 stage_convs: Sequence[int] | None = None, act: str = "relu", shortcut: bool = False) -> None:
        super().__init__()
        stage_convs = tuple(stage_convs or (1,) * len(widths))
        if not len(widths) == len(blocks) == len(stage_convs):
            raise ModelError(f"widths {tuple(widths)}, blocks {tuple(blocks)} and stage_convs {stage_convs} must "
                             f"have the same length")
        if act not in ACTIVATIONS:
            raise ModelError(f"act must be one of {', '.join(ACTIVATIONS)}, got {act!r}")
        stem = 2 * in_channels * WHITEN_KERNEL**2  # each whitening filter and its negative
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=WHITEN_KERNEL, padding=0, bias=True)
        self.conv1.weight.requires_grad_(False)  # set from the data by init_whitening, never trained
        # A filter init_whitening zeroed (a direction the data does not vary in) keeps a zero bias: trained, such a
        # bias makes a constant channel whose BatchNorm running statistics never settle (10 % in eval mode).
        self.conv1.bias.register_hook(lambda grad: grad * self.conv1.weight.flatten(1).ne(0).any(1).to(grad.dtype))
        self.relu = ACTIVATIONS[act]()
        ins = (stem, *widths[:-1])
        set_stages(self, (nn.Sequential(ConvPool(i, w, c, act, shortcut), *[BasicBlock(w, w) for _ in range(n)])
                          for i, w, n, c in zip(ins, widths, blocks, stage_convs)))
        inplanes = widths[-1]
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.num_features = inplanes
        self.fc = nn.Linear(inplanes, num_classes, bias=False)
        self.logit_scale = logit_scale
        # Identity-initialised filters (airbench): the first in_channels filters pass their input through.
        he_init(self, skip=self.conv1, identity=True)

    @torch.no_grad()
    def init_whitening(self, images: Tensor, eps: float = 5e-4) -> None:
        """Set the first conv to whiten 2x2 patches of ``images`` (N, C, H, W, normalised floats).

        The filters are the eigenvectors of the patch covariance scaled by 1/sqrt(eigenvalue + eps), so the stem's
        outputs are decorrelated with unit variance; each filter comes with its negative, so the ReLU keeps both signs.
        A direction the patches (almost) do not vary in (eigenvalue below 1 % of ``eps``: the two colour directions of
        grayscale images, the high frequencies of upscaled ones) carries no signal, only the arbitrary eigenvector that
        numerical noise picks; its filter is zeroed instead of scaled up. CIFAR-10's smallest eigenvalue is 1.2e-4,
        25x above that floor, so its stem is unchanged.
        """
        c, k = self.conv1.in_channels, WHITEN_KERNEL
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # (N, C, H', W', k, k)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k).double()
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        scale = (eigenvalues.clamp_min(0) + eps).rsqrt() * (eigenvalues >= 0.01 * eps)
        filters = (eigenvectors.T * scale[:, None]).view(-1, c, k, k)
        self.conv1.weight.copy_(torch.cat([filters, -filters]).to(self.conv1.weight.dtype))
        self.conv1.bias.zero_()

    def stages(self) -> list[nn.Sequential]:
        """The stages ``layer1..layerN`` in order."""
        return get_stages(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Feature maps before pooling: (B, num_features, H', W')."""
        x = self.relu(self.conv1(x))
        for stage in self.stages():
            x = stage(x)
        return x

    def forward_head(self, x: Tensor) -> Tensor:
        """Global max-pool, classifier and the fixed logit scale."""
        return self.fc(torch.flatten(self.pool(x), 1)) * self.logit_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


FAST_VARIANTS: dict[str, dict] = {
    # name: FastResNet's arguments. Depth counts weighted layers: stem + the stages' convs + two per block + fc.
    "resnet9": dict(widths=(64, 128, 256), blocks=(1, 0, 1)),
    "resnet9s": dict(widths=(32, 64, 128), blocks=(1, 0, 1)),
    "resnet9m": dict(widths=(32, 128, 128), blocks=(1, 0, 1)),  # the width of public ablations' 92 %-in-10-epochs net
    "resnet11m": dict(widths=(32, 128, 128), blocks=(1, 1, 1)),  # ... with a residual block in the middle stage too
    # Two convs per stage, GELU, no shortcut: airbench94's layout at its half (32/128/128) and full width.
    # The budget rule picks among these widths by the epochs a budget buys of each (presets.BUDGET_WIDTHS).
    "conv8m": dict(widths=(32, 128, 128), blocks=(0, 0, 0), stage_convs=(2, 2, 2), act="gelu"),
    "conv8w48": dict(widths=(48, 192, 192), blocks=(0, 0, 0), stage_convs=(2, 2, 2), act="gelu"),
    "conv8": dict(widths=(64, 256, 256), blocks=(0, 0, 0), stage_convs=(2, 2, 2), act="gelu"),
    # The same at 48/192/192 with a shortcut around each stage's second conv: the residual form, piloted against
    # conv8w48 (docs/results, "The four budgets on the machine type", issue 33).
    "conv8w48r": dict(widths=(48, 192, 192), blocks=(0, 0, 0), stage_convs=(2, 2, 2), act="gelu", shortcut=True),
}


def _fast_builder(spec: dict):
    def build(*, num_classes: int = 10, **kwargs) -> FastResNet:
        return FastResNet(**spec, num_classes=num_classes, **kwargs)

    build.__doc__ = f"Fast net ({', '.join(f'{k} {v}' for k, v in spec.items())}) for --preset fast."
    return build


for _name, _spec in FAST_VARIANTS.items():
    _convs = sum(_spec.get("stage_convs", (1,) * len(_spec["widths"])))
    _residual = sum(_spec["blocks"]) > 0 or _spec.get("shortcut", False)
    register_model(_name, input_size=32, family="fast", residual=_residual,
                   depth=2 + _convs + 2 * sum(_spec["blocks"]))(_fast_builder(_spec))
