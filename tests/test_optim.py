"""reslab's SGD against torch.optim.SGD: the same weights, bit for bit, and interchangeable state dicts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reslab.training.optim import SGD
from reslab.training.train import param_groups


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


def _steps(model: nn.Module, opt, steps: range) -> None:
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(10)]
    for step in steps:
        for group in opt.param_groups:  # a schedule, as the training loop sets it
            group["lr"] = 0.1 * group["lr_scale"] * (1 - step / 10)
        x, y = batches[step]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch_bit_for_bit_and_checkpoints_interchange(nesterov):
    ours, theirs = _net(), _net()
    kw = dict(lr=0.1, momentum=0.85, nesterov=nesterov)
    opt_ours = SGD(param_groups(ours, 5e-4, False, bias_lr_scale=4.0), **kw)
    opt_theirs = torch.optim.SGD(param_groups(theirs, 5e-4, False, bias_lr_scale=4.0), **kw)
    _steps(ours, opt_ours, range(4))
    _steps(theirs, opt_theirs, range(4))
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt_ours.state_dict()["param_groups"] == opt_theirs.state_dict()["param_groups"]

    # A checkpoint of either loads into the other and training goes on identically.
    swapped_ours, swapped_theirs = copy.deepcopy(ours), copy.deepcopy(theirs)
    opt_a = SGD(param_groups(swapped_ours, 5e-4, False, bias_lr_scale=4.0), **kw)
    opt_a.load_state_dict(copy.deepcopy(opt_theirs.state_dict()))  # as read from a file
    opt_b = torch.optim.SGD(param_groups(swapped_theirs, 5e-4, False, bias_lr_scale=4.0), **kw)
    opt_b.load_state_dict(copy.deepcopy(opt_ours.state_dict()))
    for model, opt in ((ours, opt_ours), (theirs, opt_theirs), (swapped_ours, opt_a), (swapped_theirs, opt_b)):
        _steps(model, opt, range(4, 7))
    for a, b, c, d in zip(ours.parameters(), theirs.parameters(), swapped_ours.parameters(),
                          swapped_theirs.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


def test_sgd_refuses_a_state_of_other_groups():
    opt = SGD(param_groups(_net(), 5e-4, False), lr=0.1, momentum=0.9)
    other = SGD([{"params": list(_net().parameters())}], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="different parameter groups"):
        opt.load_state_dict(other.state_dict())
