"""Model size and cost: parameters, multiply-accumulates per forward pass, output shape."""

from __future__ import annotations

import torch
from torch import nn


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those that require gradients)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_macs(model: nn.Module, image_size: int, in_channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass of a single image, counted on convolutions and linear layers.

    BatchNorm, ReLU, pooling and additions are left out, as is usual (they are a fraction of a percent here);
    FLOPs are about twice the MACs, and a training step costs about three forward passes.
    """
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp, out):
        nonlocal total
        total += out.numel() * m.in_features

    hooks = [m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters())
        model(torch.zeros(1, in_channels, image_size, image_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return total


@torch.no_grad()
def summarize(model: nn.Module, image_size: int, in_channels: int = 3) -> dict:
    """Parameters, MACs and the output shape of a random 1xCxHxW input (the seed's "data test", made useful)."""
    was_training = model.training
    model.eval()
    try:
        out = model(torch.randn(1, in_channels, image_size, image_size))
    finally:
        model.train(was_training)
    return {
        "params": count_params(model),
        "trainable_params": count_params(model, trainable_only=True),
        "macs": count_macs(model, image_size, in_channels),
        "input_shape": [1, in_channels, image_size, image_size],
        "output_shape": list(out.shape),
    }
