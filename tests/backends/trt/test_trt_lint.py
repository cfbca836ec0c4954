"""The TensorRT Q/DQ placement linter: one small violating graph per rule, a clean graph, the summary."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from backends.tensorrt.graph_patterns import MODULE_PATH_KEY, residual_adds
from backends.tensorrt.lint import RULES, Finding, lint_tensorrt, placement_summary
from compiler.errors import ArtifactError

CHANNELS = 4
INT8_ZERO = np.int8(0)


class Net:
    """Builds small NCHW graphs with ONNX's helper: every op output is named after its node."""

    def __init__(self, inputs=("x",)):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.inputs = list(inputs)

    def constant(self, name: str, array) -> str:
        self.initializers[name] = numpy_helper.from_array(np.asarray(array), name)
        return name

    def op(self, op_type: str, inputs, name: str, outputs: int = 1, **attrs) -> str:
        names = [name] + [f"{name}:{index}" for index in range(1, outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=name, **attrs))
        return name

    def qdq(self, source: str, name: str, scale=0.1, zero_point=INT8_ZERO, **attrs) -> str:
        """Q -> DQ named q_<name>, dq_<name>; zero_point None leaves it out."""
        scale_name = self.constant(f"s_{name}", np.asarray(scale, np.float32))
        extra = [] if zero_point is None else [self.constant(f"zp_{name}", zero_point)]
        quantized = self.op("QuantizeLinear", [source, scale_name, *extra], f"q_{name}", **attrs)
        return self.op("DequantizeLinear", [quantized, scale_name, *extra], f"dq_{name}", **attrs)

    def weight(self, name: str, quantized: bool = True, shape=(CHANNELS, CHANNELS, 1, 1)) -> str:
        """A float weight, or int8 values with a per-channel DequantizeLinear (axis 0)."""
        if not quantized:
            return self.constant(name, np.full(shape, 0.5, np.float32))
        values = self.constant(f"{name}_int8", np.ones(shape, np.int8))
        scale = self.constant(f"{name}_scale", np.full(shape[0], 0.01, np.float32))
        zero_point = self.constant(f"{name}_zp", np.zeros(shape[0], np.int8))
        return self.op("DequantizeLinear", [values, scale, zero_point], f"dq_{name}", axis=0)

    def conv(self, source: str, name: str, quantized: bool = True) -> str:
        return self.op("Conv", [source, self.weight(f"{name}_w", quantized)], name)

    def model(self, outputs, opset: int = 17, extra_opsets=()) -> onnx.ModelProto:
        """A checked model; outputs are typed 4-d with symbolic sizes (the checker does not infer shapes)."""
        shape = [1, CHANNELS, 8, 8]
        graph = helper.make_graph(
            self.nodes, "net", [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in self.inputs],
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", "c", "h", "w"]) for name in outputs],
            list(self.initializers.values()))
        opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(*pair) for pair in extra_opsets)]
        model = helper.make_model(graph, opset_imports=opsets)
        onnx.checker.check_model(model)
        return model


def found(model) -> list[tuple[str, str]]:
    return [(finding.rule, finding.node) for finding in lint_tensorrt(model)]


def clean_block() -> tuple[Net, str]:
    """A ResNet-style block placed the TensorRT way: conv inputs quantised, the residual's skip input
    quantised and its conv side not, pooling quantised on both sides, a quantised Gemm head."""
    net = Net()
    first = net.op("Relu", [net.conv(net.qdq("x", "x"), "conv1")], "relu1")
    skip = net.qdq(first, "relu1")
    middle = net.op("Relu", [net.conv(skip, "conv2")], "relu2")
    added = net.op("Add", [net.conv(net.qdq(middle, "relu2"), "conv3"), skip], "add")
    pooled = net.op("GlobalAveragePool", [net.qdq(net.op("Relu", [added], "relu3"), "relu3")], "pool")
    flat = net.op("Flatten", [net.qdq(pooled, "pool")], "flatten")
    net.op("Gemm", [net.qdq(flat, "flat"), net.weight("fc_w", shape=(2, CHANNELS))], "fc", transB=1)
    return net, "fc"


