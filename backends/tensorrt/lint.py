"""A TensorRT Q/DQ placement linter for any QDQ ONNX model, and a summary of where the Q/DQs are.

TensorRT's explicit quantisation takes a model's QuantizeLinear/DequantizeLinear nodes as
orders: the hard rules (symmetric int8/fp8/int4, constant positive scales, per-channel only on
weights, an explicit axis) make the parser reject a model, and the placement recommendations
(both inputs of weighted ops quantised, no Q/DQ between a conv and what it fuses with, the skip
input of a residual add quantised, Add/pooling/Concat all-or-nothing with shared scales) decide
whether the engine runs in int8 or falls back to float with reformat layers. Each rule below
names the node at fault and what to change; :data:`RULES` lists them. Sources: the TensorRT
developer guide ("Explicit Quantization", "Q/DQ Layer-Placement Recommendations"), the
onnx-tensorrt Q/DQ importer and NVIDIA ModelOpt's ONNX placement.

:func:`placement_summary` counts the same facts (weighted ops quantised or float, residual adds,
float compute) so that our placement and NVIDIA ModelOpt's can be compared side by side.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from backends.tensorrt.graph_patterns import (
    CONVS,
    DEQUANTIZE,
    QDQ_OPS,
    QUANTIZE,
    QdqGraph,
    backbone,
    load_qdq_graph,
    residual_adds,
    weighted_inputs,
)

logger = logging.getLogger(__name__)

MODEL_NODE = "<model>"  # Finding.node of a rule about the whole model
MIN_OPSET = 13  # QuantizeLinear/DequantizeLinear's per-channel axis

RULES: Mapping[str, tuple[str, str]] = MappingProxyType({
    "TRT001": ("zero-point", "Q/DQ zero points must be constant zeros of INT8, FLOAT8E4M3FN or INT4 (no UINT8)."),
    "TRT002": ("scale", "Q/DQ scales must be constant, finite and greater than zero."),
    "TRT003": ("per-channel-activation", "Activations are quantised per tensor; per-channel scales are for weights."),
    "TRT004": ("missing-axis", "A per-channel Q/DQ sets axis explicitly (TensorRT defaults to 0, ONNX to 1)."),
    "TRT005": ("weighted-op-half-quantized", "Conv/ConvTranspose/Gemm/MatMul: quantise activation and weight, or "
                                             "neither."),
    "TRT006": ("qdq-on-conv-side", "No Q/DQ pair between a conv and the residual Add it fuses into."),
    "TRT007": ("float-skip", "A residual Add of a quantised conv has its skip input quantised."),
    "TRT008": ("half-quantized-op", "Add/AveragePool/GlobalAveragePool: all inputs and the output quantised, or "
                                    "none."),
    "TRT009": ("qdq-in-fusion-chain", "No Q/DQ inside a Conv-BatchNorm-activation chain; TensorRT fuses it."),
    "TRT010": ("concat-scales", "A Concat's quantised inputs and its output Q share one scale and zero point."),
    "TRT011": ("opset", f"A Q/DQ model imports default-domain opset {MIN_OPSET} or later."),
    "TRT012": ("qoperator", "Only QuantizeLinear/DequantizeLinear: no QLinear*, *Integer, QGemm or dynamic "
                            "quantisation ops."),
})

_ALLOWED_TYPES = {onnx.TensorProto.INT8: "INT8", onnx.TensorProto.FLOAT8E4M3FN: "FLOAT8E4M3FN",
                  onnx.TensorProto.INT4: "INT4"}
_QOPERATORS = frozenset({"ConvInteger", "MatMulInteger", "QGemm", "DynamicQuantizeLinear", "DynamicQuantizeMatMul",
                         "MatMulIntegerToFloat", "QAttention", "QEmbedLayerNormalization", "DynamicQuantizeLSTM"})
_ALL_OR_NOTHING = frozenset({"Add", "AveragePool", "GlobalAveragePool"})
_FUSED_ACTIVATIONS = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu",
                                "Selu", "Softplus", "Softsign", "ThresholdedRelu"})
# Data movement that TensorRT runs in whatever precision it is handed: not counted as float compute.
_LAYOUT_OPS = frozenset({"Constant", "Shape", "Size", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose",
                         "Identity", "Expand", "ConstantOfShape", "Range"})


@dataclasses.dataclass(frozen=True)
class Finding:
    """One broken rule at one node."""

    rule: str
    name: str
    node: str
    module_path: str | None
    message: str

    def to_dict(self) -> dict:
        """The finding as a JSON-able dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Context:
    """What the node rules read: the graph and its residual adds."""

    graph: QdqGraph
    residuals: dict[str, tuple[int, int, str]]


