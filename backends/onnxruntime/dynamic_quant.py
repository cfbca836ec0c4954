"""Dynamic int8 quantisation of Linear layers for ONNX Runtime's CPU provider.

Every MatMul (or Gemm) whose B input is a constant 2-D float initializer (a Linear's weight) becomes
``com.microsoft.DynamicQuantizeMatMul(A, B_int8, b_scale[N], b_zero_point[N], bias[N])``: ONNX
Runtime quantises the activation ``A`` to uint8 per tensor at run time and multiplies it with int8
weights quantised here per output column, symmetrically (zero points 0, ``scale = absmax / qmax``).
Activation x activation MatMuls (attention scores) and Gathers (embeddings) stay in float. A bias
``Add`` of a constant 1-D initializer after the MatMul folds into the ``bias`` input.

Weight bits (see ``backends.onnxruntime.isa``):

* 8 bits (``qmax = 127``) where the CPU has VNNI, whose u8 x s8 products accumulate in int32.
* 7 bits (``qmax = 63``) elsewhere on x86: ``vpmaddubsw`` adds pairs of u8 x s8 products into int16
  with saturation, and ``2 * 255 * 63 < 32768`` keeps the pair sums exact.
* **GELU rule**: 8 bits even without VNNI when ``A`` is produced by a GELU (a ``Gelu`` op or the
  erf pattern ``x * 0.5 * (1 + erf(x / sqrt(2)))``), i.e. a transformer's FFN output dense. GELU
  outputs lie in ``[-0.17, inf)`` with most mass near zero, so after per-tensor uint8 quantisation
  the codes of neighbouring elements are small and pair sums stay far below int16 saturation
  (measured saturation-free on all-MiniLM-L6-v2), while the FFN output dense is where 7-bit weights
  cost the most accuracy. The rule rests on that distribution, not on a bound: GELU outputs spread
  evenly over their range (e.g. an untrained network's) can saturate without VNNI, which the
  compile-time check against eager then reports as an AccuracyError.

Linears that share the same ``A`` (a transformer's Q, K and V projections) share one activation
quantisation: ``DynamicQuantizeLinear(A)`` feeds one ``com.microsoft.MatMulIntegerToFloat`` per
Linear (the structure ONNX Runtime's own ``quantize_dynamic`` ends with), bit-identical to separate
DynamicQuantizeMatMuls, which would each quantise ``A`` again. An earlier form, one
DynamicQuantizeMatMul on the concatenated weights followed by a ``Split``, spent about 60-80 us
per layer in the ``Split`` at batch 1 on all-MiniLM-L6-v2 and measured 2-4% slower overall.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnxscript import ir
from onnxscript.ir.passes.common import RemoveUnusedNodesPass

from backends.onnxruntime.isa import Int8Format

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
GELU_WEIGHT_BITS = 8
_GELU_OPS = {("", "Gelu"), (MS_DOMAIN, "Gelu"), (MS_DOMAIN, "FastGelu"), (MS_DOMAIN, "BiasGelu")}
_GELU_ARITHMETIC = {"Mul", "Add", "Div"}  # what sits between the Erf and the GELU's output
_GELU_DEPTH = 3  # Mul(x, Mul(0.5, Add(1, Erf(...)))): the Erf is three producers above the output


@dataclass
class _Linear:
    """One Linear layer found in the graph: the nodes it replaces and its float parameters."""

    nodes: list[ir.Node]  # the MatMul/Gemm, and the folded bias Add if any
    a: ir.Value
    weight: np.ndarray  # [K, N] float32
    bias: np.ndarray | None  # [N] float32
    output: ir.Value  # the value the quantised node's output replaces
    bits: int
    gelu_fed: bool

    @property
    def name(self) -> str:
        return self.nodes[0].name or self.output.name or "linear"


def quantize_dynamic_linears(
    model: onnx.ModelProto, isa_format: Int8Format, *, fuse_shared_input: bool = True,
) -> tuple[onnx.ModelProto, dict]:
    """Rewrite the Linear layers of ``model`` to dynamically quantised int8 GEMMs with per-column weights.

    Args:
        model: an ONNX model (not modified).
        isa_format: the CPU's int8 format; ``weight_bits`` 8 (VNNI) or 7 (no VNNI).
        fuse_shared_input: Linears reading the same activation share one DynamicQuantizeLinear, each
            then a MatMulIntegerToFloat (else each is its own DynamicQuantizeMatMul).

    Returns:
        The rewritten model (``model`` itself when it has no Linear layer) and statistics for the
        ledger: how many Linears, nodes, fused groups and folded biases, and the weight bits used.
    """
    ir_model = ir.from_proto(model)
    graph = ir_model.graph
    linears = [linear for node in graph if (linear := _match_linear(node, isa_format.weight_bits)) is not None]
    groups = _group_by_input(linears) if fuse_shared_input else [[linear] for linear in linears]
    stats = _stats(linears, groups, isa_format)
    if not linears:
        logger.info("dynamic quantisation: no Linear layers (MatMul/Gemm with constant weights) found")
        return model, stats
    for index, group in enumerate(groups):
        _rewrite(graph, group, f"fxpress_dq{index}")
    ir_model.opset_imports.setdefault(MS_DOMAIN, 1)
    RemoveUnusedNodesPass()(ir_model)
    logger.info("dynamic quantisation: %d Linear layers, %d activation quantisations at run time, weight bits %s",
                stats["matmuls"], stats["activation_quantizations"], stats["weight_bits"])
    return ir.to_proto(ir_model), stats


def _stats(linears: list[_Linear], groups: list[list[_Linear]], isa_format: Int8Format) -> dict:
    bits = Counter(str(linear.bits) for linear in linears)
    return {
        "matmuls": len(linears),
        "activation_quantizations": len(groups),
        "shared_input_groups": sum(len(group) > 1 for group in groups),
        "folded_biases": sum(len(linear.nodes) > 1 for linear in linears),
        "weight_bits": dict(sorted(bits.items())),
        "gelu_fed_8bit": sum(linear.gelu_fed and linear.bits == GELU_WEIGHT_BITS for linear in linears),
        "isa": isa_format.to_dict(),
    }


# --- matching -------------------------------------------------------------------------------------


def _match_linear(node: ir.Node, isa_bits: int) -> _Linear | None:
    """The Linear layer rooted at ``node`` (a MatMul or Gemm with a constant 2-D weight), or None."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "MatMul":
        parts = _matmul_parts(node)
    elif node.op_type == "Gemm":
        parts = _gemm_parts(node)
    else:
        return None
    if parts is None:
        return None
    weight, bias = parts
    nodes, output = [node], node.outputs[0]
    if bias is None and (folded := _bias_add(output, weight.shape[1])) is not None:
        add, bias = folded
        nodes, output = [node, add], add.outputs[0]
    gelu_fed = _produced_by_gelu(node.inputs[0])
    bits = GELU_WEIGHT_BITS if gelu_fed else isa_bits
    return _Linear(nodes, node.inputs[0], weight, bias, output, bits, gelu_fed)


