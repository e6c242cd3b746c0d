"""``--whiten-bias-epochs N``: the whitening stem's bias trains for the first N epochs, then is held at its value
(airbench trains it for 3 epochs only)."""

from __future__ import annotations

from typing import Any

import torch

from ...models.checkpoint import unwrap_model
from ..loop import Hook, Run


class WhiteningBiasWindow(Hook):
    """``--whiten-bias-epochs N``: the whitening stem's bias trains for the first N epochs, then is held at its value
    (airbench trains it for 3 epochs only). Held by restoring it after every step rather than by ``requires_grad``,
    which a DistributedDataParallel model cannot change once wrapped."""

    name = "whiten_bias"

    def __init__(self, epochs: float) -> None:
        self.epochs = epochs
        self.held: torch.Tensor | None = None

    def on_step_end(self, run: Run, loss: torch.Tensor, lr: float) -> None:
        bias = unwrap_model(run.model).conv1.bias
        if self.held is None and run.step >= self.epochs * len(run.train_batches):
            self.held = bias.detach().clone()
        if self.held is not None:
            with torch.no_grad():
                bias.copy_(self.held)

    def state_dict(self) -> dict[str, Any]:
        return {"held": self.held}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.held = state["held"]
