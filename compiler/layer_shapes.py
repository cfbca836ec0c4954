"""The conv and linear layers of an IR as shapes a backend can time (latency-driven pruning).

A :class:`LayerShape` is what a runtime's kernel sees of a layer: its widths, its input size and
its geometry. :func:`layer_shapes` reads them off an IR annotated by
:func:`compiler.probe.run_annotated`, at the batch the latency is wanted for. A backend's
``layer_timer()`` turns a shape into measured seconds (``backends.onnxruntime.layer_latency``).
"""

from __future__ import annotations

import json
import math
from dataclasses import astuple, dataclass
from typing import Protocol

import torch
import torch.fx as fx

from compiler import ir, meta

_CONV_DEFAULTS = (None, None, None, (1, 1), (0, 0), (1, 1), 1)  # input, weight, bias, stride, padding, dilation, groups


@dataclass(frozen=True)
class LayerShape:
    """One conv or linear layer as a runtime runs it.

    Attributes:
        op: ``"conv"`` (NCHW input) or ``"linear"`` (``rows`` x ``in_channels``).
        rows: the batch of a conv; batch times every leading dimension for a linear.
        in_channels, out_channels: input and output channels (features of a linear).
        height, width: the conv's input size (1 for a linear).
        kernel, stride, padding, dilation: the conv's geometry, ``(h, w)`` each.
        groups: conv groups (``in_channels`` for a depthwise conv).
    """

    op: str
    rows: int
    in_channels: int
    out_channels: int
    height: int = 1
    width: int = 1
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def key(self) -> str:
        """A stable text key for an on-disk table."""
        return json.dumps(astuple(self))


class LayerTimer(Protocol):
    """What a backend's ``layer_timer()`` returns."""

    precision: str  # the kernels it times: "float32" or "int8"

    def seconds(self, shape: LayerShape) -> float:
        """Seconds one run of ``shape`` takes on this machine."""
        ...

    def compare(self, models: dict[str, fx.GraphModule], inputs: tuple[torch.Tensor, ...]) -> dict[str, float]:
        """Seconds per run of each whole IR, timed side by side."""
        ...

    def save(self) -> None:
        """Keep what was measured for the next call."""
        ...


def layer_shapes(gm: fx.GraphModule, batch: int) -> dict[str, LayerShape]:
    """Every aten.conv2d and aten.linear of ``gm`` (annotated) as run at ``batch``, by node name."""
    shapes = {}
    for node in gm.graph.nodes:
        name = ir.op_name(node) if node.op == "call_function" else ""
        source = node.args[0] if node.args else None
        input_shape = source.meta.get(meta.SHAPE) if isinstance(source, fx.Node) else None
        if name not in ("aten.conv2d", "aten.linear") or not input_shape:
            continue
        scale = batch / input_shape[0]
        weight = ir.tensor_of(gm, node.args[1])
        if weight is None:
            continue
        if name == "aten.linear":
            rows = max(1, round(math.prod(input_shape[:-1]) * scale))
            shapes[node.name] = LayerShape("linear", rows, int(weight.shape[1]), int(weight.shape[0]))
        elif len(input_shape) == 4:
            shapes[node.name] = _conv_shape(node, weight, input_shape, batch)
    return shapes


def _conv_shape(node: fx.Node, weight: torch.Tensor, input_shape: tuple, batch: int) -> LayerShape:
    arguments = list(node.args) + list(_CONV_DEFAULTS[len(node.args):])
    stride, padding, dilation, groups = (arguments[3], arguments[4], arguments[5], arguments[6])
    kernel = tuple(int(size) for size in weight.shape[2:])
    if isinstance(padding, str):  # "same" / "valid"
        padding = tuple(d * (k - 1) // 2 for d, k in zip(_pair(dilation), kernel, strict=True)) \
            if padding == "same" else (0, 0)
    return LayerShape("conv", batch, int(input_shape[1]), int(weight.shape[0]), int(input_shape[2]),
                      int(input_shape[3]), kernel, _pair(stride), _pair(padding), _pair(dilation), int(groups))


def _pair(value: object) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    values = tuple(int(item) for item in value)
    return values if len(values) == 2 else (values[0], values[0])


def predicted_seconds(gm: fx.GraphModule, timer: LayerTimer, batch: int) -> float:
    """Sum of the measured seconds of ``gm``'s conv and linear layers at ``batch`` (annotated IR)."""
    return sum(timer.seconds(shape) for shape in layer_shapes(gm, batch).values())
