"""reslab: train, evaluate and compare residual networks (He et al. 2015), from a laptop CPU to many GPUs.

The public API::

    import reslab
    reslab.list_models()
    model = reslab.create_model("resnet20", num_classes=10)
    result = reslab.train(preset="paper", data="cifar10", epochs=1, out="runs/r20")
    reslab.evaluate("runs/r20", data="cifar10")["accuracy"]
    reslab.predict("runs/r20", ["cat.png"])
    model, meta = reslab.load_model("runs/r20")
"""

__version__ = "0.1.0"

from .models import create_model, list_models  # noqa: E402
from .checkpoint import load_model  # noqa: E402
from .config import PRESETS, TrainConfig, make_config  # noqa: E402
from .evaluate import evaluate, predict  # noqa: E402
from .train import train  # noqa: E402

__all__ = ["__version__", "create_model", "list_models", "load_model", "train", "evaluate", "predict",
           "TrainConfig", "make_config", "PRESETS"]