def lint_tensorrt(model: onnx.ModelProto | str | Path) -> list[Finding]:
    """Check a Q/DQ ONNX model against TensorRT's explicit-quantisation rules (:data:`RULES`).

    Args:
        model: An ONNX model or the path of one; a model given in memory is not modified.

    Returns:
        The findings in graph order, then by rule id (rules about the whole model first).

    Raises:
        ArtifactError: the file is missing or unreadable, or the model is not valid ONNX.
    """
    graph, proto, source = load_qdq_graph(model)
    context = _Context(graph, residual_adds(graph))
    findings = [Finding("TRT011", RULES["TRT011"][0], MODEL_NODE, None, message)
                for message in [_check_opset(proto, graph)] if message]
    for node in graph.nodes:
        for rule, check in _NODE_RULES:
            message = check(context, node)
            if message:
                findings.append(Finding(rule, RULES[rule][0], node.name, graph.module_path(node), message))
    logger.info("tensorrt lint of %s: %d finding(s) over %d nodes", source, len(findings), len(graph.nodes))
    return findings


def placement_summary(model: onnx.ModelProto | str | Path) -> dict:
    """Where a model's Q/DQs are, in counts to compare with another placement (NVIDIA ModelOpt's).

    ``float_islands`` counts compute nodes that run in float: neither Q/DQ nor layout ops (reshapes,
    transposes, shape arithmetic), with at least one non-constant input and none from a
    DequantizeLinear; ``components`` is how many connected regions they form. A ReLU that reads a
    conv's output counts although TensorRT fuses it: the count compares placements, it does not
    predict the engine.

    Raises:
        ArtifactError: the file is missing or unreadable, or the model is not valid ONNX.
    """
    graph = load_qdq_graph(model)[0]
    residuals = residual_adds(graph)
    weighted = [node for node in graph.nodes if weighted_inputs(graph, node) is not None]
    quantized = {id(node) for node in weighted if all(map(graph.is_dequantized, weighted_inputs(graph, node)))}
    return {
        "weighted_ops": len(weighted),
        "weighted_quantized": [_describe(graph, node) for node in weighted if id(node) in quantized],
        "weighted_float": [_describe(graph, node) for node in weighted if id(node) not in quantized],
        "residual_adds": len(residuals),
        "residual_skip_quantized": sum(graph.is_dequantized(graph.node(name).inputs[skip])
                                       for name, (_, skip, _) in residuals.items()),
        "residual_conv_side_quantized": sum(backbone(graph, graph.node(name).inputs[side])[1]
                                            for name, (side, _, _) in residuals.items()),
        "float_islands": _float_islands(graph),
        "qdq_pairs": sum(node.op == QUANTIZE and not graph.is_weight(node.inputs[0]) for node in graph.nodes),
        "qoperator_ops": sum(_is_qoperator(node) for node in graph.nodes),
    }


