"""The fxpress model zoo: models to compile, each with example inputs and realistic sample data.

    import models
    zoo_model = models.load("efficientnet-lite0")
    logits = zoo_model.model(*zoo_model.example_inputs)
    calibration = zoo_model.calibration_data(64)

Small models are written here (MLP, LeNet, ResNet-18, MobileNetV2, a digits CNN trained on first
use); EfficientNet-Lite0 and all-MiniLM-L6-v2 load pretrained weights from pip packages. Nothing
is downloaded. Importing this package imports neither torch nor transformers; `load` does, for the
entry asked for. It imports nothing of fxpress (`tests/test_layers.py` checks), so any user can.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.registry import UnknownModelError, load, names

if TYPE_CHECKING:
    from models.zoo_model import ZooModel

__all__ = ["UnknownModelError", "ZooModel", "load", "names"]


def __getattr__(attribute: str) -> object:
    """Imports `ZooModel` on first access, keeping `import models` free of torch."""
    if attribute == "ZooModel":
        from models.zoo_model import ZooModel

        return ZooModel
    raise AttributeError(f"module 'models' has no attribute {attribute!r}")
