"""``--freeze``: only the classifier trains (its parameters alone require gradients, set in ``setup``); the
backbone's BatchNorm layers stay in eval mode, so their statistics are the pretrained ones (a linear probe)."""

from __future__ import annotations

import torch

from ...models.checkpoint import unwrap_model
from ..loop import Hook, Run


class FrozenBackbone(Hook):
    """``--freeze``: only the classifier trains (its parameters alone require gradients, set in ``setup``); the
    backbone's BatchNorm layers stay in eval mode, so their statistics are the pretrained ones (a linear probe)."""

    name = "freeze"

    def on_epoch_start(self, run: Run) -> None:
        for m in unwrap_model(run.model).modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
