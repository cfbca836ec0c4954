"""Placement policies: which ops a backend runs on integers, handed to the quantisation passes as data.

This module is the vocabulary (the policy type and the quantisation rule of each ATen op); each
backend builds its own policy from it (ONNX Runtime's: :mod:`backends.onnxruntime.policy`) and the
driver hands it to the passes through the pass context, so passes never import a backend.

A policy says, per ATen op, what the runtime fuses into an integer kernel and so where quantise /
dequantise pairs must go:

* ``weighted``: ops with a constant weight (conv, linear). Their activation input and their output
  are quantised; the weight is quantised per output channel, symmetric.
* ``integer``: ops the runtime runs on integers when every float input comes through a
  dequantise and the output goes into a quantise (residual ``add``, ``cat``, pooling).
* ``passthrough``: ops that move or pad values without arithmetic (reshape, pad, max-pool). A
  quantised input stays quantised through them, with the same parameters, and is looked through
  when placing the input quantiser of the integer op behind them.
* ``fused_activations``: activations the runtime folds into the quantiser that follows them
  (ReLU, ReLU6), so the output quantiser of a conv goes after its activation.
* ``float``: numerically fragile ops that stay in float by default (LayerNorm, Softmax, GELU).

Users override per op type (``float_ops``) and per module path (``float_modules``: a path or a
prefix ending in ``.*``); both keep the op in float.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx

from compiler import ir, meta
from compiler.errors import TargetError

aten = torch.ops.aten

#: Weighted ops: op name -> (index of the activation input, index of the weight, weight channel axis).
WEIGHTED = {
    "aten.conv1d": (0, 1, 0), "aten.conv2d": (0, 1, 0), "aten.conv3d": (0, 1, 0), "aten.linear": (0, 1, 0),
    "aten.conv_transpose2d": (0, 1, 1),  # weight [in, out / groups, kh, kw]: output channels on axis 1
}
#: The weighted ops ONNX Runtime's CPU provider fuses into integer kernels (policies default to these).
CONV_LINEAR = frozenset({"aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.linear"})
#: Integer ops without weights: op name -> indices of the tensor inputs to quantise.
INTEGER = {
    "aten.add": (0, 1), "aten.add_": (0, 1), "aten.cat": (0,), "aten.adaptive_avg_pool2d": (0,),
    "aten.avg_pool2d": (0,), "aten.mean": (0,), "aten.matmul": (0, 1), "aten.mul": (0, 1),
}
PASSTHROUGH = frozenset({
    "aten.pad", "aten.constant_pad_nd", "aten.view", "aten.reshape", "aten.flatten", "aten.max_pool2d",
    "aten.dropout", "aten.transpose", "aten.permute", "aten.squeeze", "aten.unsqueeze", "aten.contiguous",
    "aten.clone", "aten.alias",
})
# In-place forms too: torchvision's ``ReLU(inplace=True)`` and ``out += identity`` trace to them.
FUSED_ACTIVATIONS = frozenset({
    "aten.relu", "aten.relu_", "aten.relu6", "aten.hardtanh", "aten.hardtanh_", "aten.clamp", "aten.clamp_",
})
FLOAT_BY_DEFAULT = frozenset({
    "aten.layer_norm", "aten.softmax", "aten.gelu", "aten._softmax", "aten.native_layer_norm",
})


@dataclass(frozen=True)
class QuantPolicy:
    """What the runtime runs on integers, and the user's overrides.

    Attributes:
        name: the policy's name, for the ledger.
        weighted_ops: op names whose weight and activation input are quantised.
        integer_ops: op names run on integers when their inputs and output are quantised.
        passthrough_ops: op names a quantised tensor passes through unchanged.
        fused_activations: activations folded into the following quantiser.
        float_ops: op names kept in float (overrides ``weighted_ops`` and ``integer_ops``).
        float_modules: module paths (``fnmatch`` patterns such as ``"encoder.layer.5.*"``) kept in float.
        float_prefix: the first this many weighted ops (convs, linears) in graph order kept in float:
            next to a float input they need no layout change but the one quantiser after them, so
            they are the cheapest layers to spare (a model's first layers are often its most
            sensitive too).
        activation_dtype: ``"uint8"`` or ``"int8"``.
        activation_symmetric: symmetric activation grids, ``max|x| / 127 * [-127, 127]`` around the
            middle zero point (0 for int8), as TensorRT wants; otherwise an affine grid over the
            calibrated range (ONNX Runtime's CPU kernels take either).
        weight_bits: 8, or 7 to keep u8 x s8 products clear of int16 saturation on CPUs without VNNI.
        depthwise_weight_bits: for depthwise convolutions, whose kernels accumulate in int32 (8 here).
        quantize_model_outputs: quantise tensors that are model outputs (off: logits stay exact
            float from the last integer kernel).
        quantize_weighted_outputs: quantise the output of conv and linear ops (ONNX Runtime's integer
            kernels write integers); off for TensorRT, whose kernels write float unless a quantised
            consumer follows and which fuses the next quantiser itself.
        residual_skip_only: at a residual add (one input from a quantised conv, see
            :func:`residual_inputs`), quantise only the other (skip) input, so that TensorRT fuses the
            add into the conv with an int8 residual; off: the add is an integer op like any other.
        quantize_bias: store biases as int32 on the input-times-weight grid (ONNX Runtime); off: float.
        min_gemm_channels: weighted ops with fewer input or output channels than this stay float
            (TensorRT has no int8 kernels for them; the conv exceptions follow ModelOpt's int8 rule).
        share_concat_scale: every quantised input of a concat and its output share one range.
    """

    name: str
    weighted_ops: frozenset[str] = CONV_LINEAR
    integer_ops: frozenset[str] = frozenset({
        "aten.add", "aten.add_", "aten.cat", "aten.adaptive_avg_pool2d", "aten.avg_pool2d",
    })
    passthrough_ops: frozenset[str] = PASSTHROUGH
    fused_activations: frozenset[str] = FUSED_ACTIVATIONS
    float_ops: frozenset[str] = FLOAT_BY_DEFAULT
    float_modules: tuple[str, ...] = ()
    float_prefix: int = 0
    activation_dtype: str = "uint8"
    activation_symmetric: bool = False
    weight_bits: int = 8
    depthwise_weight_bits: int = 8
    quantize_model_outputs: bool = False
    quantize_weighted_outputs: bool = True
    residual_skip_only: bool = False
    quantize_bias: bool = True
    min_gemm_channels: int = 0
    share_concat_scale: bool = False

    def __post_init__(self):
        if self.activation_dtype not in ("uint8", "int8"):
            raise TargetError(f"policy {self.name!r}: activation_dtype must be 'uint8' or 'int8', "
                              f"got {self.activation_dtype!r}")
        for key in ("activation_symmetric", "quantize_model_outputs", "quantize_weighted_outputs",
                    "residual_skip_only", "quantize_bias", "share_concat_scale"):
            if not isinstance(getattr(self, key), bool):
                raise TargetError(f"policy {self.name!r}: {key} must be true or false, got {getattr(self, key)!r}")
        for key in ("min_gemm_channels", "float_prefix"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise TargetError(f"policy {self.name!r}: {key} must be an integer >= 0, got {value!r}")
        for key in ("weight_bits", "depthwise_weight_bits"):
            if getattr(self, key) not in (7, 8):
                raise TargetError(f"policy {self.name!r}: {key} must be 7 or 8, got {getattr(self, key)!r}")
        unknown = sorted(set(self.weighted_ops) - set(WEIGHTED)) + sorted(set(self.integer_ops) - set(INTEGER))
        if unknown:
            raise TargetError(f"policy {self.name!r}: no quantisation rule for {', '.join(unknown)}; "
                              f"known: {', '.join(sorted({**WEIGHTED, **INTEGER}))}")

    @property
    def activation_range(self) -> tuple[int, int]:
        """(qmin, qmax) of quantised activations."""
        return (0, 255) if self.activation_dtype == "uint8" else (-128, 127)

    @property
    def weight_max(self) -> int:
        """The largest weight magnitude in integer steps (127, or 63 for 7-bit weights)."""
        return 2 ** (self.weight_bits - 1) - 1

    def keeps_float(self, node: fx.Node) -> bool:
        """Whether an override (op type, module path), an analysis or the op's size keeps ``node`` in float."""
        return self.float_reason(node) is not None

    def float_reason(self, node: fx.Node) -> str | None:
        """Why ``node`` stays in float (for the ledger), or None when nothing keeps it there."""
        name = ir.op_name(node)
        if name in self.float_ops:
            return f"{name} is kept in float by policy {self.name!r}"
        if meta.QUANT_DECISION in node.meta:
            return str(node.meta[meta.QUANT_DECISION])
        path = ir.module_path(node)
        matched = next((pattern for pattern in self.float_modules
                        if fnmatch.fnmatchcase(path, pattern) or path == pattern), None)
        if matched is not None:
            return f"module path matches float_modules pattern {matched!r}"
        if self.float_prefix and name in self.weighted_ops and weighted_position(node, self, self.float_prefix) \
                < self.float_prefix:
            return f"among the first {self.float_prefix} weighted ops in graph order (float_prefix)"
        if self.min_gemm_channels and name in WEIGHTED:
            return small_channels(node, self.min_gemm_channels)
        return None

    def role(self, node: fx.Node) -> str | None:
        """``"weighted"``, ``"integer"``, ``"passthrough"``, ``"activation"`` or None (float)."""
        if node.op != "call_function":
            return None
        name = ir.op_name(node)
        if name in self.passthrough_ops:
            return "passthrough"
        if name in self.fused_activations:
            return "activation"
        if self.keeps_float(node):
            return None
        if name in self.weighted_ops and _has_constant_weight(node):
            return "weighted"
        if name not in self.integer_ops or not _float_tensor_inputs(node, INTEGER[name]):
            return None
        if self.residual_skip_only and self.residual_inputs(node) is not None:
            return "residual"
        return "integer" if self._feeds_integer(node) else None

    def residual_inputs(self, node: fx.Node) -> tuple[int, int] | None:
        """(conv-side input index, skip input index) of a residual add whose conv this policy quantises, else None."""
        found = residual_inputs(node)
        if found is None or self.role(conv_backbone(node.args[found[0]])) != "weighted":
            return None
        return found

    def _feeds_integer(self, node: fx.Node) -> bool:
        """Every reader, through pass-through ops and fused activations, runs on integers (conv, linear, integer op).

        A weightless op (add, concat, pooling) is worth running on integers only inside an integer
        region: an add whose result goes to a float op (a LayerNorm after a residual add, the
        Softmax after adding an attention mask of -3.4e38) stays float.
        """
        readers, seen = list(node.users), set()
        if not readers:
            return False
        while readers:
            reader = readers.pop()
            if reader in seen:
                continue
            seen.add(reader)
            name = ir.op_name(reader)
            if name in self.passthrough_ops or name in self.fused_activations:
                readers.extend(reader.users)
            elif self.role(reader) not in ("weighted", "integer", "residual"):
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for the ledger and the manifest."""
        return {
            "name": self.name, "weighted_ops": sorted(self.weighted_ops), "integer_ops": sorted(self.integer_ops),
            "float_ops": sorted(self.float_ops), "float_modules": list(self.float_modules),
            "float_prefix": self.float_prefix,
            "activation_dtype": self.activation_dtype, "activation_symmetric": self.activation_symmetric,
            "weight_bits": self.weight_bits,
            "depthwise_weight_bits": self.depthwise_weight_bits,
            "quantize_model_outputs": self.quantize_model_outputs,
            "quantize_weighted_outputs": self.quantize_weighted_outputs,
            "residual_skip_only": self.residual_skip_only, "quantize_bias": self.quantize_bias,
            "min_gemm_channels": self.min_gemm_channels, "share_concat_scale": self.share_concat_scale,
        }


_CONVS = frozenset({"aten.conv1d", "aten.conv2d", "aten.conv3d"})
_ADDS = frozenset({"aten.add", "aten.add_"})


def weighted_position(node: fx.Node, policy: QuantPolicy, limit: int) -> int:
    """How many of ``policy``'s weighted ops come before ``node`` in its graph's order, counted up to ``limit``.

    The walk stops at ``limit``, so asking about every node of a large graph stays linear in the prefix.
    """
    position = 0
    for other in node.graph.nodes:
        if other is node or position >= limit:
            return position
        if other.op == "call_function" and ir.op_name(other) in policy.weighted_ops:
            position += 1
    return position


def conv_backbone(value: object) -> fx.Node | None:
    """The convolution whose output ``value`` is, directly or through single-reader fused activations."""
    while isinstance(value, fx.Node) and value.op == "call_function":
        name = ir.op_name(value)
        if name in _CONVS:
            return value
        if name not in FUSED_ACTIVATIONS or not isinstance(value.args[0], fx.Node) or len(value.args[0].users) != 1:
            return None
        value = value.args[0]
    return None


def residual_inputs(node: fx.Node) -> tuple[int, int] | None:
    """(conv-side index, skip index) when ``node`` is a residual add, as TensorRT fuses it into a conv.

    A residual add sums two tensors, at least one the output of a convolution (its backbone). With
    one backbone, that input is the conv side, unless the other input descends from the backbone
    itself (a conv whose output also feeds a side branch: no fusion). With two, the conv side is
    the input on the longer path from the inputs' lowest common ancestor, input 0 on a tie. The
    same definition as the TensorRT placement linter's (:mod:`backends.tensorrt.lint`) and
    NVIDIA ModelOpt's ``build_non_residual_input_map``.
    """
    if ir.op_name(node) not in _ADDS or len(node.args) < 2:
        return None
    inputs = node.args[:2]
    if not all(isinstance(value, fx.Node) for value in inputs):
        return None
    backbones = [conv_backbone(value) for value in inputs]
    if backbones[0] is None and backbones[1] is None:
        return None
    if backbones[0] is not None and backbones[1] is not None:
        if backbones[0] is backbones[1]:
            return None
        depths = _depths_from_common_ancestor(inputs[0], inputs[1])
        conv_side = 0 if depths is None or depths[0] >= depths[1] else 1
        return conv_side, 1 - conv_side
    conv_side = 0 if backbones[0] is not None else 1
    if backbones[conv_side] in _ancestors(inputs[1 - conv_side]) | {inputs[1 - conv_side]}:
        return None
    return conv_side, 1 - conv_side


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _depths_from_common_ancestor(first: fx.Node, second: fx.Node) -> tuple[int, int] | None:
    """Longest path lengths (in nodes) to ``first`` and ``second`` from their lowest common ancestor."""
    ancestors = [_ancestors(first) | {first}, _ancestors(second) | {second}]
    common = ancestors[0] & ancestors[1]
    if not common:
        return None
    order = {node: index for index, node in enumerate(first.graph.nodes)}
    lowest = max(common, key=order.__getitem__)
    return _longest_path(lowest, first, ancestors[0], order), _longest_path(lowest, second, ancestors[1], order)


def _longest_path(start: fx.Node, end: fx.Node, region: set[fx.Node], order: dict[fx.Node, int]) -> int:
    """Edges on the longest path from ``start`` to ``end`` through ``region`` (a DAG in graph order)."""
    depth = {start: 0}
    for node in sorted(region, key=order.__getitem__):
        reachable = [depth[parent] for parent in node.all_input_nodes if parent in depth]
        if node is not start and reachable:
            depth[node] = max(reachable) + 1
    return depth.get(end, 0)


def small_channels(node: fx.Node, minimum: int) -> str | None:
    """Why a conv or linear is too narrow for int8 kernels (NVIDIA ModelOpt's int8 rule), or None.

    Linear: fewer than ``minimum`` input or output features. Conv: fewer than ``minimum`` input
    (per group) or output channels, except a dense conv with a square kernel whose channel count
    is a multiple of 8 and that is either the first layer or has ``minimum`` channels on one side,
    and a grouped conv with a multiple of 8 output channels and kernels of at least 3.
    """
    weight = node.args[WEIGHTED[ir.op_name(node)][1]] if len(node.args) > 1 else None
    value = weight.meta.get(meta.VAL) if isinstance(weight, fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return None
    groups = node.args[6] if len(node.args) > 6 and ir.op_name(node) != "aten.linear" else 1
    outputs, inputs = int(value.shape[0]), int(value.shape[1])
    if ir.op_name(node) == "aten.conv_transpose2d":  # [in, out / groups, ...]
        outputs, inputs = int(value.shape[1]) * groups, int(value.shape[0]) // groups
    if outputs >= minimum and inputs >= minimum:
        return None
    why = f"{inputs} input / {outputs} output channels, under the {minimum} of the int8 kernels"
    if ir.op_name(node) == "aten.linear":
        return why
    kernel = tuple(value.shape[2:])
    if groups == 1:
        first = isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder"
        if ((outputs % 8 == 0 or inputs % 8 == 0) and (first or max(outputs, inputs) >= minimum)
                and len(set(kernel)) <= 1):
            return None
    elif outputs % 8 == 0 and all(size >= 3 for size in kernel):
        return None
    return why


def _has_constant_weight(node: fx.Node) -> bool:
    index = WEIGHTED[ir.op_name(node)][1]
    return len(node.args) > index and isinstance(node.args[index], fx.Node) and node.args[index].op == "get_attr"


def _float_tensor_inputs(node: fx.Node, indices: tuple[int, ...]) -> bool:
    """Every listed input is a float tensor produced by a node (not a Python scalar)."""
    for index in indices:
        value = node.args[index] if index < len(node.args) else None
        if node.target is aten.cat.default and index == 0:
            values = list(value or [])
        else:
            values = [value]
        if not values or not all(isinstance(v, fx.Node) and _is_float(v) for v in values):
            return False
    return True


def _is_float(node: fx.Node) -> bool:
    value = node.meta.get(meta.VAL)
    return isinstance(value, torch.Tensor) and value.dtype.is_floating_point


def with_fields(base: QuantPolicy, fields: Mapping[str, Any]) -> QuantPolicy:
    """``base`` with ``fields`` replaced; op names may omit ``aten.``, unknown fields raise TargetError."""
    fields = dict(fields)
    known = set(QuantPolicy.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TargetError(
            f"quantisation policy has no field(s) {', '.join(unknown)}; fields: {', '.join(sorted(known))}"
        )
    for key in ("weighted_ops", "integer_ops", "passthrough_ops", "fused_activations", "float_ops"):
        if key in fields:
            fields[key] = frozenset(_op_names(fields[key]))
    if "float_modules" in fields:
        fields["float_modules"] = tuple(fields["float_modules"])
    return replace(base, **fields)


def _op_names(values: object) -> list[str]:
    """Accept ``"layer_norm"`` or ``"aten.layer_norm"``."""
    if isinstance(values, str):
        values = [values]
    return [value if "." in value else f"aten.{value}" for value in values]
