"""reslab's optimizers: SGD with momentum, computed exactly as ``torch.optim.SGD`` and saved in its ``state_dict``
format; Muon for conv filters; ``Chain`` to step several as one.

Why not torch's class: constructing any ``torch.optim.Optimizer`` imports ``torch._dynamo`` (its methods are wrapped
to be skipped by the compiler), which costs ~1 s of every start on a 2-core CPU, a noticeable part of a 2.5-minute
``--time-budget``. This class does the same arithmetic with the same tensor operations (tests check bit-identical
weights after several steps), and its checkpoints load into ``torch.optim.SGD`` and back. ``--compile`` and AdamW
use torch's optimizers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


class SGD:
    """SGD with (Nesterov) momentum and per-group weight decay, as ``torch.optim.SGD(..., dampening=0)``.

    For each parameter p with gradient g: ``g += weight_decay * p``; ``buf = g`` at the first step, else
    ``buf = momentum * buf + g``; ``p -= lr * (g + momentum * buf if nesterov else buf)``.
    """

    def __init__(self, params: Iterable[dict] | Iterable[Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs a momentum > 0")
        # The keys of torch.optim.SGD's groups, so that state dicts are interchangeable.
        self.defaults = dict(lr=lr, momentum=momentum, dampening=0, weight_decay=weight_decay, nesterov=nesterov,
                             maximize=False, foreach=None, differentiable=False, fused=None)
        self.state: dict[Tensor, dict[str, Tensor]] = defaultdict(dict)
        self.param_groups: list[dict[str, Any]] = []
        params = list(params)
        for group in params if isinstance(params[0], dict) else [{"params": params}]:
            self.param_groups.append({**self.defaults, **group, "params": list(group["params"])})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            momentum, nesterov = group["momentum"], group["nesterov"]
            if group["weight_decay"] != 0:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if momentum != 0:
                bufs = [self.state[p].get("momentum_buffer") for p in params]
                if all(b is not None for b in bufs):
                    torch._foreach_mul_(bufs, momentum)
                    torch._foreach_add_(bufs, grads, alpha=1 - group["dampening"])
                else:  # the first step: the buffer starts as the gradient
                    for i, p in enumerate(params):
                        if bufs[i] is None:
                            bufs[i] = self.state[p]["momentum_buffer"] = grads[i].detach().clone()
                        else:
                            bufs[i].mul_(momentum).add_(grads[i], alpha=1 - group["dampening"])
                grads = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs
            torch._foreach_add_(params, grads, alpha=-group["lr"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.SGD``'s layout: parameters are numbered across groups in order."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            ids = [index.setdefault(id(p), len(index)) for p in group["params"]]
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        state = {index[id(p)]: dict(s) for p, s in self.state.items() if id(p) in index}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of ``torch.optim.SGD`` with the same parameter groups."""
        saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the saved optimizer state has different parameter groups than this model")
        by_index = {}
        for old, group in zip(saved, self.param_groups):
            by_index.update(zip(old["params"], group["params"]))
            group.update({k: v for k, v in old.items() if k != "params"})
        self.state = defaultdict(dict)
        for i, s in state_dict["state"].items():
            p = by_index[int(i)]
            self.state[p] = {k: v.to(device=p.device, dtype=p.dtype, copy=True)
                             if torch.is_tensor(v) and v.is_floating_point() else v for k, v in s.items()}


# --- Muon: orthogonalised momentum for the conv filters -------------------------------------------------------------

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic of Jordan et al.'s Muon: steep at zero, rough near one


def orthogonalize(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """An approximate polar factor U V^T of the matrix ``g`` = U S V^T by ``steps`` Newton–Schulz iterations.

    X <- a X + (b A + c A^2) X with A = X X^T, on X = g / |g|_F (so every singular value starts <= 1). The quintic's
    coefficients push small singular values up fast and leave the others in roughly [0.7, 1.2]: not U V^T exactly,
    which Muon's authors found does not hurt. Computed in fp32 here (bf16 is emulated on some CPUs), bf16 on CUDA.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    x = x / (x.norm() + eps)
    wide = x.size(0) <= x.size(1)
    if not wide:  # iterate on the smaller Gram matrix
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return (x if wide else x.T).to(g.dtype)


class Muon:
    """Muon (Jordan et al. 2024, as airbench94_muon uses it) for conv filters, viewed as (out, in·k·k) matrices.

    Per filter bank p with gradient g: ``buf = momentum * buf + g``; ``u = g + momentum * buf`` (Nesterov) or
    ``buf``; p is rescaled to Frobenius norm sqrt(out) (the record's per-step filter normalisation, which replaces
    weight decay for these weights); then ``p -= lr * orthogonalize(u)``. Groups carry ``lr`` and ``lr_scale`` like
    ``SGD``'s, so the loop's schedule drives both optimizers.
    """

    def __init__(self, params: Iterable[dict] | Iterable[Tensor], lr: float, momentum: float = 0.6,
                 nesterov: bool = True, ns_steps: int = 5, normalize: bool = True) -> None:
        self.defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, normalize=normalize)
        self.state: dict[Tensor, dict[str, Tensor]] = defaultdict(dict)
        params = list(params)
        self.param_groups = [{**self.defaults, **group, "params": list(group["params"])}
                             for group in (params if params and isinstance(params[0], dict) else [{"params": params}])]

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                update = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                if group["normalize"]:
                    p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))
                ortho = orthogonalize(update.reshape(len(p), -1), group["ns_steps"]).view_as(p)
                p.add_(ortho, alpha=-group["lr"])

    zero_grad = SGD.zero_grad
    state_dict = SGD.state_dict
    load_state_dict = SGD.load_state_dict


class Chain:
    """Several optimizers stepped as one (Muon for the filters, SGD for the rest): ``param_groups`` lists all of
    their groups, so the loop sets every group's learning rate; the state dict holds each one's under its index."""

    def __init__(self, *optimizers: Any) -> None:
        self.optimizers = optimizers
        self.param_groups = [g for opt in optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"chain": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict.get("chain", ())) != len(self.optimizers):
            raise ValueError("the saved optimizer state is not of this chain of optimizers")
        for opt, state in zip(self.optimizers, state_dict["chain"]):
            opt.load_state_dict(state)
