"""What ONNX Runtime's QDQ selectors fuse into integer kernels, found in the IR.

ONNX Runtime's CPU provider rewrites ``DQ(x) -> Conv/Gemm(DQ(w), DQ(b)) [-> Relu/Clip] -> Q`` into
QLinearConv / QGemm and ``DQ(a) + DQ(b) [-> Relu/Clip] -> Q`` into QLinearAdd (a Gemm may also end
without Q, as a QGemm with float output). Its selectors refuse a group whose op has another
consumer, whose ReLU or Clip the quantiser does not make redundant, or any of whose inputs is not a
DQ (a float bias). :func:`find_groups` applies the same conditions to the IR, looking through the
ops that keep quantised values on their grid (reshapes, max-pooling, zero padding), so that the
emulation computes in integers exactly what the runtime computes in integers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from backends.onnxruntime.kernels import QParams
from compiler import ir
from compiler.quant_ops import DEQUANTIZE_PER_CHANNEL, QUANTIZE_DEQUANTIZE

logger = logging.getLogger(__name__)

_CONVOLUTIONS = frozenset({"aten.conv1d", "aten.conv2d"})
_RELUS = frozenset({"aten.relu", "aten.relu_"})
_CLIPS = frozenset({"aten.relu6", "aten.hardtanh", "aten.hardtanh_", "aten.clamp", "aten.clamp_"})
#: Ops that move values without arithmetic: a tensor on a quantisation grid stays on it.
_PASSTHROUGH = frozenset({
    "aten.view", "aten.reshape", "aten.flatten", "aten.max_pool2d", "aten.dropout", "aten.transpose",
    "aten.permute", "aten.squeeze", "aten.unsqueeze", "aten.contiguous", "aten.clone", "aten.alias",
})


def grid_of(node: fx.Node) -> QParams:
    """The grid of a ``quantize_dequantize`` node."""
    scale, zero_point, qmin, qmax = node.args[1:5]
    return QParams(float(scale), int(zero_point), int(qmin), int(qmax))


def bias_of(node: fx.Node) -> object:
    """A conv's or linear's bias argument (None when absent)."""
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


@dataclass(frozen=True)
class Group:
    """One integer kernel: its anchor op, input and output grids, and the nodes it absorbs.

    Attributes:
        kind: ``"conv"`` (QLinearConv), ``"gemm"`` (QGemm) or ``"add"`` (QLinearAdd).
        anchor: the conv, linear or add node.
        inputs: grids of the quantised activation inputs, in argument order.
        output: grid of the output quantiser; None for a QGemm with float output.
        absorbed: the redundant activation and the output quantiser, whose values the group yields.
    """

    kind: str
    anchor: fx.Node
    inputs: tuple[QParams, ...]
    output: QParams | None
    absorbed: tuple[fx.Node, ...]


def find_groups(gm: fx.GraphModule) -> list[Group]:
    """The conv, linear and add nodes that ONNX Runtime runs as integer kernels, with their grids."""
    groups = [group for node in gm.graph.nodes if (group := _group(node)) is not None]
    logger.debug("integer emulation: %d groups (%s)", len(groups), ", ".join(g.anchor.name for g in groups))
    return groups


def _group(node: fx.Node) -> Group | None:
    name = ir.op_name(node)
    if name in _CONVOLUTIONS or name == "aten.linear":
        return _weighted_group(node, "conv" if name in _CONVOLUTIONS else "gemm")
    if name == "aten.add" and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1:
        return _add_group(node)
    return None


def _weighted_group(node: fx.Node, kind: str) -> Group | None:
    source = _input_grid(node.args[0])
    bias = bias_of(node)
    if source is None or not _is_integer_dequantize(node.args[1], torch.int8):
        return None
    if bias is not None and not _is_integer_dequantize(bias, torch.int32):
        return None  # a float bias is not a DQ input: the selector refuses the group
    output = _output_quantiser(node)
    if output is not None:
        return Group(kind, node, (source,), output[0], output[1])
    if kind == "gemm" and _float_output(node):
        return Group(kind, node, (source,), None, ())
    return None


def _add_group(node: fx.Node) -> Group | None:
    grids = [_input_grid(arg) if isinstance(arg, fx.Node) else None for arg in node.args]
    output = _output_quantiser(node)
    if None in grids or output is None or len({grid.qmin for grid in (*grids, output[0])}) != 1:
        return None
    return Group("add", node, tuple(grids), output[0], output[1])


def _input_grid(value: object) -> QParams | None:
    """The grid of the quantiser feeding ``value``, looking through ops that keep values on it."""
    while isinstance(value, fx.Node) and value.target is not QUANTIZE_DEQUANTIZE:
        if not _keeps_grid(value):
            return None
        value = value.args[0]
    return grid_of(value) if isinstance(value, fx.Node) else None


def _keeps_grid(node: fx.Node) -> bool:
    name = ir.op_name(node)
    if name in ("aten.pad", "aten.constant_pad_nd"):
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        fill = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        return mode == "constant" and not fill  # pads with the zero point, as a fused QLinearConv does
    return name in _PASSTHROUGH


def _is_integer_dequantize(node: object, dtype: torch.dtype) -> bool:
    if not isinstance(node, fx.Node) or node.target is not DEQUANTIZE_PER_CHANNEL:
        return False
    integers = node.args[0]
    return (isinstance(integers, fx.Node) and integers.op == "get_attr"
            and ir.get_attribute(integers.graph.owning_module, integers.target).dtype == dtype)


def _output_quantiser(node: fx.Node) -> tuple[QParams, tuple[fx.Node, ...]] | None:
    """The quantiser ``node`` alone feeds, through at most one activation that the quantiser makes redundant."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.target is QUANTIZE_DEQUANTIZE:
        return grid_of(user), (user,)
    if not _is_activation(user) or len(user.users) != 1:
        return None
    quantiser = next(iter(user.users))
    if quantiser.target is not QUANTIZE_DEQUANTIZE or not _made_redundant(user, grid_of(quantiser)):
        return None
    return grid_of(quantiser), (user, quantiser)


