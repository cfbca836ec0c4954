"""The zoo's names and how to build each entry, imported only when that entry is loaded."""

from __future__ import annotations

import importlib
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.zoo_model import ZooModel

logger = logging.getLogger(__name__)

#: Registry name -> "module:builder". Order is the order `names()` gives.
_BUILDERS: dict[str, str] = {
    "mlp": "models.small:build_mlp",
    "lenet": "models.small:build_lenet",
    "resnet18": "models.imagenet:build_resnet18",
    "mobilenet-v2": "models.imagenet:build_mobilenet_v2",
    "efficientnet-lite0": "models.pretrained:build_efficientnet_lite0",
    "minilm-l6": "models.pretrained:build_minilm_l6",
    "digits-cnn": "models.digits_cnn:build_digits_cnn",
}


class UnknownModelError(ValueError):
    """Raised by `load` for a name that is not in the zoo; the message lists the known names."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown zoo model {name!r}; known models: {', '.join(_BUILDERS)}")
        self.name = name


def names() -> list[str]:
    """Returns the names of the zoo's models."""
    return list(_BUILDERS)


def load(name: str) -> ZooModel:
    """Builds a zoo model: its module in eval mode, example inputs and sample data.

    Every call builds a fresh module, so passes may change it in place.

    Args:
        name: One of `names()`.

    Raises:
        UnknownModelError: If `name` is not in the zoo.
    """
    if name not in _BUILDERS:
        raise UnknownModelError(name)
    module_name, builder_name = _BUILDERS[name].split(":")
    builder = getattr(importlib.import_module(module_name), builder_name)
    start = time.perf_counter()
    zoo_model = builder()
    logger.info("loaded zoo model %s in %.2f s", name, time.perf_counter() - start)
    return zoo_model
