"""The backend interface: lower the final IR to a runnable artifact, and load one back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import onnx
import torch
import torch.fx as fx

from compiler.errors import EmulationError, TargetError


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
    """A backend's result: the ONNX model, a runner for it, and facts for the ledger.

    ``files``: further files of the artifact (name -> bytes), written beside ``model.onnx`` and
    checksummed in the manifest. ``warnings``: what the ledger must record as fallbacks (strict
    mode refuses them).
    """

    model: onnx.ModelProto
    runner: Runner
    info: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class Backend:
    """Base class; subclasses set ``name`` and ``default_options`` and implement the methods."""

    name: ClassVar[str] = ""
    default_options: ClassVar[dict[str, Any]] = {}
    emulation: ClassVar[str] = "integer emulation"  # what ``emulate`` computes, for the ledger

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            known = ", ".join(sorted(self.default_options)) or "none"
            raise TargetError(f"backend {self.name!r} has no option(s) {', '.join(unknown)}; its options: {known}")
        self.options = {**self.default_options, **options}

    def lower(self, request: LoweringRequest) -> Lowered:
        """Lower the IR."""
        raise NotImplementedError

    def quant_policy(self, spec: Mapping[str, Any]) -> Any:
        """The placement policy (a ``compiler.quant_policy.QuantPolicy``) the target's ``quant_policy`` names.

        The driver hands it to the quantisation passes through the pass context.
        """
        raise TargetError(f"backend {self.name!r} has no quantisation policy; choose a target that does not quantise")

    def hardware(self) -> dict[str, Any]:
        """Facts about this machine that shaped the policy (ISA, int8 format), for the ledger."""
        return {}

    def channel_multiple(self) -> int:
        """The multiple of channels this backend's kernels run fastest at (pruning rounds widths to it)."""
        return 1

    def layer_timer(self, precision: str = "float32") -> Any:
        """A ``compiler.layer_shapes.LayerTimer`` measuring layers on this backend, or None if it cannot.

        ``precision``: ``"float32"``, or ``"int8"`` for a target that runs its layers in integer kernels.
        """
        return None

    def emulate(self, graph_module: fx.GraphModule, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The quantised IR computed with the runtime's own kernel arithmetic (bit-exact where it can be).

        Raises:
            EmulationError: the backend has no emulation, or this IR defeats it.
        """
        raise EmulationError(f"backend {self.name!r} has no emulation of its kernels")

    def load(self, model: onnx.ModelProto | bytes) -> Runner:
        """A runner for a model this backend lowered earlier."""
        raise NotImplementedError
