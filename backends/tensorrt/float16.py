"""Float16 for TensorRT's strongly typed mode: the model in fp16, fp32 inputs and outputs, overflow-prone ops in fp32.

Under strong typing TensorRT runs each layer in the type the ONNX declares, so the precision is
decided here. ONNX Runtime's float16 converter (``onnxruntime.transformers.float16``) rewrites the
model with casts at the edges; the ops kept in fp32 are those whose intermediate sums or powers
can leave float16's range (its largest finite value is 65504) and any node whose output on the
example inputs already exceeds :data:`LARGE`. Each keeps a reason for the ledger.
"""

from __future__ import annotations

import numpy as np
import onnx

from backends.onnxruntime.backend import make_session
from compiler.errors import TargetError

#: Op types kept in float32, with why.
OVERFLOW_PRONE = {
    "LayerNormalization": "sums the squares of a whole hidden vector",
    "ReduceSum": "a sum over many elements",
    "ReduceMean": "a sum over many elements before the division",
    "ReduceL2": "sums squares",
    "ReduceSumSquare": "sums squares",
    "Pow": "raises to a power",
    "Exp": "exponential",
    "Softmax": "exponentials and their sum",
}
LARGE = 2.0**14  # a quarter of float16's largest value: headroom for other inputs than the example's


def to_float16(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict]:
    """``model`` in float16 with float32 inputs and outputs; returns it and the ops kept float32 with reasons."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    if any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node):
        raise TargetError("float16 float islands around int8 Q/DQ are not supported yet; use float_dtype "
                          "'float32' for trt-int8, or the trt-fp16 target for a float model")
    large = _large_outputs(model, feed)
    kept = {node.name: f"{node.op_type}: {OVERFLOW_PRONE[node.op_type]}" for node in model.graph.node
            if node.op_type in OVERFLOW_PRONE}
    kept.update({name: f"output reaches {value:.3g} on the example inputs (float16 ends at 65504)"
                 for name, value in large.items()})
    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                         op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(OVERFLOW_PRONE),
                                         node_block_list=list(large))
    converted = _sorted(converted)
    return converted, {"kept_float32": kept, "float16_nodes": sum(
        node.op_type not in ("Cast",) and node.name not in kept for node in converted.graph.node)}


def _sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its nodes in topological order (the converter appends the casts it adds)."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.toposort()
    return gs.export_onnx(graph, do_type_check=False)


def _large_outputs(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, float]:
    """Nodes whose float output's largest magnitude on ``feed`` exceeds :data:`LARGE`."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {output.name for output in probe.graph.output}
    producer = {}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in known:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
                producer[name] = node.name
    session = make_session(probe, "disable")
    names = [output.name for output in session.get_outputs()]
    found: dict[str, float] = {}
    for name, value in zip(names, session.run(names, feed), strict=True):
        value = np.asarray(value)
        if name in producer and value.dtype.kind == "f" and value.size:
            largest = float(np.nanmax(np.abs(value)))
            if largest > LARGE:
                found[producer[name]] = max(largest, found.get(producer[name], 0.0))
    return found