def _check_opset(proto: onnx.ModelProto, graph: QdqGraph) -> str | None:
    """TRT011: a Q/DQ model below opset 13 (a float model is left alone: it has no Q/DQ to place)."""
    versions = [entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")]
    if not versions or versions[0] >= MIN_OPSET or not any(node.op in QDQ_OPS for node in graph.nodes):
        return None
    return (f"the model imports default-domain opset {versions[0]}; Q/DQ's per-channel axis needs opset {MIN_OPSET} "
            "(NVIDIA ModelOpt uses 19 for int8): export with a newer opset.")


def _check_zero_point(context: _Context, node: gs.Node) -> str | None:
    """TRT001: symmetric quantisation with a constant all-zero INT8/FP8/INT4 zero point."""
    if node.op not in QDQ_OPS:
        return None
    graph = context.graph
    zero_point = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    if zero_point is not None and not graph.is_constant(zero_point):
        return (f"zero point {zero_point.name} is computed at run time; TensorRT needs a constant: make it an "
                "initializer.")
    element_type = graph.quantized_type(node)
    if element_type == onnx.TensorProto.INT32:
        return ("an int32 Q/DQ (a quantised bias) is not supported by TensorRT: keep the bias in float "
                "(onnxruntime: extra_options QuantizeBias=False).")
    if element_type is not None and element_type not in _ALLOWED_TYPES:
        missing = " (no zero point: ONNX then defaults to uint8)" if zero_point is None else ""
        return (f"{onnx.TensorProto.DataType.Name(element_type)} quantisation{missing}: TensorRT takes INT8, "
                "FLOAT8E4M3FN or INT4 (UINT8 only on DLA): give it an int8 zero point of 0.")
    values = graph.constant_values(zero_point)
    nonzero = [] if values is None else values.astype(np.float32)[values.astype(np.float32) != 0]
    if len(nonzero):
        return (f"the zero point is not all zeros ({nonzero[0]:g}); TensorRT is symmetric only: requantise with a "
                "zero point of 0.")
    return None


def _check_scale(context: _Context, node: gs.Node) -> str | None:
    """TRT002: a constant scale, all values finite and greater than zero."""
    if node.op not in QDQ_OPS:
        return None
    scale = node.inputs[1]
    values = context.graph.constant_values(scale)
    if values is None:
        return f"scale {scale.name} is computed at run time; TensorRT needs a constant: make it an initializer."
    values = values.astype(np.float64)
    bad = int(np.sum(~np.isfinite(values) | (values <= 0)))
    if bad:
        return (f"{bad} of the {values.size} scale value(s) are zero, negative or not finite: recalibrate, or clamp "
                "the scales to a small positive minimum.")
    return None


def _scale_size(context: _Context, node: gs.Node) -> int:
    values = context.graph.constant_values(node.inputs[1]) if node.op in QDQ_OPS else None
    return 0 if values is None else int(values.size)


def _check_per_channel_activation(context: _Context, node: gs.Node) -> str | None:
    """TRT003: per-channel (more than one scale) Q/DQ on an activation."""
    if _scale_size(context, node) <= 1 or context.graph.is_weight(node.inputs[0]):
        return None
    return (f"{node.inputs[0].name} is an activation quantised per channel ({_scale_size(context, node)} scales); "
            "TensorRT quantises activations per tensor: use one scale.")


def _check_axis(context: _Context, node: gs.Node) -> str | None:
    """TRT004: a per-channel Q/DQ relying on the default axis."""
    if _scale_size(context, node) <= 1 or "axis" in node.attrs:
        return None
    return ("a per-channel Q/DQ without an axis attribute: TensorRT reads axis 0, ONNX axis 1: set axis "
            "explicitly (Conv/Gemm weights 0, ConvTranspose 1, MatMul [K, N] weights 1).")


def _check_weighted(context: _Context, node: gs.Node) -> str | None:
    """TRT005: a weighted op with its activation or its weight quantised, not both."""
    inputs = weighted_inputs(context.graph, node)
    if inputs is None:
        return None
    activation, weight = (context.graph.is_dequantized(tensor) for tensor in inputs)
    if activation == weight:
        return None
    done, missing = ("weight", "activation") if weight else ("activation", "weight")
    return (f"its {done} is quantised but its {missing} {inputs[1 if weight else 0].name} is float, so TensorRT "
            f"runs it in float: add a Q/DQ pair on the {missing}, or remove the one on the {done}.")


def _check_conv_side(context: _Context, node: gs.Node) -> str | None:
    """TRT006: a Q/DQ pair between a residual add and its backbone conv."""
    if node.name not in context.residuals:
        return None
    conv_side, _, conv = context.residuals[node.name]
    if not backbone(context.graph, node.inputs[conv_side])[1]:
        return None
    return (f"input {conv_side} comes from conv {conv} through a Q/DQ pair, which splits TensorRT's Conv+Add "
            "fusion: remove that pair and quantise only the skip input.")


def _check_float_skip(context: _Context, node: gs.Node) -> str | None:
    """TRT007: a quantised conv's residual add whose skip input is float."""
    if node.name not in context.residuals:
        return None
    _, skip, conv = context.residuals[node.name]
    graph = context.graph
    if not graph.is_dequantized(graph.node(conv).inputs[0]) or graph.is_dequantized(node.inputs[skip]):
        return None
    return (f"conv {conv} is quantised but the skip input {node.inputs[skip].name} is float, so the fused "
            "Conv+Add stays float: add a Q/DQ pair on the skip input (int8 residual).")


def _check_all_or_nothing(context: _Context, node: gs.Node) -> str | None:
    """TRT008: a non-commuting op (Add, AveragePool) partly quantised, or quantised without its output."""
    graph = context.graph
    if node.op not in _ALL_OR_NOTHING or node.name in context.residuals:
        return None
    inputs = [tensor for tensor in node.inputs if not tensor.is_empty() and not graph.is_constant(tensor)]
    quantized = [tensor.name for tensor in inputs if graph.is_dequantized(tensor)]
    if not quantized:
        return None
    if len(quantized) < len(inputs):
        floats = [tensor.name for tensor in inputs if tensor.name not in quantized]
        return (f"inputs {', '.join(quantized)} are quantised but {', '.join(floats)} float, so TensorRT runs it "
                "in float: quantise every input and the output, or drop the input Q/DQs.")
    if any(consumer.op == QUANTIZE for output in node.outputs for consumer in output.outputs):
        return None
    return ("its inputs are quantised but its output is not, so TensorRT runs it in float: add a Q/DQ on the "
            "output, or drop the input Q/DQs.")


def _check_fusion_chain(context: _Context, node: gs.Node) -> str | None:
    """TRT009: a Q/DQ pair between a conv and its BatchNorm, or a conv/BatchNorm and its activation."""
    graph = context.graph
    source = graph.producer(node.inputs[0]) if node.op == QUANTIZE else None
    if source is None or source.op not in CONVS | {"BatchNormalization"}:
        return None
    targets = [consumer for dequantize in node.outputs[0].outputs if dequantize.op == DEQUANTIZE
               for output in dequantize.outputs for consumer in output.outputs]
    for target in targets:
        if target.op in _FUSED_ACTIVATIONS or (target.op == "BatchNormalization" and source.op in CONVS):
            fix = "fold the BatchNorm into the conv" if target.op == "BatchNormalization" else \
                "quantise after the activation instead"
            return (f"a Q/DQ pair between {source.op} {source.name} and {target.op} {target.name}, which TensorRT "
                    f"fuses: remove the pair ({fix}).")
    return None


def _qparams(graph: QdqGraph, node: gs.Node) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(scale, zero point) values of a Q or DQ, None when the scale is not constant."""
    scale = graph.constant_values(node.inputs[1])
    zero_point = graph.constant_values(node.inputs[2]) if len(node.inputs) > 2 else None
    if scale is None:
        return None
    zeros = (0.0,) if zero_point is None else tuple(zero_point.astype(np.float64).ravel())
    return tuple(scale.astype(np.float64).ravel()), zeros


def _check_concat(context: _Context, node: gs.Node) -> str | None:
    """TRT010: a Concat whose quantised inputs and output Q do not share one scale and zero point."""
    if node.op != "Concat":
        return None
    graph = context.graph
    quantizers = [graph.dequantizer(tensor) for tensor in node.inputs if graph.is_dequantized(tensor)]
    quantizers += [consumer for consumer in node.outputs[0].outputs if consumer.op == QUANTIZE]
    params = [_qparams(graph, quantizer) for quantizer in quantizers]
    if None in params or len(set(params)) <= 1:
        return None
    scales = sorted({f"{values[0][0]:.4g}" + ("..." if len(values[0]) > 1 else "") for values in params})
    return (f"its quantised inputs and output use {len(set(params))} different scales/zero points "
            f"({', '.join(scales)}), so TensorRT keeps requantising layers: give them one shared scale (e.g. the "
            "output's).")


def _is_qoperator(node: gs.Node) -> bool:
    return node.op.startswith("QLinear") or node.op in _QOPERATORS


def _check_qoperator(context: _Context, node: gs.Node) -> str | None:
    """TRT012: a QOperator-format op, which TensorRT's parser does not import."""
    if not _is_qoperator(node):
        return None
    return (f"{node.op} is a QOperator-format op that TensorRT does not import: quantise in QDQ format "
            "(QuantizeLinear/DequantizeLinear around float ops) instead.")


_NODE_RULES: tuple[tuple[str, Callable[[_Context, gs.Node], str | None]], ...] = (
    ("TRT001", _check_zero_point),
    ("TRT002", _check_scale),
    ("TRT003", _check_per_channel_activation),
    ("TRT004", _check_axis),
    ("TRT005", _check_weighted),
    ("TRT006", _check_conv_side),
    ("TRT007", _check_float_skip),
    ("TRT008", _check_all_or_nothing),
    ("TRT009", _check_fusion_chain),
    ("TRT010", _check_concat),
    ("TRT012", _check_qoperator),
)


def _describe(graph: QdqGraph, node: gs.Node) -> dict:
    return {"node": node.name, "op": node.op, "module_path": graph.module_path(node)}


def _runs_in_float(graph: QdqGraph, node: gs.Node) -> bool:
    """A compute node with a non-constant input and none from a DequantizeLinear."""
    if node.op in QDQ_OPS or node.op in _LAYOUT_OPS:
        return False
    inputs = [tensor for tensor in node.inputs if not tensor.is_empty() and not graph.is_constant(tensor)]
    return bool(inputs) and not any(graph.is_dequantized(tensor) for tensor in inputs)


def _float_islands(graph: QdqGraph) -> dict:
    """Compute nodes that run in float: how many, of which op types, in how many connected regions."""
    floating = [index for index, node in enumerate(graph.nodes) if _runs_in_float(graph, node)]
    op_types = Counter(graph.nodes[index].op for index in floating)
    return {"nodes": len(floating), "components": nx.number_weakly_connected_components(graph.dag.subgraph(floating)),
            "op_types": dict(sorted(op_types.items()))}

