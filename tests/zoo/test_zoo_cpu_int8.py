"""cpu-int8 on real models and real data: accuracy gates and integer-kernel coverage."""

from __future__ import annotations

import collections

import onnx
import onnxruntime as ort
import pytest
import torch

from backends.onnxruntime import DISABLED_OPTIMIZERS
from compiler import compile as fxpress_compile
from compiler import meta
from compiler.cli.model_source import resolve
from compiler.quant_ops import DEQUANTIZE_PER_CHANNEL


def _compile(name: str, samples: int):
    source = resolve(name)
    calibration = source.zoo_entry.calibration_data(samples)
    return source, fxpress_compile(source.model, "cpu-int8", source.example_inputs, calibration_data=[calibration],
                                   dynamic_dims=source.dynamic_dims, model_name=name)


def test_digits_cnn_loses_at_most_half_a_point_of_true_accuracy():
    source, compiled = _compile("digits-cnn", 256)
    entry = source.zoo_entry
    count = 540
    inputs, labels = entry.eval_data(count), entry.eval_labels(count)
    with torch.no_grad():
        before = (source.model(*inputs).argmax(1) == labels).double().mean().item()
    after = (compiled(*inputs).argmax(1) == labels).double().mean().item()
    assert before - after <= 0.005, (before, after)


@pytest.mark.parametrize("name", ["efficientnet-lite0", "resnet18"])
def test_most_conv_macs_run_in_integer_kernels(name, tmp_path):
    _, compiled = _compile(name, 16)
    gm = compiled.graph_module
    convs = [node for node in gm.graph.nodes if str(node.target).startswith("aten.conv2d")]
    integer = [node for node in convs if node.args[1].target is DEQUANTIZE_PER_CHANNEL]
    macs = sum(node.meta.get(meta.MACS, 0) for node in convs)
    integer_macs = sum(node.meta.get(meta.MACS, 0) for node in integer)
    assert macs > 0 and integer_macs / macs >= 0.9, (integer_macs, macs)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(compiled.onnx.SerializeToString(), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(DISABLED_OPTIMIZERS))
    ops = collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    assert ops["QLinearConv"] == len(integer), ops


def test_minilm_runs_at_least_90_percent_of_its_matmul_macs_in_integer_kernels(tmp_path):
    source = resolve("minilm-l6")
    compiled = fxpress_compile(source.model, "cpu-int8", source.example_inputs, dynamic_dims=source.dynamic_dims,
                               model_name="minilm-l6")
    assert compiled.report.target == "cpu-int8-dynamic"  # Linear-heavy: handed over, and recorded
    macs = collections.Counter()
    for node in compiled.graph_module.graph.nodes:
        macs[str(node.target)] += node.meta.get(meta.MACS, 0) or 0
    linears = [node for node in compiled.graph_module.graph.nodes if str(node.target) == "aten.linear.default"]
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(compiled.onnx.SerializeToString(), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(DISABLED_OPTIMIZERS))
    ops = collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    # every Linear is one integer GEMM in the runtime's own graph; only attention's two products stay float
    assert ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"] == len(linears) == 36, ops
    assert ops["MatMul"] + ops["FusedMatMul"] == 12 and not ops["Gemm"], ops
    integer = macs["aten.linear.default"]
    total = integer + macs["aten.matmul.default"]
    assert total == sum(macs.values()) and integer / total >= 0.9, macs
    # the word and position tables are stored as int8 rows, and the report says so
    int8_tables = [list(init.dims) for init in compiled.onnx.graph.initializer
                   if init.data_type == onnx.TensorProto.INT8 and init.dims[0] in (30522, 512)]
    assert sorted(int8_tables) == [[512, 384], [30522, 384]], int8_tables
    assert "embedding tables as int8 rows:" in str(compiled.report) and "30522x384" in str(compiled.report)
