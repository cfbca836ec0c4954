"""The pass interface: a small class with one job, its options, and its pre/postconditions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from compiler.errors import PassError, TargetError


@dataclass
class PassResult:
    """What a pass returns: the graph, whether it changed (honestly), and its counters."""

    graph_module: fx.GraphModule
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """Read-only facts about the model that passes may use; passes never keep state elsewhere."""

    example_inputs: tuple[torch.Tensor, ...]
    probe_inputs: tuple[torch.Tensor, ...]
    calibration_data: object = None
    target_name: str = ""
    fallbacks: list[str] = field(default_factory=list)  # passes append what they left undone
    quant_policy: Any = None  # compiler.quant_policy.QuantPolicy for targets that quantise
    teacher: Any = None  # the captured IR before any pass, for passes that distil towards it
    train_data: Any = None  # validated batches for training passes; None: they use calibration_data
    channel_multiple: int = 1  # the width multiple the backend's kernels want (Backend.channel_multiple)
    layer_timer: Any = None  # compiler.layer_shapes.LayerTimer of the backend, None where it cannot time layers
    captured_macs: int = 0  # MACs of the model as captured, on the probe batch (set by the pass manager)


class Pass:
    """Base class. Subclasses set ``name``, ``exact`` and ``default_options`` and implement ``call``.

    ``exact`` passes promise outputs unchanged within fp32 tolerance; the pass manager checks it.
    Constructor keyword arguments are the pass's options; unknown ones are refused.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            known = ", ".join(sorted(self.default_options)) or "none"
            raise TargetError(
                f"pass {self.name!r} has no option(s) {', '.join(unknown)}; its options: {known}"
            )
        self.options = {**self.default_options, **options}

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Check preconditions; raise PassError with the reason when the input is unacceptable."""
        if not isinstance(gm, fx.GraphModule):
            raise PassError(f"pass {self.name!r} needs a torch.fx.GraphModule, got {type(gm).__name__}")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Rewrite ``gm`` (in place or into a new module) and report what changed."""
        raise NotImplementedError

    def ensures(self, gm: fx.GraphModule) -> None:
        """Check postconditions; raise PassError when the pass broke one."""

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Check preconditions, run, check postconditions."""
        self.requires(gm, ctx)
        result = self.call(gm, ctx)
        self.ensures(result.graph_module)
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"
