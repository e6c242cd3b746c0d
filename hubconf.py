"""torch.hub entry points: ``torch.hub.load(<this repository>, "resnet20", source="local")`` builds any registered
model (keyword arguments go to ``reslab.create_model``; weights are not downloaded, train them with reslab)."""

import sys
from pathlib import Path

dependencies = ["torch", "torchvision"]

try:
    import reslab  # noqa: F401
except ImportError:  # a plain checkout: use its sources
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from reslab.models import create_model, list_models  # noqa: E402


def _entry(name):
    def build(num_classes: int = 10, **kwargs):
        return create_model(name, num_classes=num_classes, **kwargs)

    build.__name__ = name
    build.__doc__ = f"reslab's {name} (see `reslab summary {name}`); kwargs: stem, shortcut, zero_init_residual."
    return build


for _name in list_models():
    globals()[_name] = _entry(_name)
