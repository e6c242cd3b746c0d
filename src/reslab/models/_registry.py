"""A tiny model registry: everything (CLI, comparison, tests) enumerates it.

A registered builder is a function ``f(*, num_classes: int, **kwargs) -> nn.Module``. Each entry also records
the input size the model was designed for, so tests and ``reslab summary`` can feed it a natural input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..core.errors import ModelError

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about one model name."""

    name: str
    builder: Callable[..., nn.Module]
    input_size: int  # pixels, the resolution the architecture was designed for
    family: str  # "imagenet", "cifar" or "fast": which paper/recipe the variant comes from
    residual: bool
    depth: int  # weighted layers, as the paper counts them


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, *, input_size: int, family: str, residual: bool, depth: int):
    """Decorator that registers ``builder`` under ``name``; a duplicate name is an error."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelInfo(name, builder, input_size, family, residual, depth)
        return builder

    return wrap


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names (optionally those containing ``pattern``), in registration order."""
    return [n for n in _REGISTRY if pattern is None or pattern in n]


def model_info(name: str) -> ModelInfo:
    """The registry entry for ``name``; raises ``ModelError`` with the known names if it is unknown."""
    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def create_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with ``num_classes`` outputs; ``kwargs`` go to its builder."""
    return model_info(name).builder(num_classes=num_classes, **kwargs)