def _float_output(node: fx.Node) -> bool:
    """A QGemm may write float when no quantiser reads the Gemm (a single ReLU/Clip reader must lead to one)."""
    users = list(node.users)
    if not users or any(user.target is QUANTIZE_DEQUANTIZE for user in users):
        return False
    return not (len(users) == 1 and _is_activation(users[0]))


def _is_activation(node: fx.Node) -> bool:
    return ir.op_name(node) in _RELUS | _CLIPS


def _made_redundant(activation: fx.Node, grid: QParams) -> bool:
    """Whether ONNX Runtime drops the ReLU / Clip before ``grid``'s quantiser.

    ReluQuantFusion drops a ReLU when the zero point is the lowest integer; ClipQuantFusion and the
    QDQ selectors drop a Clip whose range covers the quantiser's (within float32 epsilon, or once rounded).
    """
    if ir.op_name(activation) in _RELUS:
        return grid.zero_point == grid.qmin
    low, high = (np.float32(bound) for bound in _clip_bounds(activation))
    scale = np.float32(grid.scale)
    with np.errstate(over="ignore", invalid="ignore"):
        if np.rint(low / scale) + grid.zero_point <= grid.qmin and np.rint(high / scale) + grid.zero_point >= grid.qmax:
            return True
        lower = scale * np.float32(grid.qmin - grid.zero_point)
        upper = scale * np.float32(grid.qmax - grid.zero_point)
        epsilon = np.finfo(np.float32).eps
        return bool(low - lower <= epsilon and upper - high <= epsilon)


def _clip_bounds(node: fx.Node) -> tuple[float, float]:
    name = ir.op_name(node)
    if name == "aten.relu6":
        return 0.0, 6.0
    hardtanh = name.startswith("aten.hardtanh")
    keys = ("min_val", "max_val") if hardtanh else ("min", "max")
    defaults = (-1.0, 1.0) if hardtanh else (None, None)
    low, high = (node.args[index + 1] if len(node.args) > index + 1 else node.kwargs.get(key, default)
                 for index, (key, default) in enumerate(zip(keys, defaults, strict=True)))
    return (-np.inf if low is None else low), (np.inf if high is None else high)