def test_rules_have_ids_slugs_and_descriptions():
    assert list(RULES) == [f"TRT{index:03d}" for index in range(1, 13)]
    assert all(slug and description.endswith(".") for slug, description in RULES.values())
    assert RULES["TRT005"][0] == "weighted-op-half-quantized"


def test_a_tensorrt_style_placement_has_no_findings():
    net, output = clean_block()
    assert lint_tensorrt(net.model([output])) == []


def test_a_float_model_has_no_findings_even_at_an_old_opset():
    net = Net()
    net.op("Add", [net.conv(net.op("Relu", [net.conv("x", "conv1", False)], "relu"), "conv2", False), "x"], "add")
    assert lint_tensorrt(net.model(["add"], opset=11)) == []


@pytest.mark.parametrize("zero_point", [np.int8(3), np.uint8(0), None], ids=["nonzero", "uint8", "missing"])
def test_trt001_asymmetric_or_uint8_zero_points(zero_point):
    net = Net()
    net.op("Relu", [net.qdq("x", "x", zero_point=zero_point)], "relu")
    assert found(net.model(["relu"])) == [("TRT001", "q_x"), ("TRT001", "dq_x")]


def test_trt001_accepts_fp8_and_int4_zero_points():
    net = Net()
    fp8 = helper.make_tensor("zp_fp8", TensorProto.FLOAT8E4M3FN, [], [0.0])
    net.initializers["zp_fp8"] = fp8
    net.constant("s", np.float32(0.1))
    net.op("DequantizeLinear", [net.op("QuantizeLinear", ["x", "s", "zp_fp8"], "q"), "s", "zp_fp8"], "dq")
    net.initializers["w_int4"] = helper.make_tensor("w_int4", TensorProto.INT4, [CHANNELS, CHANNELS, 1, 1],
                                                    [1] * CHANNELS * CHANNELS)
    net.initializers["zp_int4"] = helper.make_tensor("zp_int4", TensorProto.INT4, [], [0])
    net.op("DequantizeLinear", ["w_int4", "s", "zp_int4"], "dq_w")
    net.op("Conv", ["dq", "dq_w"], "conv")
    assert lint_tensorrt(net.model(["conv"], opset=21)) == []


def test_trt001_flags_an_int32_bias_dequantize():
    net = Net()
    bias = net.op("DequantizeLinear", [net.constant("b", np.zeros(CHANNELS, np.int32)),
                                       net.constant("bs", np.float32(0.001)),
                                       net.constant("bzp", np.int32(0))], "dq_bias")
    net.op("Conv", [net.qdq("x", "x"), net.weight("w"), bias], "conv")
    findings = lint_tensorrt(net.model(["conv"]))
    assert [(item.rule, item.node) for item in findings] == [("TRT001", "dq_bias")]
    assert "QuantizeBias=False" in findings[0].message


@pytest.mark.parametrize("scale", [0.0, -0.1, np.inf], ids=["zero", "negative", "infinite"])
def test_trt002_scales_must_be_positive_and_finite(scale):
    net = Net()
    net.op("Relu", [net.qdq("x", "x", scale=scale)], "relu")
    assert found(net.model(["relu"])) == [("TRT002", "q_x"), ("TRT002", "dq_x")]


def test_trt002_scales_must_be_constant():
    net = Net(inputs=("x", "y"))
    scale = net.op("ReduceMax", ["y"], "scale", keepdims=0)
    zero_point = net.constant("zp", np.int8(0))
    net.op("DequantizeLinear", [net.op("QuantizeLinear", ["x", scale, zero_point], "q"), scale, zero_point], "dq")
    assert found(net.model(["dq"])) == [("TRT002", "q"), ("TRT002", "dq")]


def test_trt003_activations_are_quantised_per_tensor():
    net = Net()
    net.op("Relu", [net.qdq("x", "x", scale=np.full(CHANNELS, 0.1), zero_point=np.zeros(CHANNELS, np.int8),
                            axis=1)], "relu")
    assert found(net.model(["relu"])) == [("TRT003", "q_x"), ("TRT003", "dq_x")]


