"""reslab: train, evaluate and compare residual networks (He et al. 2015), from a laptop CPU to many GPUs.

The public API::

    import reslab
    reslab.list_models()
    model = reslab.create_model("resnet20", num_classes=10)
    result = reslab.train(preset="paper", data="cifar10", epochs=1, out="runs/r20")
    reslab.evaluate("runs/r20", data="cifar10").accuracy
    reslab.predict("runs/r20", ["cat.png"])
    model, meta = reslab.load_model("runs/r20")
"""

import importlib
from typing import Any

# The package's layers, in order: a module imports only from its own layer or those before it (tests/test_layers.py
# holds this, and checks the README's table against it).
LAYERS = {
    "core": "errors, messages, file locks, progress, run directories, torchrun, execution (device, precision, threads)",
    "config": "TrainConfig (its fields in sections, each with its range) and the presets with their budget rules",
    "models": "one ResNet class and the fast nets in a registry, safe checkpoint loading, pretrained weights",
    "data": "datasets and image folders, the decoded-image cache, augmentation, batch loaders",
    "inference": "evaluation, prediction (files to rows; the --output writer), Grad-CAM, ONNX Runtime backends",
    "training": "the loop, its hooks (one per file), the schedule, the builders, train, optimizers, the probe, bench",
    "insight": "audit, comparisons, the mistakes gallery, figures, the HTML report, the lr range test",
    "ship": "export (ONNX, TorchScript), int8 quantization, the inference benchmark, the HTTP server",
    "cli": "the reslab command: flags from type hints and docstrings, one function per command",
}

# Imported on first use (PEP 562): the console script starts without torch, so a Ctrl-C while torch loads is caught.
_API = {"load_model": "models.checkpoint", "PRESETS": "config.schema", "TrainConfig": "config.schema",
        "make_config": "config.schema", "UserError": "core.errors", "EvalResult": "inference.evaluate",
        "evaluate": "inference.evaluate", "predict": "inference.predict", "create_model": "models",
        "list_models": "models", "TrainResult": "training.train", "train": "training.train"}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from .core.version import package_version

        return package_version()
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    try:
        return importlib.import_module(f".{name}", __name__)  # a layer: reslab.core, reslab.data, ...
    except ModuleNotFoundError:
        raise AttributeError(f"module 'reslab' has no attribute {name!r}") from None


__all__ = ["LAYERS", "PRESETS", "EvalResult", "TrainConfig", "TrainResult", "UserError", "__version__",
           "create_model", "evaluate", "list_models", "load_model", "make_config", "predict", "train"]
