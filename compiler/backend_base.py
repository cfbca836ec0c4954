"""The backend interface: lower the final IR to a runnable artifact, and load one back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import onnx
import torch
import torch.fx as fx

from compiler.errors import TargetError


@dataclass
class LoweringRequest:
    """The IR and the interface facts a backend needs to lower it."""

    graph_module: fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_dims: dict


class Runner(Protocol):
    """Runs a lowered model on torch tensors and returns torch tensors (flat, in output order)."""

    def run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Run once."""
        ...


@dataclass
class Lowered:
    """A backend's result: the ONNX model, a runner for it, and facts for the ledger."""

    model: onnx.ModelProto
    runner: Runner
    info: dict[str, Any] = field(default_factory=dict)


class Backend:
    """Base class; subclasses set ``name`` and ``default_options`` and implement the methods."""

    name: ClassVar[str] = ""
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            known = ", ".join(sorted(self.default_options)) or "none"
            raise TargetError(f"backend {self.name!r} has no option(s) {', '.join(unknown)}; its options: {known}")
        self.options = {**self.default_options, **options}

    def lower(self, request: LoweringRequest) -> Lowered:
        """Lower the IR."""
        raise NotImplementedError

    def load(self, model: onnx.ModelProto | bytes) -> Runner:
        """A runner for a model this backend lowered earlier."""
        raise NotImplementedError