def test_trt004_per_channel_weights_need_an_explicit_axis():
    net = Net()
    net.op("DequantizeLinear", [net.constant("w", np.ones((CHANNELS, CHANNELS, 1, 1), np.int8)),
                                net.constant("ws", np.full(CHANNELS, 0.01, np.float32)),
                                net.constant("wzp", np.zeros(CHANNELS, np.int8))], "dq_w")
    net.op("Conv", [net.qdq("x", "x"), "dq_w"], "conv")
    assert found(net.model(["conv"])) == [("TRT004", "dq_w")]


@pytest.mark.parametrize("quantized", ["activation", "weight"])
def test_trt005_weighted_ops_quantise_both_inputs(quantized):
    net = Net()
    source = net.qdq("x", "x") if quantized == "activation" else "x"
    net.conv(source, "conv", quantized=quantized == "weight")
    findings = lint_tensorrt(net.model(["conv"]))
    assert [(item.rule, item.node, item.name) for item in findings] == [
        ("TRT005", "conv", "weighted-op-half-quantized")]
    assert f"{quantized} is quantised" in findings[0].message


def test_trt005_ignores_a_matmul_of_two_activations():
    net = Net(inputs=("x", "y"))
    net.op("MatMul", [net.qdq("x", "x"), "y"], "attention")
    assert found(net.model(["attention"])) == []


def test_trt005_finds_the_weight_of_a_matmul_on_either_side():
    net = Net()
    net.op("MatMul", [net.constant("w", np.ones((8, 8), np.float32)), net.qdq("x", "x")], "matmul")
    assert found(net.model(["matmul"])) == [("TRT005", "matmul")]


def residual_net(conv_side_qdq: bool, skip_quantized: bool) -> onnx.ModelProto:
    net = Net()
    first = net.op("Relu", [net.conv(net.qdq("x", "x"), "conv1")], "relu1")
    skip = net.qdq(first, "relu1")
    conv = net.conv(skip, "conv2")
    conv_side = net.qdq(conv, "conv2") if conv_side_qdq else conv
    net.op("Add", [conv_side, skip if skip_quantized else first], "add")
    return net.model(["add"])


def test_trt006_no_qdq_between_a_conv_and_its_residual_add():
    model = residual_net(conv_side_qdq=True, skip_quantized=True)
    assert residual_adds(model) == {"add": (0, 1, "conv2")}
    assert found(model) == [("TRT006", "add")]


def test_trt007_a_quantised_conv_wants_its_skip_input_quantised():
    model = residual_net(conv_side_qdq=False, skip_quantized=False)
    assert residual_adds(model) == {"add": (0, 1, "conv2")}
    assert found(model) == [("TRT007", "add")]


def test_trt008_an_add_partly_quantised():
    net = Net(inputs=("x", "y"))
    net.op("Add", [net.qdq("x", "x"), "y"], "add")
    assert found(net.model(["add"])) == [("TRT008", "add")]


@pytest.mark.parametrize("output_quantized", [False, True])
def test_trt008_a_quantised_pool_needs_its_output_quantised(output_quantized):
    net = Net()
    pooled = net.op("AveragePool", [net.qdq("x", "x")], "pool", kernel_shape=[2, 2])
    output = net.qdq(pooled, "pool") if output_quantized else pooled
    assert found(net.model([output])) == ([] if output_quantized else [("TRT008", "pool")])


@pytest.mark.parametrize("consumer", ["BatchNormalization", "Relu"])
def test_trt009_no_qdq_inside_a_conv_batchnorm_relu_chain(consumer):
    net = Net()
    conv = net.conv(net.qdq("x", "x"), "conv")
    if consumer == "BatchNormalization":
        parameters = [net.constant(name, np.ones(CHANNELS, np.float32)) for name in ("g", "b", "m", "v")]
        net.op(consumer, [net.qdq(conv, "conv"), *parameters], "bn")
    else:
        net.op(consumer, [net.qdq(conv, "conv")], "bn")
    assert found(net.model(["bn"])) == [("TRT009", "q_conv")]


