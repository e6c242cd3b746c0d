"""An exponential moving average of the weights (and BatchNorm statistics), evaluated and saved in place of the
trained weights, as torchvision's ``--model-ema`` and timm's ``ModelEmaV3``."""

from __future__ import annotations

import copy
from typing import Any

import torch

from ...models.checkpoint import unwrap_model
from ..loop import Hook, Run


class WeightEma(Hook):
    """An exponential moving average of the weights (and BatchNorm statistics), evaluated and saved in place of the
    trained weights, as torchvision's ``--model-ema`` and timm's ``ModelEmaV3``. The decay warms up as
    min(decay, (1 + step) / (10 + step)) (timm's warm-up), so a short run is not dominated by its initial weights.
    """

    name = "ema"

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        plain = unwrap_model(model)
        self.decay, self.module = decay, copy.deepcopy(plain).eval().requires_grad_(False)
        pairs = list(zip(self.module.state_dict().values(), plain.state_dict().values()))
        self.average = [a for a, _ in pairs if a.is_floating_point()]
        self.live = [t for a, t in pairs if a.is_floating_point()]
        self.counters = [(a, t) for a, t in pairs if not a.is_floating_point()]  # BatchNorm's step counts

    @torch.no_grad()
    def on_step_end(self, run: Run, loss: torch.Tensor, lr: float) -> None:
        decay = min(self.decay, (1 + run.step) / (10 + run.step))
        torch._foreach_lerp_(self.average, self.live, 1 - decay)

    @torch.no_grad()
    def model_for_eval(self) -> torch.nn.Module:
        for a, t in self.counters:
            a.copy_(t)
        return self.module

    def state_dict(self) -> dict[str, Any]:
        return {"average": [a.detach().cpu() for a in self.average]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for a, saved in zip(self.average, state["average"]):
            a.copy_(saved)
