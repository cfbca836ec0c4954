"""The trt-fp16 target: the model in float16 with float32 inputs and outputs, overflow-prone ops kept float32."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from backends.tensorrt.backend import TensorRTBackend
from backends.tensorrt.float16 import LARGE, to_float16
from compiler import compile, probe
from compiler.errors import TargetError


class Net(nn.Module):
    """Convs, a LayerNorm-like normalisation over channels, a softmax head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x)).mean((2, 3))
        return torch.softmax(self.head(self.norm(y)), dim=-1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture(scope="module")
def compiled(model):
    return compile(model, "trt-fp16", torch.randn(2, 3, 8, 8))


def _types(model: onnx.ModelProto) -> collections.Counter:
    inferred = onnx.shape_inference.infer_shapes(model)
    return collections.Counter(info.type.tensor_type.elem_type for info in inferred.graph.value_info)


def test_the_model_computes_in_float16_with_float32_inputs_and_outputs(compiled):
    model = compiled.onnx
    assert {value.type.tensor_type.elem_type for value in (*model.graph.input, *model.graph.output)} == {
        onnx.TensorProto.FLOAT}
    assert _types(model)[onnx.TensorProto.FLOAT16] > 0
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    assert weights[conv.input[1]].data_type == onnx.TensorProto.FLOAT16


def test_overflow_prone_ops_stay_float32_with_a_reason(compiled):
    kept = compiled.report.lowering["float16"]["kept_float32"]
    kinds = {reason.split(":")[0] for reason in kept.values()}
    assert {"LayerNormalization", "Softmax", "ReduceMean"} <= kinds
    assert all(reason.split(":", 1)[1].strip() for reason in kept.values())


def test_it_matches_eager_within_float16_error_and_writes_no_calibration_files(model, compiled):
    torch.manual_seed(1)
    x = torch.randn(5, 3, 8, 8)  # another batch than the example's
    with torch.no_grad():
        reference = model(x)
    output = compiled(x)
    drift = probe.drift((output,), (reference,))
    assert 0 < drift.max_abs < 1e-2 and drift.cosine > 0.9999  # float16 error: present, and small
    assert compiled.files == {} and compiled.report.lowering["lint_findings"] == []
    assert compiled.report.fallbacks == []


def test_a_node_whose_output_leaves_float16s_range_stays_float32():
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Mul", ["x", "big"], ["y"], name="scale_up"),
         onnx.helper.make_node("Relu", ["y"], ["z"], name="relu")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2])],
        [onnx.numpy_helper.from_array(np.array([1e5, 1.0], np.float32), "big")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 19)])
    model.ir_version = 10
    converted, info = to_float16(model, {"x": np.ones(2, np.float32)})
    assert "scale_up" in info["kept_float32"] and "65504" in info["kept_float32"]["scale_up"]
    assert "relu" not in info["kept_float32"] and LARGE < 65504
    assert converted.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_int8_models_are_refused_and_bad_options_too():
    with pytest.raises(TargetError, match="float_dtype"):
        TensorRTBackend(float_dtype="bfloat16")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("QuantizeLinear", ["x", "s"], ["q"]), onnx.helper.make_node("DequantizeLinear",
                                                                                         ["q", "s"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        [onnx.numpy_helper.from_array(np.array(0.1, np.float32), "s")])
    with pytest.raises(TargetError, match="not supported yet"):
        to_float16(onnx.helper.make_model(graph), {"x": np.ones(2, np.float32)})
