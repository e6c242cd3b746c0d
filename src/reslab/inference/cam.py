"""Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization"), through Captum's ``LayerGradCam``: which parts of the image made the model pick a class.

The map is taken at the output of the network's last residual stage (``layer3`` of the CIFAR nets, ``layer4`` of
the ImageNet nets, the last ``layerN`` of the fast nets), the last place with a spatial layout; it is upsampled
bilinearly to the input and laid over the image exactly as the model saw it (resized, cropped, de-normalised).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..core.errors import ConfigError

OVERLAY_MIN_SIDE = 192  # small inputs (CIFAR's 32 px) are enlarged so the map can be seen


def cam_layer(model: nn.Module) -> nn.Module:
    """The last residual stage (``layerN``) of a reslab network."""
    stages = [(name, m) for name, m in model.named_children() if name.startswith("layer") and name[5:].isdigit()]
    if not stages:
        raise ConfigError(f"{type(model).__name__} has no layerN stage to take a Grad-CAM map at")
    return max(stages, key=lambda s: int(s[0][5:]))[1]


def grad_cam(model: nn.Module, x: Tensor, target: int) -> Tensor:
    """The Grad-CAM map of class ``target`` for one input ``x`` (1, 3, H, W): (H, W), scaled to [0, 1]."""
    from captum.attr import LayerAttribution, LayerGradCam

    model.eval()
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        attr = LayerGradCam(model, cam_layer(model)).attribute(x, target=target, relu_attributions=True)
    heat = LayerAttribution.interpolate(attr.detach().float(), tuple(x.shape[-2:]), "bilinear")[0, 0]
    heat = heat.clamp(min=0)
    return heat / heat.max() if heat.max() > 0 else heat


def overlay(x: Tensor, heat: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Image.Image:
    """The de-normalised input ``x`` (1, 3, H, W) with ``heat`` (H, W) laid over it in a jet colour map."""
    from matplotlib import colormaps

    img = (x[0].detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None])
    img = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.float32)
    colour = colormaps["jet"](heat.cpu().numpy())[..., :3] * 255
    blend = (0.55 * img + 0.45 * colour).clip(0, 255).astype(np.uint8)
    out = Image.fromarray(blend)
    if min(out.size) < OVERLAY_MIN_SIDE:
        scale = -(-OVERLAY_MIN_SIDE // min(out.size))
        out = out.resize((out.width * scale, out.height * scale), Image.NEAREST)
    return out


def save_cam(model: nn.Module, x: Tensor, target: int, mean: tuple[float, ...], std: tuple[float, ...],
             path: Path) -> Tensor:
    """Write the overlay of ``target``'s map to ``path`` (PNG); returns the map."""
    heat = grad_cam(model, x, target)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay(x, heat, mean, std).save(path)
    return heat
