"""Dynamic int8 Linear layers (backends.onnxruntime.dynamic_quant): structure, weights, and ONNX Runtime runs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import helper, numpy_helper

from backends.onnxruntime import make_session
from backends.onnxruntime.dynamic_quant import quantize_dynamic_linears, quantize_weight
from backends.onnxruntime.isa import Int8Format

NO_VNNI = Int8Format("uint8", 7, "U8S8, reduce_range", "test: x86 without VNNI")
VNNI = Int8Format("uint8", 8, "U8S8", "test: x86 with VNNI")


class GeluMLP(nn.Module):
    """Linear, GELU, Linear, and a separate Linear head on the input (three Linears, one GELU-fed).

    The first layer's bias is negative, as in trained transformers' FFNs, so most GELU outputs lie
    near zero (the distribution the GELU 8-bit rule relies on).
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
        self.head = nn.Linear(32, 8)
        with torch.no_grad():
            self.body[0].bias.fill_(-1.5)

    def forward(self, x):
        return self.body(x) + self.head(x)


def _attention_model(weight: np.ndarray) -> onnx.ModelProto:
    """``h = x @ W``, then the activation x activation ``h @ h^T``."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["h", "ht"], ["y"]),
    ]
    return _model(nodes, [numpy_helper.from_array(weight, "W")])


def _model(nodes: list, initializers: list) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "test", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _export(module: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    with torch.no_grad():
        program = torch.onnx.export(module.eval(), (x,), dynamo=True, opset_version=18, verbose=False)
    return program.model_proto


def _run(model: onnx.ModelProto, x: torch.Tensor, level: str = "all") -> np.ndarray:
    return make_session(model, level).run(None, {model.graph.input[0].name: x.numpy()})[0]


def _quantized_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == "DynamicQuantizeMatMul"]


def _integer_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat")]


@pytest.fixture(scope="module")
def mlp():
    module = GeluMLP().eval()
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    return module, x, _export(module, x)


def test_every_linear_becomes_dynamic_quantize_matmul(mlp):
    _, _, model = mlp
    quantized, stats = quantize_dynamic_linears(model, NO_VNNI)
    onnx.checker.check_model(quantized)
    assert stats["matmuls"] == 3 and stats["activation_quantizations"] == 2  # two Linears read x
    ops = [node.op_type for node in quantized.graph.node]
    assert ops.count("DynamicQuantizeMatMul") == 1 and ops.count("MatMulIntegerToFloat") == 2
    assert ops.count("DynamicQuantizeLinear") == 1  # shared by the two Linears reading x
    assert all(node.input[-1] for node in _integer_nodes(quantized))  # biases kept
    assert not [node for node in quantized.graph.node if node.op_type in ("MatMul", "Gemm")]
    assert all(node.domain == "com.microsoft" for node in _integer_nodes(quantized))
    assert {entry.domain: entry.version for entry in quantized.opset_import}["com.microsoft"] == 1


def test_weights_per_column_symmetric_with_gelu_rule(mlp):
    _, _, model = mlp
    quantized, stats = quantize_dynamic_linears(model, NO_VNNI, fuse_shared_input=False)
    assert stats["weight_bits"] == {"7": 2, "8": 1} and stats["gelu_fed_8bit"] == 1
    inits = {init.name: numpy_helper.to_array(init) for init in quantized.graph.initializer}
    produced = {output: node for node in quantized.graph.node for output in node.output}
    for node in _quantized_nodes(quantized):
        weight, scale, zero_point = (inits[name] for name in node.input[1:4])
        assert weight.dtype == np.int8 and zero_point.dtype == np.int8 and not zero_point.any()
        assert scale.shape == (weight.shape[1],) and len(np.unique(scale)) > 1  # per output column
        gelu_fed = produced.get(node.input[0]) is not None and produced[node.input[0]].op_type == "Mul"
        assert np.abs(weight).max() == (127 if gelu_fed else 63)


def test_vnni_uses_8_bits_everywhere(mlp):
    _, _, model = mlp
    _, stats = quantize_dynamic_linears(model, VNNI)
    assert stats["weight_bits"] == {"8": 3}


@pytest.mark.parametrize("fuse", [True, False])
def test_runs_in_onnxruntime_close_to_fp32(mlp, fuse):
    module, x, model = mlp
    quantized, stats = quantize_dynamic_linears(model, NO_VNNI, fuse_shared_input=fuse)
    assert stats["shared_input_groups"] == (1 if fuse else 0)  # body[0] and head read the same input
    with torch.no_grad():
        reference = module(x).numpy()
    output = _run(quantized, x)
    assert np.abs(output - reference).max() <= 0.02 * np.abs(reference).max()
    assert np.allclose(output, _run(quantized, x, "disable"), atol=1e-5)


def test_optimised_graph_keeps_the_integer_op(mlp, tmp_path):
    _, _, model = mlp
    quantized, _ = quantize_dynamic_linears(model, NO_VNNI)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(quantized.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimised = onnx.load(options.optimized_model_filepath)
    assert len(_integer_nodes(optimised)) == 3
    assert not [node for node in optimised.graph.node if node.op_type in ("MatMul", "Gemm", "FusedMatMul")]


def test_sharing_the_activation_quantisation_changes_no_output_bit(mlp):
    _, x, model = mlp
    shared, _ = quantize_dynamic_linears(model, VNNI)
    separate, _ = quantize_dynamic_linears(model, VNNI, fuse_shared_input=False)
    assert "MatMulIntegerToFloat" in {node.op_type for node in shared.graph.node}
    np.testing.assert_array_equal(_run(shared, x), _run(separate, x))


def test_quantize_weight_bounds_and_zero_columns():
    weight = np.array([[0.25, 0.0, -2.0], [-1.0, 0.0, 1.5]], np.float32)
    quantized, scale = quantize_weight(weight, 7)
    assert quantized.tolist() == [[16, 0, -63], [-63, 0, 47]]
    assert np.allclose(scale, [1.0 / 63, 1.0, 2.0 / 63])
    assert np.abs(quantize_weight(weight, 8)[0]).max() == 127


def test_activation_matmul_left_alone():
    weight = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    model, x = _attention_model(weight), torch.randn(2, 4, 16)
    quantized, stats = quantize_dynamic_linears(model, NO_VNNI)
    assert stats["matmuls"] == 1 and stats["folded_biases"] == 0
    assert [node.op_type for node in quantized.graph.node].count("MatMul") == 1
    reference = _run(model, x)
    assert np.abs(_run(quantized, x) - reference).max() <= 0.05 * np.abs(reference).max()


def test_model_without_linears_unchanged():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("MatMul", ["r", "x2"], ["y"]),
             helper.make_node("Transpose", ["x"], ["x2"], perm=[0, 2, 1])]
    model = _model([nodes[0], nodes[2], nodes[1]], [])
    quantized, stats = quantize_dynamic_linears(model, NO_VNNI)
    assert quantized is model
    assert stats["matmuls"] == 0 and stats["activation_quantizations"] == 0 and stats["weight_bits"] == {}


@pytest.mark.parametrize("fuse", [True, False])
def test_linear_feeding_a_linear_directly(fuse):
    """Two Linears in a row (a factorised layer): the second reads the first's quantised output, a valid graph."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(32, 8, bias=False), nn.Linear(8, 16), nn.Linear(16, 4)).eval()
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    quantized, stats = quantize_dynamic_linears(_export(module, x), VNNI, fuse_shared_input=fuse)
    onnx.checker.check_model(quantized, full_check=True)
    assert stats["matmuls"] == 3 and len(_integer_nodes(quantized)) == 3
    with torch.no_grad():
        reference = module(x).numpy()
    assert np.abs(_run(quantized, x) - reference).max() <= 0.03 * np.abs(reference).max()
