"""Resolving the MODEL argument of the command: a zoo name, or ``path/to/file.py:factory``."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from compiler.capture import DynamicDims
from compiler.errors import UsageError

#: Suffixes of pickled PyTorch checkpoints, which fxpress refuses to load.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass
class ModelSource:
    """A model with the inputs to capture it with."""

    name: str
    model: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    dynamic_dims: DynamicDims | None = None
    zoo_entry: object = None


def resolve(spec: str) -> ModelSource:
    """Load a zoo model by name, or call ``factory()`` from ``file.py:factory``; never unpickle a file."""
    _refuse_pickle(spec)
    if ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
        return _from_factory(spec)
    import models

    if spec not in models.names():
        known = ", ".join(models.names())
        raise UsageError(f"unknown model {spec!r}: give a zoo name ({known}) or path/to/file.py:factory")
    entry = models.load(spec)
    # No hand-written dims: the zoo goes through the defaults a user's own model gets.
    return ModelSource(spec, entry.model, tuple(entry.example_inputs), None, entry)


def _refuse_pickle(spec: str) -> None:
    """Refuse a pickled checkpoint: loading one runs arbitrary code, so only the user's own code may."""
    pickled = [text for text in (spec, spec.rsplit(":", 1)[0]) if Path(text).suffix.lower() in PICKLE_SUFFIXES]
    if pickled:
        path_text = pickled[0]
        raise UsageError(
            f"{path_text} is a pickled file and fxpress does not unpickle (it can run arbitrary code): write a "
            "file.py whose factory loads it (torch.load(..., weights_only=True)) and returns (model, example_inputs), "
            "then pass file.py:factory"
        )


def _from_factory(spec: str) -> ModelSource:
    path_text, factory_name = spec.rsplit(":", 1)
    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"model file {path_text!r} does not exist")
    module_name = f"fxpress_user_model_{path.stem}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    _run_user_code(f"importing {path_text}", lambda: loader_spec.loader.exec_module(module))
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UsageError(f"{path_text} has no callable {factory_name!r}")
    produced = _run_user_code(f"calling {spec}", factory)
    if not isinstance(produced, tuple) or len(produced) not in (2, 3):
        raise UsageError(f"{spec} must return (model, example_inputs) or (model, example_inputs, dynamic_dims)")
    model, example_inputs, *rest = produced
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    return ModelSource(path.stem, model, tuple(example_inputs), rest[0] if rest else None)


def _run_user_code(what: str, call):
    """Run the user's module or factory; its exceptions are the user's error (exit 2), not fxpress's."""
    try:
        return call()
    except Exception as error:  # noqa: BLE001 - any exception of user code is reported the same way
        raise UsageError(f"{what} failed: {type(error).__name__}: {error}") from error
