"""Lossless float16 storage of float32 weights that float16 represents exactly.

``insert_qdq`` rounds the weights of layers it keeps in float to float16 values (see its module
docstring), but the exporter folds the widening cast back into a float32 initializer. This
rewrite finds float32 weight initializers whose every value is a float16 value, stores them as
float16, and widens them with a ``Cast`` that ONNX Runtime folds once when it loads the model.
The values the runtime computes with are bit-identical; only the file shrinks. Weights that
float16 does not represent exactly (any fp32 model's) are left alone.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

logger = logging.getLogger(__name__)

#: Op type -> index of its weight input.
_WEIGHT_INPUT = {"Conv": 1, "Gemm": 1, "MatMul": 1, "ConvTranspose": 1}
_SMALLEST = 256  # elements: below about 50 the Cast node costs more than the bytes saved


def store_exact_half_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite ``model`` in place; returns it and the number of weights now stored as float16."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers = _readers(graph)
    stored = 0
    for node in list(graph.node):
        index = _WEIGHT_INPUT.get(node.op_type)
        if index is None or len(node.input) <= index or node.input[index] not in initializers:
            continue
        name = node.input[index]
        init = initializers[name]
        if init.data_type != onnx.TensorProto.FLOAT or readers[name] != 1:
            continue
        values = numpy_helper.to_array(init)
        half = values.astype(np.float16)
        if values.size < _SMALLEST or not np.array_equal(half.astype(np.float32), values):
            continue
        _replace_with_cast(graph, init, half, node, index)
        stored += 1
    logger.debug("stored %d weight(s) as float16", stored)
    return model, stored


def _readers(graph: onnx.GraphProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _replace_with_cast(graph: onnx.GraphProto, init: onnx.TensorProto, half: np.ndarray,
                       reader: onnx.NodeProto, index: int) -> None:
    stored_name = f"{init.name}_float16"
    graph.initializer.remove(init)
    graph.initializer.append(numpy_helper.from_array(half, stored_name))
    cast = onnx.helper.make_node("Cast", [stored_name], [init.name], name=f"{reader.name}/widen_weight",
                                 to=onnx.TensorProto.FLOAT)
    for entry in reader.metadata_props:
        cast.metadata_props.add(key=entry.key, value=entry.value)
    position = list(graph.node).index(reader)
    graph.node.insert(position, cast)