@pytest.mark.parametrize(("scales", "flagged"), [((0.1, 0.1, 0.1), False), ((0.1, 0.2, 0.1), True),
                                                  ((0.1, 0.1, 0.3), True)])
def test_trt010_concat_inputs_and_output_share_a_scale(scales, flagged):
    net = Net(inputs=("x", "y"))
    joined = net.op("Concat", [net.qdq("x", "x", scales[0]), net.qdq("y", "y", scales[1])], "concat", axis=1)
    output = net.qdq(joined, "concat", scales[2])
    assert found(net.model([output])) == ([("TRT010", "concat")] if flagged else [])


def test_trt011_a_qdq_model_below_opset_13():
    net = Net()
    net.op("Relu", [net.qdq("x", "x")], "relu")
    findings = lint_tensorrt(net.model(["relu"], opset=12))
    assert [(item.rule, item.node, item.module_path) for item in findings] == [("TRT011", "<model>", None)]


def test_trt012_qoperator_ops():
    net = Net()
    quantized = net.op("DynamicQuantizeLinear", ["x"], "dynamic", outputs=3)
    net.op("QGemm", [quantized], "qgemm", domain="com.microsoft")
    model = net.model(["qgemm"], extra_opsets=[("com.microsoft", 1)])
    assert found(model) == [("TRT012", "dynamic"), ("TRT012", "qgemm")]


def test_findings_carry_the_module_path_and_unnamed_nodes_get_names():
    net = Net()
    net.conv(net.qdq("x", "x"), "conv", quantized=False)
    model = net.model(["conv"])
    conv = next(node for node in model.graph.node if node.name == "conv")
    entry = conv.metadata_props.add()
    entry.key, entry.value = MODULE_PATH_KEY, "layer1.0.conv1"
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            node.name = ""
    before = model.SerializeToString()
    findings = lint_tensorrt(model)
    assert findings == [Finding("TRT005", "weighted-op-half-quantized", "conv", "layer1.0.conv1", findings[0].message)]
    assert findings[0].to_dict()["module_path"] == "layer1.0.conv1"
    assert model.SerializeToString() == before  # the caller's model is untouched


def test_unnamed_nodes_are_named_after_op_and_position():
    net = Net()
    net.op("Relu", [net.qdq("x", "x", zero_point=np.int8(1))], "relu")
    model = net.model(["relu"])
    for node in model.graph.node:
        node.name = ""
    assert found(model) == [("TRT001", "QuantizeLinear_0"), ("TRT001", "DequantizeLinear_1")]


def test_findings_come_in_graph_order_then_rule_id(tmp_path):
    net = Net()
    net.op("Relu", [net.qdq("x", "x", scale=-1.0, zero_point=np.uint8(0))], "relu")
    net.conv("relu", "conv", quantized=True)
    path = tmp_path / "model.onnx"
    onnx.save(net.model(["conv"]), path)
    assert found(str(path)) == [("TRT001", "q_x"), ("TRT002", "q_x"), ("TRT001", "dq_x"), ("TRT002", "dq_x"),
                                ("TRT005", "conv")]
    assert found(path) == found(str(path))


def test_the_module_path_key_is_the_exporters():
    from backends.onnx.export import MODULE_PATH_KEY as EXPORTED

    assert MODULE_PATH_KEY == EXPORTED


