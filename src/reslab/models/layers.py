"""What the ResNet family and the fast nets share: He initialisation and the ``layer1..layerN`` stages (torchvision's
names, so weights interoperate)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def he_init(net: nn.Module, skip: nn.Module | None = None, identity: bool = False) -> None:
    """He initialisation (He et al. 2015b) as torchvision does it: every conv but ``skip`` from N(0, 2/fan_out),
    every BatchNorm at weight 1, bias 0. ``identity``: then set each conv's first filters to pass their input
    through (Dirac), as airbench initialises its convs."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and m is not skip:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if identity:
                with torch.no_grad():
                    nn.init.dirac_(m.weight[:min(m.in_channels, m.out_channels)])
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def set_stages(net: nn.Module, stages: Iterable[nn.Sequential]) -> None:
    """Attach ``stages`` as ``net.layer1``, ``net.layer2``, ... and record how many there are."""
    n = 0
    for n, stage in enumerate(stages, 1):
        setattr(net, f"layer{n}", stage)
    net.num_stages = n


def get_stages(net: nn.Module) -> list[nn.Sequential]:
    """The stages ``layer1..layerN`` in order."""
    return [getattr(net, f"layer{i + 1}") for i in range(net.num_stages)]
