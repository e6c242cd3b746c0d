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
import sys
import types
from typing import Any

# Imported on first use (PEP 562): the console script starts without torch, so a Ctrl-C while torch loads is caught.
_API = {"load_model": "checkpoint", "PRESETS": "config", "TrainConfig": "config", "make_config": "config",
        "UserError": "errors", "EvalResult": "evaluate", "evaluate": "evaluate", "predict": "predict",
        "create_model": "models", "list_models": "models", "TrainResult": "train", "train": "train"}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from .rundir import package_version

        return package_version()
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    try:
        return importlib.import_module(f".{name}", __name__)  # a submodule: reslab.rundir, reslab.data, ...
    except ModuleNotFoundError:
        raise AttributeError(f"module 'reslab' has no attribute {name!r}") from None


class _Package(types.ModuleType):
    """Importing the submodule ``reslab.train`` would bind it over the function ``reslab.train`` (and ``evaluate``):
    the API's names win, as they did when this file imported them eagerly."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["PRESETS", "EvalResult", "TrainConfig", "TrainResult", "UserError", "__version__", "create_model",
           "evaluate", "list_models", "load_model", "make_config", "predict", "train"]