def test_unreadable_or_invalid_models_are_artifact_errors(tmp_path):
    missing = tmp_path / "missing.onnx"
    with pytest.raises(ArtifactError, match="missing.onnx"):
        lint_tensorrt(missing)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\xfe not a protobuf \x00" * 10)
    with pytest.raises(ArtifactError, match="garbage.onnx"):
        lint_tensorrt(garbage)
    invalid = tmp_path / "invalid.onnx"
    net = Net()
    net.op("Relu", ["undefined"], "relu")
    broken = helper.make_model(helper.make_graph(net.nodes, "g", [], [helper.make_tensor_value_info(
        "relu", TensorProto.FLOAT, None)]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(broken, invalid)
    with pytest.raises(ArtifactError, match="invalid.onnx is not a valid ONNX model"):
        lint_tensorrt(invalid)


# --- residual adds ------------------------------------------------------------------------------------------


def test_residual_with_a_downsample_conv_takes_the_longer_branch_as_the_conv_side():
    net = Net()
    block_input = net.qdq(net.op("Relu", [net.conv(net.qdq("x", "x"), "stem")], "stem_relu"), "block_in")
    main = net.op("Relu", [net.conv(block_input, "conv1")], "relu1")
    main = net.op("BatchNormalization", [net.conv(net.qdq(main, "relu1"), "conv2"),
                                         *[net.constant(f"bn_{name}", np.ones(CHANNELS, np.float32))
                                           for name in "gbmv"]], "bn2")
    downsample = net.conv(block_input, "downsample")
    net.op("Add", [net.qdq(downsample, "downsample"), main], "add")
    assert residual_adds(net.model(["add"])) == {"add": (1, 0, "conv2")}


def test_residual_branches_of_equal_length_take_input_0_as_the_conv_side():
    net = Net()
    left, right = net.conv(net.qdq("x", "left"), "left"), net.conv(net.qdq("x", "right"), "right")
    net.op("Add", [left, right], "add")
    assert residual_adds(net.model(["add"])) == {"add": (0, 1, "left")}


def test_residual_walks_through_bias_adds_and_single_reader_activations():
    net = Net()
    biased = net.op("Add", [net.conv(net.qdq("x", "x"), "conv"), net.constant("bias_value", np.ones((CHANNELS, 1, 1),
                                                                                             np.float32))], "bias")
    clipped = net.op("Clip", [net.op("Relu", [biased], "relu")], "clip")
    net.op("Add", ["x", clipped], "add")
    assert residual_adds(net.model(["add"])) == {"add": (1, 0, "conv")}


def test_an_add_fed_by_a_convs_own_side_branch_is_not_residual():
    net = Net()
    conv = net.conv(net.qdq("x", "x"), "conv")
    gate = net.op("Sigmoid", [conv], "gate")
    net.op("Add", [conv, gate], "add")
    assert residual_adds(net.model(["add"])) == {}


def test_an_add_without_conv_inputs_is_not_residual():
    net = Net(inputs=("x", "y"))
    net.op("Add", [net.op("Relu", ["x"], "relu"), "y"], "add")
    assert residual_adds(net.model(["add"])) == {}


# --- placement summary --------------------------------------------------------------------------------------


def test_placement_summary_of_the_clean_block():
    net, output = clean_block()
    net.op("Sigmoid", [net.conv(output, "head", quantized=False)], "head_act")  # a float tail
    summary = placement_summary(net.model(["head_act"]))
    assert summary["weighted_ops"] == 5
    assert [item["node"] for item in summary["weighted_quantized"]] == ["conv1", "conv2", "conv3", "fc"]
    assert summary["weighted_float"] == [{"node": "head", "op": "Conv", "module_path": None}]
    assert (summary["residual_adds"], summary["residual_skip_quantized"], summary["residual_conv_side_quantized"]) \
        == (1, 1, 0)
    # the ReLUs after convs and the residual add count too (TensorRT may fuse them; the count is for comparing)
    assert summary["float_islands"] == {"nodes": 5, "components": 4,
                                        "op_types": {"Conv": 1, "Relu": 3, "Sigmoid": 1}}
    assert summary["qdq_pairs"] == 6
    assert summary["qoperator_ops"] == 0


# --- a real model: ResNet-18 quantised by ONNX Runtime ------------------------------------------------------


def test_onnxruntime_qdq_resnet18_breaks_the_residual_fusions_and_its_float_export_is_clean(tmp_path):
    """ORT quantises both inputs of every add and every conv output: TensorRT's Conv+Add fusions break."""
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from models.imagenet import ResNet18

    class RandomImages(CalibrationDataReader):
        def __init__(self):
            generator = np.random.default_rng(0)
            self.batches = iter([{"input": generator.standard_normal((1, 3, 64, 64), np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    float_path, qdq_path = tmp_path / "resnet18.onnx", tmp_path / "resnet18.qdq.onnx"
    torch.onnx.export(ResNet18().eval(), (torch.randn(1, 3, 64, 64),), str(float_path), dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["logits"])
    quantize_static(str(float_path), str(qdq_path), RandomImages(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True})
    assert lint_tensorrt(float_path) == []
    rules = [finding.rule for finding in lint_tensorrt(qdq_path)]
    assert rules.count("TRT006") == 8 and "TRT007" not in rules and "TRT005" not in rules
    assert rules.count("TRT009") >= 1  # conv -> Q/DQ -> ReLU
    summary = placement_summary(qdq_path)
    assert (summary["weighted_ops"], len(summary["weighted_quantized"]), summary["residual_adds"],
            summary["residual_skip_quantized"], summary["residual_conv_side_quantized"]) == (21, 21, 8, 8, 8)


# --- Q/DQ propagation through commuting layers --------------------------------------------------------------


def test_a_dequantize_reaches_a_conv_through_max_pooling():
    net = Net()
    pooled = net.op("MaxPool", [net.qdq("x", "x")], "pool", kernel_shape=[2, 2], strides=[2, 2])
    net.conv(pooled, "conv")
    model = net.model(["conv"])
    assert lint_tensorrt(model) == []
    assert [item["node"] for item in placement_summary(model)["weighted_quantized"]] == ["conv"]


@pytest.mark.parametrize("layout", ["Flatten", "Reshape", "Flatten+Reshape"])
def test_a_dequantize_reaches_a_gemm_through_flatten_and_reshape(layout):
    net = Net()
    source = net.qdq("x", "x")
    for op in layout.split("+"):
        if op == "Flatten":
            source = net.op("Flatten", [source], f"flatten_{source}")
        else:
            source = net.op("Reshape", [source, net.constant(f"shape_{source}", np.array([1, -1], np.int64))],
                            f"reshape_{source}")
    net.op("Gemm", [source, net.weight("fc_w", shape=(2, CHANNELS * 8 * 8))], "fc", transB=1)
    model = net.model(["fc"])
    assert lint_tensorrt(model) == []
    summary = placement_summary(model)
    assert [item["node"] for item in summary["weighted_quantized"]] == ["fc"] and summary["weighted_float"] == []


@pytest.mark.parametrize("op", ["Relu", "Sigmoid", "GlobalAveragePool"])
def test_a_dequantize_does_not_reach_a_conv_through_compute(op):
    """Non-commuting layers end the propagation: the conv's activation is float, its weight int8."""
    net = Net()
    net.conv(net.op(op, [net.qdq("x", "x")], "between"), "conv")
    model = net.model(["conv"])
    assert [finding for finding in found(model) if finding[0] == "TRT005"] == [("TRT005", "conv")]
    assert [item["node"] for item in placement_summary(model)["weighted_float"]] == ["conv"]


def test_a_float_input_through_max_pooling_is_still_float():
    net = Net()
    net.conv(net.op("MaxPool", ["x"], "pool", kernel_shape=[2, 2]), "conv")
    assert found(net.model(["conv"])) == [("TRT005", "conv")]


def test_a_residual_skip_quantised_before_max_pooling_counts_as_quantised():
    net = Net()
    first = net.op("Relu", [net.conv(net.qdq("x", "x"), "conv1")], "relu1")
    skip = net.op("MaxPool", [net.qdq(first, "relu1")], "pool", kernel_shape=[1, 1])
    net.op("Add", [net.conv(net.qdq(first, "conv2_in"), "conv2"), skip], "add")
    model = net.model(["add"])
    assert residual_adds(model) == {"add": (0, 1, "conv2")}
    assert lint_tensorrt(model) == []
    assert placement_summary(model)["residual_skip_quantized"] == 1
