"""Every ``every`` steps, move a running average toward the weights and reset the weights to the average."""

from __future__ import annotations

from typing import Any

import torch

from ...models.checkpoint import unwrap_model
from ..loop import Hook, Run


class Lookahead(Hook):
    """Every ``every`` steps, move a running average toward the weights and reset the weights to the average.

    As in the airbench trainers (after Zhang et al. 2019, "Lookahead Optimizer"): the average's decay grows as
    (step/total)^3, so it does nothing early and smooths the weights late. BatchNorm running statistics are averaged
    too. Deviation from airbench, which ends on the average: at the last step the average is moved onto the weights
    (decay 0), so the run ends on the weights of its last step. The fast preset's published numbers used this.
    """

    name = "lookahead"
    every = 5

    def __init__(self, model: torch.nn.Module) -> None:
        self.tensors = [t for t in unwrap_model(model).state_dict().values() if t.is_floating_point()]
        self.average = [t.detach().clone() for t in self.tensors]

    @staticmethod
    def decay(step: int, total: int) -> float:
        """How much of the average survives an update at ``step`` of ``total``."""
        return 0.95 ** Lookahead.every * (step / total) ** 3 if step < total else 0.0

    def on_step_end(self, run: Run, loss: torch.Tensor, lr: float) -> None:
        self.update(run.step, run.total_steps)

    @torch.no_grad()
    def update(self, step: int, total: int) -> None:
        if step % self.every == 0 or step >= total:
            decay = self.decay(step, total)
            for a, t in zip(self.average, self.tensors):
                a.lerp_(t, 1 - decay)
                t.copy_(a)

    def state_dict(self) -> dict[str, Any]:
        return {"average": [a.detach().cpu() for a in self.average]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average = [a.to(t.device) for a, t in zip(state["average"], self.tensors)]
