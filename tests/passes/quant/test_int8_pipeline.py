"""The cpu-int8 target end to end on small models: QDQ structure, integer kernels, simulation, errors."""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from backends.onnxruntime import DISABLED_OPTIMIZERS
from backends.onnxruntime.isa import int8_format
from backends.onnxruntime.policy import make_policy
from compiler import compile, ir, meta, probe
from compiler.errors import CalibrationDataError, TargetError
from compiler.pass_base import PassContext
from compiler.quant_ops import DEQUANTIZE_PER_CHANNEL, QUANTIZE_DEQUANTIZE
from compiler.targets import PassSpec, get_target, with_float_fallback
from passes.quant.insert_qdq import activation_qparams, sum_preserving_round, weight_scales
from passes.quant.quant_sensitivity import _macs_scale, _noise_share
from tests.support import randomize_batch_norm


class ResidualNet(nn.Module):
    """Conv-BN-ReLU6, a depthwise conv, a residual add, pooling and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6())
        self.project = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        y = self.stem(x)
        y = y + self.project(self.depthwise(y))
        return self.head(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batch_norm(ResidualNet())


def _data(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, 16, 16, generator=generator) * 2 - 1


def _target(**quant_policy):
    """cpu-int8 without the sensitivity fallback, so every op is quantised, with policy overrides."""
    base = get_target("cpu-int8")
    pipeline = tuple(spec for spec in base.pipeline if spec.name != "quant_sensitivity")
    return dataclasses.replace(base, pipeline=pipeline, quant_policy={**base.quant_policy, **quant_policy})


@pytest.fixture(scope="module")
def compiled():
    return compile(_model(), _target(), _data(1, 0), calibration_data=[_data(32, 1)])


def _ops(gm, target):
    return [node for node in gm.graph.nodes if node.target is target]


def test_every_conv_and_linear_reads_int8_weights_and_quantised_inputs(compiled):
    gm = compiled.graph_module
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target) in ("aten.conv2d.default", "aten.linear.default"):
            weight = node.args[1]
            assert weight.target is DEQUANTIZE_PER_CHANNEL, node.name
            assert ir.get_attribute(gm, weight.args[0].target).dtype == torch.int8
            bias = node.args[2]
            assert bias.target is DEQUANTIZE_PER_CHANNEL
            assert ir.get_attribute(gm, bias.args[0].target).dtype == torch.int32
            source = node.args[0]
            while source.target is not QUANTIZE_DEQUANTIZE and source.op == "call_function":
                source = source.args[0]  # pad, view, flatten: pass-through
            assert source.target is QUANTIZE_DEQUANTIZE, f"{node.name} reads an unquantised input"


def test_relu6_is_fused_into_the_output_quantiser(compiled):
    nodes = list(compiled.graph_module.graph.nodes)
    relu6 = [node for node in nodes if "hardtanh" in str(node.target)]
    assert len(relu6) == 2
    for node in relu6:
        assert "conv2d" in str(node.args[0].target), "a quantiser sits between a conv and its ReLU6"
        quantisers = [user for user in node.users if user.target is QUANTIZE_DEQUANTIZE]
        assert len(quantisers) == 1 and set(node.users) == set(quantisers), "ReLU6 output not quantised for all"
        assert quantisers[0].args[2] == 0, "a ReLU6 output must have zero point 0 (unsigned) so the clip folds away"


def test_logits_stay_float_and_weights_use_the_isa_bit_width(compiled):
    output = next(node for node in compiled.graph_module.graph.nodes if node.op == "output")
    assert output.args[0][0].target is not QUANTIZE_DEQUANTIZE
    bits = int8_format().weight_bits
    layers = {row["tensor"]: row for row in compiled.report.entry("insert_qdq").stats["layers"]}
    assert layers["depthwise.0.weight"]["bits"] == 8  # depthwise kernels accumulate in int32
    assert layers["project.weight"]["bits"] == bits
    assert compiled.report.capture["isa"]["int8_format"]["weight_bits"] == bits


def test_onnx_runtime_runs_every_conv_and_linear_on_integers(compiled, tmp_path):
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(compiled.onnx.SerializeToString(), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(DISABLED_OPTIMIZERS))
    ops = collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    assert ops["QLinearConv"] == 3 and ops["Conv"] == 0, ops
    assert ops["QLinearAdd"] == 1, ops
    assert ops["QGemm"] == 1 and ops["Gemm"] == 0, ops  # the float-output head runs on integers too
    weights = [init for init in compiled.onnx.graph.initializer if init.name.endswith("weight_quantized")]
    assert weights and all(init.data_type == onnx.TensorProto.INT8 for init in weights)


def test_simulation_matches_onnx_runtime_within_one_step(compiled):
    inputs = _data(64, 7)
    runtime, simulated = compiled(inputs), compiled.simulate(inputs)
    assert probe.within_steps((runtime,), (simulated,), 1.0) >= 0.999
    assert compiled.report.lowering["simulation_agreement"]["fraction"] >= 0.999


def test_int8_stays_close_to_float():
    model = _model()
    compiled = compile(model, _target(), _data(1, 0), calibration_data=[_data(64, 1)])
    inputs = _data(64, 9)
    with torch.no_grad():
        reference = model(inputs)
    assert probe.drift((compiled(inputs),), (reference,)).sqnr_db > 25


def test_float_module_override_keeps_that_conv_float_with_half_storage():
    model = _model()
    compiled = compile(model, _target(float_modules=["project"]), _data(1, 0), calibration_data=[_data(16, 1)])
    conv = next(node for node in compiled.graph_module.graph.nodes
                if node.meta.get("fxpress_module_path") == "project" and "conv2d" in str(node.target))
    widened = conv.args[1]
    assert widened.target is torch.ops.aten._to_copy.default and widened.kwargs["dtype"] == torch.float32
    stored = ir.get_attribute(compiled.graph_module, widened.args[0].target)
    assert stored.dtype == torch.float16
    torch.testing.assert_close(stored.float(), model.project.weight.detach(), rtol=2**-10, atol=1e-7)
    initializers = {init.name: init.data_type for init in compiled.onnx.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in initializers.values(), "the float conv's weight is not stored as float16"
    inputs = _data(16, 3)
    assert probe.within_steps((compiled(inputs),), (compiled.simulate(inputs),), 1.0) >= 0.999


def test_float_prefix_keeps_the_first_weighted_ops_in_graph_order_float():
    compiled = compile(_model(), _target(float_prefix=2), _data(1, 0), calibration_data=[_data(16, 1)])
    weights = {node.meta.get("fxpress_module_path"): node.args[1].target for node in compiled.graph_module.graph.nodes
               if node.op == "call_function" and ("conv2d" in str(node.target) or "linear" in str(node.target))}
    float_layers = {path for path, source in weights.items() if source is torch.ops.aten._to_copy.default}
    assert float_layers == {"stem.0", "depthwise.0"} and weights["project"] is DEQUANTIZE_PER_CHANNEL
    assert compiled.report.capture["quant_policy"]["float_prefix"] == 2
    with pytest.raises(TargetError, match="float_prefix must be an integer >= 0, got -1"):
        make_policy({"float_prefix": -1})


def test_sensitivity_ranks_every_integer_op_with_its_module_path():
    target = with_float_fallback("cpu-int8")
    compiled = compile(_model(), target, _data(1, 0), calibration_data=[_data(16, 1)])
    rows = compiled.report.entry("quant_sensitivity").stats["layers"]
    assert {row["module_path"] for row in rows} >= {"stem.0", "depthwise.0", "project", "head"}
    assert all(row["decision"] in ("int8", "float") and row["sqnr_db"] > 0 for row in rows)
    # One table joins them: per layer, format, scale, range, calibrator, SQNR alone and decision.
    weights = [row for row in compiled.report.entry("insert_qdq").stats["layers"] if row["kind"] == "weight"]
    assert {row["module_path"] for row in weights} == {"stem.0", "depthwise.0", "project", "head"}
    assert all("sqnr_db" in row and row["decision"] in ("int8", "float") for row in weights)
    table = str(compiled.report).split("quantisation, per layer", 1)[1]
    head = next(line for line in table.splitlines() if line.startswith("head "))
    assert "per-channel" in head and "minmax_per_channel" in head and " dB" in head, head


def test_missing_calibration_data_is_a_typed_error():
    with pytest.raises(CalibrationDataError, match="needs calibration_data"):
        compile(_model(), "cpu-int8", _data(1, 0))


def test_badly_shaped_calibration_data_names_the_input():
    with pytest.raises(CalibrationDataError, match="input 'x'"):
        compile(_model(), "cpu-int8", _data(1, 0), calibration_data=[torch.rand(4, 3, 16)])


def test_unknown_policy_field_is_a_target_error():
    with pytest.raises(TargetError, match="no field"):
        make_policy({"base": "onnxruntime-cpu", "colour": "red"})


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.integers(0, 10_000), st.sampled_from([63, 127]))
def test_sum_preserving_round_keeps_channel_sums_within_half_a_step(channels, width, seed, largest):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, width, generator=generator)
    weight -= weight.mean(dim=1, keepdim=True) * (seed % 2)  # half the cases: zero-sum (edge) filters
    scales = weight_scales(weight, 0, largest)
    integers = sum_preserving_round(weight, scales, 0, largest).double()
    exact = weight.double() / scales.double().unsqueeze(1)
    assert integers.abs().max() <= largest
    assert (integers - exact).abs().max() < 1.0 + 1e-9
    assert (integers.sum(dim=1) - exact.sum(dim=1)).abs().max() <= 0.5 + 1e-6 or width * largest < 1


def test_quantisation_op_matches_onnx_quantize_linear():
    values = torch.linspace(-3, 3, 1001)
    simulated = QUANTIZE_DEQUANTIZE(values, 0.0234, 128, 0, 255).numpy()
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         onnx.helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1001])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1001])],
        [onnx.numpy_helper.from_array(np.array(0.0234, np.float32), "s"),
         onnx.numpy_helper.from_array(np.array(128, np.uint8), "z")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": values.numpy()})[0], simulated)


def test_linear_heavy_model_is_compiled_dynamically_and_the_choice_recorded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    inputs = torch.randn(8, 64)
    compiled = compile(model, "cpu-int8", inputs, calibration_data=[torch.randn(32, 64)])
    choice = compiled.report.capture["target_choice"]
    assert (choice["requested"], choice["chosen"], choice["linear_mac_share"]) == ("cpu-int8", "cpu-int8-dynamic", 1.0)
    assert compiled.report.target == "cpu-int8-dynamic" and not compiled.report.fallbacks
    assert sum(node.op_type == "DynamicQuantizeMatMul" for node in compiled.onnx.graph.node) == 2


def test_conv_model_stays_static_and_the_choice_is_recorded(compiled):
    choice = compiled.report.capture["target_choice"]
    assert choice["chosen"] == "cpu-int8" and choice["linear_mac_share"] < 0.5


def _sensitivity_target(**options):
    base = with_float_fallback("cpu-int8")
    pipeline = tuple(
        PassSpec(spec.name, {**spec.options, **options}) if spec.name == "quant_sensitivity" else spec
        for spec in base.pipeline)
    return dataclasses.replace(base, pipeline=pipeline)


def _fallback(**options) -> dict:
    """The quant_sensitivity entry when every op may go float and the output budget cannot hold."""
    target = _sensitivity_target(max_drop=0.0, max_float_macs=1.0, max_float=4, **options)
    compiled = compile(_model(), target, _data(1, 0), calibration_data=[_data(16, 1)])
    return compiled.report.entry("quant_sensitivity").stats


def test_fallback_stops_at_layers_holding_too_little_of_the_output_noise():
    every = _fallback(min_noise_share=0.0)
    assert every["float_ops"] == 4 and "stopped" not in every["quality"]
    strict = _fallback(min_noise_share=0.9)
    assert strict["float_ops"] < every["float_ops"]
    assert "of the output noise, under min_noise_share 0.9" in strict["quality"]["stopped"]
    # The layers it kept float are the most harmful ones, in order.
    ranked = [row["module_path"] for row in sorted(strict["layers"], key=lambda row: row["sqnr_db"])]
    floated = [row["module_path"] for row in strict["layers"] if row["decision"] == "float"]
    assert sorted(floated, key=ranked.index) == ranked[:len(floated)]


@pytest.mark.parametrize("share", [-0.1, 1.0, True, "5%"])
def test_bad_min_noise_share_is_a_target_error(share):
    with pytest.raises(TargetError, match="min_noise_share"):
        compile(_model(), _sensitivity_target(min_noise_share=share), _data(1, 0), calibration_data=[_data(16, 1)])


def test_noise_share_of_a_layer():
    assert _noise_share(30.0, 20.0) == pytest.approx(0.1)
    assert _noise_share(20.0, 30.0) == 1.0  # alone worse than everything: capped
    assert _noise_share(math.inf, 20.0) == 0.0 and _noise_share(20.0, math.inf) == 0.0


@pytest.mark.parametrize(("dtype", "zero_point"), [("int8", 0), ("uint8", 128)])
def test_a_symmetric_policy_puts_zero_in_the_middle_of_the_grid(dtype, zero_point):
    policy = make_policy({"base": "onnxruntime-cpu", "activation_dtype": dtype, "activation_symmetric": True})
    scale, point = activation_qparams(-0.5, 2.54, policy)
    assert point == zero_point and scale == pytest.approx(2.54 / 127, rel=1e-6)
    affine_scale, affine_point = activation_qparams(-0.5, 2.54, make_policy({"activation_dtype": dtype}))
    assert affine_scale == pytest.approx(3.04 / 255, rel=1e-6) and affine_point != zero_point


def test_a_symmetric_flag_must_be_a_boolean():
    with pytest.raises(TargetError, match="activation_symmetric must be true or false"):
        make_policy({"activation_symmetric": "yes"})


def test_float_budget_is_a_share_of_the_model_as_captured():
    """After pruning, a layer's float share is counted against the captured MACs, not the pruned ones."""
    gm = torch.fx.symbolic_trace(_model())
    for node in gm.graph.nodes:
        node.meta[meta.MACS] = 1000 if node.op == "call_module" else 0
    macs = probe.total_macs(gm)
    context = PassContext((_data(1, 0),), (_data(1, 0),))
    assert _macs_scale(gm, context) == 1.0  # not known: the graph's own MACs
    context.captured_macs = int(macs / 0.7)  # pruning removed 30% of the MACs
    assert _macs_scale(gm, context) == pytest.approx(1 / 0.7, rel=1e-6)
    context.captured_macs = macs // 2  # a graph that grew is measured against itself
    assert _macs_scale(gm, context) == 1.0


def test_pass_manager_tells_passes_the_captured_macs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(), nn.Conv2d(16, 64, 1), nn.ReLU6(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.ReLU6(), nn.Conv2d(64, 16, 1), nn.Flatten(),
                          nn.Linear(16 * 16 * 16, 10)).eval()
    target = _sensitivity_target(max_drop=0.0, max_float=1, max_float_macs=1.0, min_noise_share=0.0)
    compiled = compile(model, target, _data(1, 0), calibration_data=[_data(16, 1)],
                       prune={"macs": 0.4}, recover_seconds=0)
    entry = compiled.report.entry("quant_sensitivity")
    captured = compiled.report.initial["macs"]
    assert entry.macs_before < 0.8 * captured
    float_op = next(row["op"] for row in entry.stats["layers"] if row["decision"] == "float")
    float_macs = next(node.meta[meta.MACS] for node in compiled.graph_module.graph.nodes if node.name == float_op)
    # The pruned graph is all conv/linear MACs, so the share is the float op's MACs over the captured model's.
    assert entry.stats["quality"]["float_macs_share"] == pytest.approx(float_macs / captured, rel=0.02)
