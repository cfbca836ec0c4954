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
}
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
        activation_dtype: ``"uint8"`` or ``"int8"``.
        activation_symmetric: symmetric activation grids, ``max|x| / 127 * [-127, 127]`` around the
            middle zero point (0 for int8), as TensorRT wants; otherwise an affine grid over the
            calibrated range (ONNX Runtime's CPU kernels take either).
        weight_bits: 8, or 7 to keep u8 x s8 products clear of int16 saturation on CPUs without VNNI.
        depthwise_weight_bits: for depthwise convolutions, whose kernels accumulate in int32 (8 here).
        quantize_model_outputs: quantise tensors that are model outputs (off: logits stay exact
            float from the last integer kernel).
    """

    name: str
    weighted_ops: frozenset[str] = frozenset(WEIGHTED)
    integer_ops: frozenset[str] = frozenset({
        "aten.add", "aten.add_", "aten.cat", "aten.adaptive_avg_pool2d", "aten.avg_pool2d",
    })
    passthrough_ops: frozenset[str] = PASSTHROUGH
    fused_activations: frozenset[str] = FUSED_ACTIVATIONS
    float_ops: frozenset[str] = FLOAT_BY_DEFAULT
    float_modules: tuple[str, ...] = ()
    activation_dtype: str = "uint8"
    activation_symmetric: bool = False
    weight_bits: int = 8
    depthwise_weight_bits: int = 8
    quantize_model_outputs: bool = False

    def __post_init__(self):
        if self.activation_dtype not in ("uint8", "int8"):
            raise TargetError(f"policy {self.name!r}: activation_dtype must be 'uint8' or 'int8', "
                              f"got {self.activation_dtype!r}")
        if not isinstance(self.activation_symmetric, bool):
            raise TargetError(f"policy {self.name!r}: activation_symmetric must be true or false, "
                              f"got {self.activation_symmetric!r}")
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
        """Whether an override (op type, module path) or an analysis (``QUANT_DECISION``) keeps ``node`` in float."""
        if ir.op_name(node) in self.float_ops or meta.QUANT_DECISION in node.meta:
            return True
        path = ir.module_path(node)
        return any(fnmatch.fnmatchcase(path, pattern) or path == pattern for pattern in self.float_modules)

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
        if name in self.integer_ops and _float_tensor_inputs(node, INTEGER[name]) and self._feeds_integer(node):
            return "integer"
        return None

    def _feeds_integer(self, node: fx.Node) -> bool:
        """Every reader, through pass-through ops and fused activations, is a conv, linear or integer op.

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
            elif name not in self.weighted_ops and name not in self.integer_ops or self.keeps_float(reader):
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for the ledger and the manifest."""
        return {
            "name": self.name, "weighted_ops": sorted(self.weighted_ops), "integer_ops": sorted(self.integer_ops),
            "float_ops": sorted(self.float_ops), "float_modules": list(self.float_modules),
            "activation_dtype": self.activation_dtype, "activation_symmetric": self.activation_symmetric,
            "weight_bits": self.weight_bits,
            "depthwise_weight_bits": self.depthwise_weight_bits,
            "quantize_model_outputs": self.quantize_model_outputs,
        }


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
