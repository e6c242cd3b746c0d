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

from .checkpoint import load_model
from .config import PRESETS, TrainConfig, make_config
from .errors import UserError
from .evaluate import EvalResult, evaluate, predict
from .models import create_model, list_models
from .rundir import package_version
from .train import TrainResult, train

__version__ = package_version()

__all__ = ["PRESETS", "EvalResult", "TrainConfig", "TrainResult", "UserError", "__version__", "create_model",
           "evaluate", "list_models", "load_model", "make_config", "predict", "train"]
