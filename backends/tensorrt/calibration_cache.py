"""TensorRT's native calibration cache, for the implicit-quantisation path, from an explicit-QDQ model.

Format (what ``trtexec --calib``, ONNX Runtime's TensorRT provider and NVIDIA ModelOpt read)::

    TRT-<version>-EntropyCalibration2
    <tensor name>: <the float32 scale's bits as 8 hex digits, most significant byte first>

The scale is ``amax / 127``. The names are those of the float tensors entering each activation
QuantizeLinear; :func:`strip_qdq` gives the float model they belong to (the implicit path takes a
model without Q/DQ plus this cache; TensorRT 11 removed that path, TensorRT 10 deprecated it).
"""

from __future__ import annotations

import struct

import numpy as np
import onnx
from onnx import numpy_helper

from compiler.errors import TargetError

DEFAULT_TRT_VERSION = "10.16.0"


def version_number(version: str) -> int:
    """TensorRT's ``NV_TENSORRT_VERSION`` for ``"major.minor.patch"``: 8.5.1 -> 8501, 10.16.0 -> 101600."""
    try:
        major, minor, patch = (int(part) for part in (version.split(".") + ["0", "0"])[:3])
    except ValueError as error:
        raise TargetError(f"calibration_cache_version must look like '10.16.0', got {version!r}") from error
    return major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch


def activation_scales(model: onnx.ModelProto) -> dict[str, float]:
    """Tensor name -> scale of every per-tensor QuantizeLinear on an activation (not a constant), in graph order."""
    constants = _constants(model)
    scales: dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in constants:
            continue
        scale = constants.get(node.input[1])
        if scale is None or scale.size != 1:
            continue
        scales.setdefault(node.input[0], float(scale.reshape(())))
    return scales


def format_cache(scales: dict[str, float], version: str = DEFAULT_TRT_VERSION,
                 algorithm: str = "EntropyCalibration2") -> str:
    """The cache text: the header, then one ``name: hex`` line per tensor."""
    lines = [f"TRT-{version_number(version)}-{algorithm}"]
    lines += [f"{name}: {struct.pack('>f', scale).hex()}" for name, scale in scales.items()]
    return "\n".join(lines) + "\n"


def parse_cache(text: str) -> tuple[str, dict[str, float]]:
    """(header, tensor name -> scale) of a cache's text."""
    header, *lines = text.strip().splitlines()
    scales = {}
    for line in lines:
        name, _, value = line.rpartition(":")
        scales[name.strip()] = struct.unpack(">f", bytes.fromhex(value.strip()))[0]
    return header, scales


def strip_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float copy of ``model``: activation Q/DQ pairs removed, dequantised weights stored as float initializers.

    Tensor names are kept, so the calibration cache's names refer to this model's tensors.
    """
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    graph = stripped.graph
    constants = _constants(stripped)
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    rename: dict[str, str] = {}
    kept = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in constants:
            _fold_dequantize(node, constants, initializers, graph)
            continue
        if node.op_type == "DequantizeLinear" and producers.get(node.input[0]) is not None \
                and producers[node.input[0]].op_type == "QuantizeLinear":
            rename[node.output[0]] = producers[node.input[0]].input[0]
            continue
        kept.append(node)
    kept = [node for node in kept if not (node.op_type == "QuantizeLinear" and node.input[0] not in constants)]
    for node in kept:
        node.input[:] = [rename.get(name, name) for name in node.input]
    for output in graph.output:
        output.name = rename.get(output.name, output.name)
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
    unused = [tensor for tensor in graph.initializer if tensor.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)
    del graph.value_info[:]
    return stripped


def _fold_dequantize(node: onnx.NodeProto, constants: dict[str, np.ndarray], initializers: dict, graph) -> None:
    """Replace a DequantizeLinear of constants by a float32 initializer with its output's name."""
    integers = constants[node.input[0]].astype(np.float64)
    scale = constants[node.input[1]].astype(np.float64)
    zero = constants[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
    axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1)
    if scale.size > 1:
        shape = [1] * integers.ndim
        shape[axis % integers.ndim] = -1
        scale, zero = scale.reshape(shape), np.reshape(zero, shape) if np.ndim(zero) else zero
    value = ((integers - zero) * scale).astype(np.float32)
    graph.initializer.append(numpy_helper.from_array(value, node.output[0]))


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs by name."""
    found = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    found[node.output[0]] = numpy_helper.to_array(attribute.t)
    return found
