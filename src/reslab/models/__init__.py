"""Registered networks. Importing this package registers every model."""

from . import fast, resnet  # noqa: F401  (registers the ResNet family and the fast nets)
from ._registry import ModelInfo, create_model, list_models, model_info, register_model
from .complexity import count_macs, count_params, summarize
from .fast import FastResNet
from .resnet import BasicBlock, Bottleneck, ResNet, ShortcutA

__all__ = [
           "BasicBlock",
           "Bottleneck",
           "FastResNet",
           "ModelInfo",
           "ResNet",
           "ShortcutA",
           "count_macs",
           "count_params",
           "create_model",
           "list_models",
           "model_info",
           "register_model",
           "summarize",
]
