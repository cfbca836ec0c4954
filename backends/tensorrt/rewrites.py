"""ONNX rewrites that put the exported Q/DQ graph in the form TensorRT and ModelOpt expect."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def fold_weight_transposes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Store weights transposed: ``Transpose(DequantizeLinear(W, s, axis=a))`` -> ``DequantizeLinear(W^T, s, 1 - a)``.

    The exporter lowers a Linear on 3-D inputs to ``MatMul(x, Transpose(dequantized weight))``;
    TensorRT's and ModelOpt's form is a ``[K, N]`` weight quantised along axis 1 read by the
    MatMul directly. Only 2-D weights read by nothing else are rewritten. Returns the model
    (changed in place) and the number of weights rewritten.
    """
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    producers = {output: node for node in graph.node for output in node.output}
    folded, removed, stale = 0, [], set()
    for node in graph.node:
        dequantize = producers.get(node.input[0]) if node.op_type == "Transpose" else None
        if not _foldable(node, dequantize, initializers, readers):
            continue
        weight = initializers[dequantize.input[0]]
        transposed = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weight).T), weight.name)
        weight.CopyFrom(transposed)
        for attribute in dequantize.attribute:
            if attribute.name == "axis":
                attribute.i = 1 - (attribute.i % 2)
        stale.update({weight.name, dequantize.output[0]})
        dequantize.output[0] = node.output[0]
        removed.append(node)
        folded += 1
    for node in removed:
        graph.node.remove(node)
    kept = [info for info in graph.value_info if info.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return model, folded


def _foldable(transpose: onnx.NodeProto, dequantize: onnx.NodeProto | None, initializers: dict,
              readers: dict[str, int]) -> bool:
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        return False
    perm = next((list(attribute.ints) for attribute in transpose.attribute if attribute.name == "perm"), None)
    weight = initializers.get(dequantize.input[0])
    return (weight is not None and len(weight.dims) == 2 and perm in (None, [1, 0])
            and readers.get(dequantize.input[0], 0) == 1 and readers.get(dequantize.output[0], 0) == 1)