def _matmul_parts(node: ir.Node) -> tuple[np.ndarray, None] | None:
    weight = _constant(node.inputs[1], ndim=2)
    return None if weight is None or node.inputs[0] is None else (weight, None)


def _gemm_parts(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Gemm is a Linear when alpha = beta = 1, A is not transposed, and C is absent or a 1-D constant."""
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
        return None
    weight = _constant(node.inputs[1], ndim=2)
    if weight is None or node.inputs[0] is None:
        return None
    if attrs.get("transB", 0):
        weight = np.ascontiguousarray(weight.T)
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is None:
        return weight, None
    bias = _constant(c, ndim=1)
    return None if bias is None or bias.shape[0] != weight.shape[1] else (weight, bias)


def _bias_add(output: ir.Value, columns: int) -> tuple[ir.Node, np.ndarray] | None:
    """The ``Add`` of a constant ``[columns]`` bias that is the sole consumer of ``output``, if any."""
    uses = list(output.uses())
    if len(uses) != 1 or output.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - uses[0].idx]
    if other is output:
        return None
    bias = _constant(other, ndim=1)
    return None if bias is None or bias.shape[0] != columns else (add, bias)


def _constant(value: ir.Value | None, *, ndim: int) -> np.ndarray | None:
    """The float32 array of an initializer (not overridable by a graph input) of rank ``ndim``."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    if value.const_value.dtype != ir.DataType.FLOAT:
        return None
    array = value.const_value.numpy()
    return array if array.ndim == ndim else None


def _produced_by_gelu(value: ir.Value) -> bool:
    """True when ``value`` is a GELU's output: a Gelu op, or Mul/Add/Div arithmetic over an Erf."""
    producer = value.producer()
    if producer is None:
        return False
    if (producer.domain, producer.op_type) in _GELU_OPS:
        return True
    return producer.op_type == "Mul" and _erf_above(producer, _GELU_DEPTH)


def _erf_above(node: ir.Node, depth: int) -> bool:
    for value in node.inputs:
        producer = value.producer() if value is not None else None
        if producer is None:
            continue
        if producer.op_type == "Erf":
            return True
        if depth > 1 and producer.op_type in _GELU_ARITHMETIC and _erf_above(producer, depth - 1):
            return True
    return False


def _group_by_input(linears: list[_Linear]) -> list[list[_Linear]]:
    """Linears grouped by their activation and weight bits, in graph order."""
    groups: dict[tuple[int, int], list[_Linear]] = {}
    for linear in linears:
        groups.setdefault((id(linear.a), linear.bits), []).append(linear)
    return list(groups.values())


# --- rewriting ------------------------------------------------------------------------------------


def quantize_weight(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-column int8 weights ``[K, N]`` within ``±(2**(bits-1) - 1)``, and scales ``[N]``."""
    qmax = 2 ** (bits - 1) - 1
    absmax = np.abs(weight).max(axis=0)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    quantized = np.clip(np.rint(weight / scale), -qmax, qmax).astype(np.int8)
    return quantized, scale


def _rewrite(graph: ir.Graph, group: list[_Linear], prefix: str) -> None:
    """Replace the group's Linears: one DynamicQuantizeMatMul, or for several a shared quantisation."""
    quantized = [quantize_weight(linear.weight, linear.bits) for linear in group]
    first = group[0].nodes[0]
    activation = first.inputs[0]  # read now: rewriting a Linear that feeds this one replaced the value matched
    if len(group) == 1:
        (weight, scale), linear = quantized[0], group[0]
        inputs = [activation, *_weight_inputs(graph, prefix, weight, scale, linear.bias, zero_point=True)]
        new_nodes = [ir.node("DynamicQuantizeMatMul", inputs, domain=MS_DOMAIN, version=1,
                             name=f"{linear.name}/DynamicQuantizeMatMul")]
        outputs = new_nodes[0].outputs
    else:
        quantize = ir.node("DynamicQuantizeLinear", [activation], num_outputs=3,
                           name=f"{group[0].name}/DynamicQuantizeLinear")
        a_q, a_scale, a_zero_point = quantize.outputs
        new_nodes = [quantize]
        for index, ((weight, scale), linear) in enumerate(zip(quantized, group, strict=True)):
            b, b_scale, bias = _weight_inputs(graph, f"{prefix}_{index}", weight, scale, linear.bias, zero_point=False)
            new_nodes.append(ir.node("MatMulIntegerToFloat", [a_q, b, a_scale, b_scale, a_zero_point, None, bias],
                                     domain=MS_DOMAIN, version=1, name=f"{linear.name}/MatMulIntegerToFloat"))
        outputs = [node.outputs[0] for node in new_nodes[1:]]
    graph.insert_before(first, new_nodes)
    for linear, output in zip(group, outputs, strict=True):
        replace_value(linear.output, output)
        graph.remove(list(reversed(linear.nodes)), safe=True)


def _weight_inputs(graph: ir.Graph, prefix: str, weight: np.ndarray, scale: np.ndarray, bias: np.ndarray | None,
                   *, zero_point: bool) -> list[ir.Value | None]:
    """Initializers for B, its per-column scales, (its zero points, all 0,) and the bias (None without)."""
    values = [add_initializer(graph, f"{prefix}_B", weight), add_initializer(graph, f"{prefix}_b_scale", scale)]
    if zero_point:
        values.append(add_initializer(graph, f"{prefix}_b_zero_point", np.zeros(weight.shape[1], np.int8)))
    values.append(add_initializer(graph, f"{prefix}_bias", bias.astype(np.float32)) if bias is not None else None)
    return values


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer of ``graph`` named ``name``; returns its value."""
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = value.const_value.dtype
    graph.register_initializer(value)
    return value


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Point every use of ``old`` at ``new``, keeping a graph output's name."""
    new.shape, new.type = old.shape, old.type
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = f"{name}_float"
    new.name = name
