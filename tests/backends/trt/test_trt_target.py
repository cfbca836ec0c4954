"""The trt-int8 target end to end on tiny seeded models: Q/DQ placement, lint, calibration cache, artifacts.

Each model is compiled once per module (``_compiled``); the placement tests read the FX graph
(``compiled.graph_module``) and the exported ONNX, and every artifact built here must lint clean
and agree with its torch emulation.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import math
import struct

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
from onnx import numpy_helper
from torch import nn

from backends.onnxruntime.transformer_kernels import avx512f
from backends.tensorrt.calibration_cache import parse_cache, version_number
from backends.tensorrt.graph_patterns import residual_adds
from backends.tensorrt.lint import lint_tensorrt
from backends.tensorrt.policy import TENSORRT, make_policy
from compiler import compile, ir, load, probe
from compiler.errors import ArtifactError, TargetError
from compiler.quant_ops import DEQUANTIZE_PER_CHANNEL, QUANTIZE_DEQUANTIZE
from compiler.targets import CALIBRATORS, get_target, with_calibrator
from tests.support import randomize_batch_norm

SIZE = 8  # image height and width
_WEIGHTED_TARGETS = ("aten.conv2d.default", "aten.linear.default")
_PASSTHROUGH_TARGETS = ("aten.flatten.using_ints", "aten.view.default", "aten.reshape.default",
                        "aten.max_pool2d.default")
_QOPERATORS = ("QLinearConv", "QLinearMatMul", "QLinearAdd", "QGemm", "ConvInteger", "MatMulInteger",
               "DynamicQuantizeLinear", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")


# --- models ---------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> add(skip) -> ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


class ResidualNet(nn.Module):
    """A stem conv, two residual blocks, global average pooling and a Linear(16, 16) head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(16), BasicBlock(16))
        self.head = nn.Linear(16, 16)

    def forward(self, x):
        return self.head(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


class DownsampleNet(nn.Module):
    """A residual block whose skip path has its own (downsample) conv; the skip is the add's input 0."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.downsample = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2), nn.BatchNorm2d(32))
        self.head = nn.Linear(32, 16)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(self.downsample(y) + self.conv2(self.conv1(y)))  # skip first: not the tie-break's pick
        return self.head(y.mean((2, 3)))


class NarrowNet(nn.Module):
    """A first conv with 3 input and 8 output channels, the same 8x8 shape deeper, and a Linear(16, 10) head."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 8, 3, padding=1)  # quantised: ModelOpt's first-layer exception
        self.middle = nn.Conv2d(8, 8, 3, padding=1)  # float: under 16 channels and not the first layer
        self.widen = nn.Conv2d(8, 16, 3, padding=1)  # quantised: 16 output channels
        self.hidden = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)  # float: 10 output features

    def forward(self, x):
        y = torch.relu(self.widen(torch.relu(self.middle(torch.relu(self.first(x))))))
        return self.head(torch.relu(self.hidden(y.mean((2, 3)))))


class ConcatNet(nn.Module):
    """Two conv branches of different ranges, concatenated and read by a conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.left = nn.Conv2d(16, 16, 3, padding=1)
        self.right = nn.Conv2d(16, 16, 1)
        with torch.no_grad():
            self.right.weight.mul_(6.0)  # a range several times the left branch's
        self.fuse = nn.Conv2d(32, 16, 1)
        self.head = nn.Linear(16, 16)

    def forward(self, x):
        y = self.stem(x)
        joined = torch.cat([torch.relu(self.left(y)), torch.relu(self.right(y))], dim=1)
        return self.head(torch.relu(self.fuse(joined)).mean((2, 3)))


class DecoderNet(nn.Module):
    """A UNet-style decoder step: a strided conv, a transposed conv back up, concatenated with the skip."""

    def __init__(self):
        super().__init__()
        self.encode = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.decode = nn.Conv2d(32, 16, 3, padding=1)

    def forward(self, x):
        skip = self.encode(x)
        return self.decode(torch.cat([skip, self.up(torch.relu(self.down(skip)))], dim=1))


class TransformerBlock(nn.Module):
    """Pre-norm single-head attention (two activation matmuls, softmax) and a Linear-GELU-Linear MLP."""

    def __init__(self, dim: int = 32, hidden: int = 64):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.scale = dim ** -0.5

    def forward(self, x):
        h = self.norm1(x)
        weights = torch.softmax(torch.matmul(self.query(h), self.key(h).transpose(-2, -1)) * self.scale, dim=-1)
        x = x + self.proj(torch.matmul(weights, self.value(h)))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


def _seeded(factory) -> nn.Module:
    torch.manual_seed(0)
    model = factory()
    with torch.no_grad():  # non-zero biases and BatchNorm statistics
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.uniform_(-0.2, 0.2)
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return randomize_batch_norm(model)


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _tokens(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 6, 32, generator=torch.Generator().manual_seed(seed))


MODELS = {
    "residual": (ResidualNet, _images),
    "downsample": (DownsampleNet, _images),
    "narrow": (NarrowNet, _images),
    "concat": (ConcatNet, _images),
    "decoder": (DecoderNet, _images),
    "transformer": (TransformerBlock, _tokens),
}


def _without_gptq(target):
    """``target`` without GPTQ rounding (2-3 s a compile here): for the tests of calibration and the cache."""
    target = get_target(target)
    return dataclasses.replace(target, pipeline=tuple(spec for spec in target.pipeline if spec.name != "gptq"))


def _float_module_target(path: str):
    target = get_target("trt-int8")
    return dataclasses.replace(target, quant_policy={**target.quant_policy, "float_modules": [path]})


# name -> (model, target); every artifact here is checked by test_every_artifact_lints_clean_and_agrees
BUILDS = {
    **{name: (name, "trt-int8") for name in MODELS},
    "residual-float-module": ("residual", _without_gptq(_float_module_target("blocks.0.conv1"))),
    **{f"residual-{calibrator}": ("residual", _without_gptq(with_calibrator("trt-int8", calibrator)))
       for calibrator in CALIBRATORS if calibrator != "mse"},
}


@functools.cache
def _compiled(build: str):
    name, target = BUILDS[build]
    factory, data = MODELS[name]
    return compile(_seeded(factory), target, data(2, 0), calibration_data=[data(32, 1)], model_name=name)


# --- helpers --------------------------------------------------------------------------------------------------


def _calls(gm: fx.GraphModule, *targets: str) -> list[fx.Node]:
    return [node for node in gm.graph.nodes if node.op == "call_function" and str(node.target) in targets]


def _module_node(gm: fx.GraphModule, path: str, target: str = "aten.conv2d.default") -> fx.Node:
    (node,) = [node for node in _calls(gm, target) if ir.module_path(node) == path]
    return node


def _residual_placement(compiled) -> tuple[int, int, int]:
    """(residual adds, their skips quantised, their conv sides quantised) as the lowering counted them."""
    placement = compiled.report.lowering["placement"]
    return (placement["residual_adds"], placement["residual_skip_quantized"],
            placement["residual_conv_side_quantized"])


def _quantiser_behind(value: object) -> fx.Node | None:
    """The quantise-dequantise node that ``value`` is, looking through reshapes, flattens and max-pooling."""
    while isinstance(value, fx.Node) and str(value.target) in _PASSTHROUGH_TARGETS:
        value = value.args[0]
    return value if isinstance(value, fx.Node) and value.target is QUANTIZE_DEQUANTIZE else None


def _weight_is_int8_per_channel(gm: fx.GraphModule, node: fx.Node) -> bool:
    weight = node.args[1]
    if weight.target is not DEQUANTIZE_PER_CHANNEL:
        return False
    integers, scales = (ir.get_attribute(gm, argument.target) for argument in weight.args[:2])
    return integers.dtype == torch.int8 and weight.args[2] == 0 and tuple(scales.shape) == (integers.shape[0],)


def _is_quantised(gm: fx.GraphModule, node: fx.Node) -> bool:
    return _quantiser_behind(node.args[0]) is not None and _weight_is_int8_per_channel(gm, node)


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    found = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in model.graph.node for output in node.output}


def _activation_scales(model: onnx.ModelProto) -> dict[str, float]:
    """Input tensor -> scale of every QuantizeLinear on an activation, read from the ONNX."""
    constants = _constants(model)
    return {node.input[0]: float(constants[node.input[1]]) for node in model.graph.node
            if node.op_type == "QuantizeLinear" and node.input[0] not in constants}


def _layer_rows(compiled, kind: str = "weight") -> dict[str, dict]:
    return {row["module_path"]: row for row in compiled.report.entry("insert_qdq").stats["layers"]
            if row["kind"] == kind}


def _activation_rows(compiled) -> list[dict]:
    return [row for row in compiled.report.entry("insert_qdq").stats["layers"] if row["kind"] == "activation"]


def _attribute(node: onnx.NodeProto, name: str):
    found = [onnx.helper.get_attribute_value(attribute) for attribute in node.attribute if attribute.name == name]
    return found[0] if found else None


# --- placement: residual CNN ----------------------------------------------------------------------------------


def test_every_conv_and_linear_reads_a_quantised_input_and_int8_per_channel_weights():
    gm = _compiled("residual").graph_module
    weighted = _calls(gm, *_WEIGHTED_TARGETS)
    assert len(weighted) == 6  # stem, four block convs, head
    for node in weighted:
        assert _quantiser_behind(node.args[0]) is not None, f"{node.name} reads a float activation"
        assert _weight_is_int8_per_channel(gm, node), f"{node.name} has no int8 per-channel weight"


def test_no_quantiser_on_a_conv_or_linear_output():
    gm = _compiled("residual").graph_module
    quantisers = _calls(gm, "fxpress.quantize_dequantize.default")
    assert quantisers and all(node.target is QUANTIZE_DEQUANTIZE for node in quantisers)
    fed_by_weighted = [node.name for node in quantisers if str(node.args[0].target) in _WEIGHTED_TARGETS]
    assert fed_by_weighted == []
    # the output quantisers sit after the fused ReLUs instead
    assert all(str(node.args[0].target) in ("aten.relu.default", "aten.mean.dim", "aten.adaptive_avg_pool2d.default")
               or node.args[0].op == "placeholder" for node in quantisers), [node.args[0] for node in quantisers]


def test_residual_adds_quantise_the_skip_input_and_not_the_conv_side():
    compiled = _compiled("residual")
    adds = _calls(compiled.graph_module, "aten.add.Tensor")
    assert len(adds) == 2
    for add in adds:
        conv_side, skip = add.args
        assert str(conv_side.target) == "aten.conv2d.default", f"{add.name}: a quantiser on the conv side"
        assert skip.target is QUANTIZE_DEQUANTIZE, f"{add.name}: float skip input"
    assert compiled.report.entry("insert_qdq").stats["residual_adds"] == 2
    assert _residual_placement(compiled) == (2, 2, 0)


def test_biases_stay_float():
    compiled = _compiled("residual")
    gm = compiled.graph_module
    for node in _calls(gm, *_WEIGHTED_TARGETS):
        bias = node.args[2]
        assert bias.op == "get_attr" and ir.get_attribute(gm, bias.target).dtype == torch.float32, node.name
    assert all(row["bias"].startswith("float") for row in _layer_rows(compiled).values())
    constants = _constants(compiled.onnx)
    int32 = [node.name for node in compiled.onnx.graph.node if node.op_type == "DequantizeLinear"
             and node.input[0] in constants and constants[node.input[0]].dtype == np.int32]
    assert int32 == []
    for node in compiled.onnx.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            assert constants[node.input[2]].dtype == np.float32, node.name


def test_onnx_has_symmetric_int8_qdq_with_scalar_activation_scales_and_explicit_weight_axes():
    model = _compiled("residual").onnx
    constants, producers = _constants(model), _producers(model)
    qdq = [node for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")]
    weight_dqs = [node for node in qdq if node.input[0] in constants]
    activation_qdqs = [node for node in qdq if node.input[0] not in constants]
    assert len(weight_dqs) == 6 and len(activation_qdqs) == 2 * len(_activation_scales(model)) > 0
    for node in qdq:
        assert len(node.input) == 3, f"{node.name}: no zero point (ONNX would default to uint8)"
        zero_point = constants[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any(), node.name
    for node in activation_qdqs:
        assert constants[node.input[1]].shape == (), f"{node.name}: activation scale is not a scalar"
        if node.op_type == "DequantizeLinear":
            assert producers[node.input[0]].op_type == "QuantizeLinear"
    for node in weight_dqs:
        values, scale = constants[node.input[0]], constants[node.input[1]]
        assert node.op_type == "DequantizeLinear" and values.dtype == np.int8
        assert _attribute(node, "axis") == 0, f"{node.name}: per-channel weight without an explicit axis 0"
        assert scale.shape == (values.shape[0],) and (scale > 0).all()
    ops = collections.Counter(node.op_type for node in model.graph.node)
    assert not any(ops[name] for name in _QOPERATORS), ops
    assert ops["Conv"] == 5 and ops["Gemm"] == 1


def test_onnx_runtime_output_matches_the_emulation_and_stays_close_to_float():
    compiled = _compiled("residual")
    model = _seeded(ResidualNet)
    inputs = _images(32, 5)
    runtime = compiled(inputs)
    assert probe.within_steps((runtime,), (compiled.simulate(inputs),), 1.0) >= 0.999
    with torch.no_grad():
        reference = model(inputs)
    assert probe.drift((runtime,), (reference,)).sqnr_db >= 35  # TESTING.md: per-channel random-weight CNN


# --- placement: two conv branches into one add ----------------------------------------------------------------


def test_a_downsample_skip_gets_the_quantiser_and_the_longer_branch_is_the_conv_side():
    compiled = _compiled("downsample")
    gm = compiled.graph_module
    (add,) = _calls(gm, "aten.add.Tensor")
    downsample, conv2 = _module_node(gm, "downsample.0"), _module_node(gm, "conv2.0")
    assert add.args[0].target is QUANTIZE_DEQUANTIZE and add.args[0].args[0] is downsample
    assert add.args[1] is conv2
    assert [node.args[0] for node in downsample.users] == [downsample]  # its only reader is the quantiser
    assert all(_is_quantised(gm, node) for node in _calls(gm, *_WEIGHTED_TARGETS))
    model = compiled.onnx
    (name,) = [node.name for node in model.graph.node if node.op_type == "Add"]
    found = residual_adds(model)
    assert found[name][:2] == (1, 0) and found[name][2].startswith("conv2.0/")
    assert _residual_placement(compiled) == (1, 1, 0)


# --- narrow layers ---------------------------------------------------------------------------------------------


def test_a_narrow_linear_stays_float_and_the_ledger_says_why():
    compiled = _compiled("narrow")
    gm = compiled.graph_module
    head = _module_node(gm, "head", "aten.linear.default")
    assert not _is_quantised(gm, head)
    assert head.args[1].op == "get_attr" and ir.get_attribute(gm, head.args[1].target).dtype == torch.float32
    assert _quantiser_behind(head.args[0]) is None
    row = _layer_rows(compiled)["head"]
    assert row["decision"] == "float" and row["dtype"] == "float32"
    assert row["why"] == "16 input / 10 output channels, under the 16 of the int8 kernels"
    assert _is_quantised(gm, _module_node(gm, "hidden", "aten.linear.default"))
    floats = {item["module_path"] for item in compiled.report.lowering["placement"]["weighted_float"]}
    assert floats == {"head", "middle"}


def test_a_first_conv_with_3_input_channels_stays_quantised_and_the_same_width_deeper_does_not():
    compiled = _compiled("narrow")
    gm = compiled.graph_module
    first, middle, widen = (_module_node(gm, path) for path in ("first", "middle", "widen"))
    assert _is_quantised(gm, first) and first.args[0].args[0].op == "placeholder"
    assert _layer_rows(compiled)["first"]["decision"] == "int8"
    assert not _is_quantised(gm, middle) and _quantiser_behind(middle.args[0]) is None
    assert "8 input / 8 output channels" in _layer_rows(compiled)["middle"]["why"]
    assert _is_quantised(gm, widen)


def test_policy_small_channel_rule_follows_modelopt():
    from compiler.quant_policy import small_channels

    def conv(in_channels, out_channels, first=False, groups=1, kernel=3):
        graph = fx.Graph()
        source = graph.placeholder("x")
        if not first:
            source = graph.call_function(torch.ops.aten.relu.default, (source,))
        weight = graph.get_attr("w")
        weight.meta["val"] = torch.empty(out_channels, in_channels // groups, kernel, kernel)
        return graph.call_function(torch.ops.aten.conv2d.default, (source, weight, None, [1, 1], [1, 1], [1, 1],
                                                                   groups))

    assert small_channels(conv(3, 8, first=True), 16) is None
    assert small_channels(conv(3, 8), 16) is not None  # the exception is for the first layer only
    assert small_channels(conv(3, 6, first=True), 16) is not None  # neither side a multiple of 8
    assert small_channels(conv(16, 4), 16) is None  # 16 input channels
    assert small_channels(conv(16, 16, groups=16), 16) is None  # depthwise, 16 outputs, 3x3
    assert small_channels(conv(16, 16, groups=16, kernel=1), 16) is not None


# --- concat -----------------------------------------------------------------------------------------------------


def test_concat_inputs_and_output_share_one_scale():
    compiled = _compiled("concat")
    model = compiled.onnx
    constants, producers = _constants(model), _producers(model)
    (concat,) = [node for node in model.graph.node if node.op_type == "Concat"]
    feeding = [producers[name] for name in concat.input]
    assert [node.op_type for node in feeding] == ["DequantizeLinear", "DequantizeLinear"]
    scales = {float(constants[node.input[1]]) for node in feeding}
    readers = [node for node in model.graph.node if concat.output[0] in node.input]
    assert [node.op_type for node in readers] == ["QuantizeLinear"]
    scales.add(float(constants[readers[0].input[1]]))
    assert len(scales) == 1, scales
    stats = compiled.report.entry("calibrate").stats
    assert stats["concat_shared"] >= 2  # the branches' ranges differed and were merged
    assert not any(finding["rule"] == "TRT010" for finding in compiled.report.lowering["lint_findings"])
    assert lint_tensorrt(model) == []
    shared = [tuple(row["range"]) for row in _activation_rows(compiled) if any(" cat" in why for why in row["why"])]
    assert len(shared) == 3 and len(set(shared)) == 1, shared


# --- transformer block ------------------------------------------------------------------------------------------


def test_transformer_block_keeps_norms_softmax_gelu_and_attention_matmuls_float():
    compiled = _compiled("transformer")
    gm = compiled.graph_module
    linears = _calls(gm, "aten.linear.default")
    assert len(linears) == 6 and all(_is_quantised(gm, node) for node in linears)
    float_ops = _calls(gm, "aten.layer_norm.default", "aten.softmax.int", "aten._softmax.default",
                       "aten.gelu.default", "aten.matmul.default", "aten.bmm.default")
    kinds = collections.Counter(str(node.target).split(".")[1] for node in float_ops)
    assert kinds["layer_norm"] == 2 and kinds["gelu"] == 1 and kinds["matmul"] + kinds["bmm"] == 2
    assert kinds["softmax"] + kinds["_softmax"] == 1, kinds
    for node in float_ops:
        inputs = [value for value in node.args if isinstance(value, fx.Node)]
        assert all(_quantiser_behind(value) is None for value in inputs), f"{node.name} reads a quantised input"
    for add in _calls(gm, "aten.add.Tensor"):
        assert all(_quantiser_behind(value) is None for value in add.args if isinstance(value, fx.Node))
    model = compiled.onnx
    producers = _producers(model)
    ops = collections.Counter(node.op_type for node in model.graph.node)
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "Gelu", "Erf"):
            assert node.input[0] not in producers or producers[node.input[0]].op_type != "DequantizeLinear"
    assert ops["LayerNormalization"] == 2 and ops["Softmax"] == 1
    placement = compiled.report.lowering["placement"]
    assert len(placement["weighted_quantized"]) == 6 and placement["weighted_float"] == []


@pytest.mark.skipif(not avx512f(), reason="the float kernels emulated are ONNX Runtime's AVX-512F ones")
def test_the_transformer_block_simulates_the_runtime_bit_for_bit():
    compiled = _compiled("transformer")
    inputs = _tokens(16, 5)
    assert torch.equal(compiled(inputs), compiled.simulate(inputs))


def test_a_transposed_conv_reads_int8_weights_per_output_channel_on_axis_1():
    compiled = _compiled("decoder")
    (node,) = _calls(compiled.graph_module, "aten.conv_transpose2d.input")
    weight = node.args[1]
    assert weight.target is DEQUANTIZE_PER_CHANNEL and weight.args[2] == 1
    assert ir.get_attribute(compiled.graph_module, weight.args[0].target).dtype == torch.int8
    assert _quantiser_behind(node.args[0]) is not None
    (transpose,) = [n for n in compiled.onnx.graph.node if n.op_type == "ConvTranspose"]
    producers = {output: n for n in compiled.onnx.graph.node for output in n.output}
    dequantize = producers[transpose.input[1]]
    assert dequantize.op_type == "DequantizeLinear"
    assert [a.i for a in dequantize.attribute if a.name == "axis"] == [1]
    placement = compiled.report.lowering["placement"]
    assert len(placement["weighted_quantized"]) == 4 and placement["weighted_float"] == []


# --- every artifact ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", list(BUILDS))
def test_every_artifact_lints_clean_and_agrees_with_its_emulation(build):
    compiled = _compiled(build)
    assert compiled.report.lowering["lint_findings"] == []
    assert compiled.report.fallbacks == []
    assert lint_tensorrt(compiled.onnx) == []
    agreement = compiled.report.lowering["simulation_agreement"]
    assert agreement["fraction"] >= 0.999 and agreement["within_steps"] == 1.0
    assert compiled.report.lowering["placement"]["qoperator_ops"] == 0


# --- calibration cache --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", ["residual", "concat", "transformer"])
def test_the_cache_holds_exactly_the_activation_scales_of_the_onnx(build):
    compiled = _compiled(build)
    header, scales = parse_cache(compiled.files["calibration.cache"].decode())
    assert header == "TRT-101600-EntropyCalibration2"
    expected = _activation_scales(compiled.onnx)
    assert scales == expected and len(scales) == compiled.report.lowering["calibration_cache"]["tensors"]
    # the ledger's scales (float32 values), one per quantised activation
    assert sorted(scales.values()) == sorted(row["scale"] for row in _activation_rows(compiled))
    table = json.loads(compiled.files["calibration.json"])
    assert set(table) == set(scales)
    assert all(math.isclose(table[name]["amax"], scale * 127, rel_tol=1e-6) for name, scale in scales.items())


def test_the_cache_text_format():
    text = _compiled("residual").files["calibration.cache"].decode()
    header, *lines = text.splitlines()
    assert text.endswith("\n") and header == "TRT-101600-EntropyCalibration2"
    scales = _activation_scales(_compiled("residual").onnx)
    assert lines == [f"{name}: {struct.pack('>f', scale).hex()}" for name, scale in scales.items()]
    assert all(len(line.rpartition(": ")[2]) == 8 for line in lines)


@pytest.mark.parametrize(("version", "number"), [("10.16.0", 101600), ("10.3", 100300), ("8.5.1", 8501),
                                                 ("7.1.3", 7103), ("11", 110000)])
def test_cache_version_numbers_are_tensorrts(version, number):
    assert version_number(version) == number


def test_the_cache_header_follows_the_backend_options():
    target = _without_gptq("trt-int8")
    options = {"calibration_cache_version": "8.5.1", "calibration_cache_algorithm": "MinMaxCalibration"}
    target = dataclasses.replace(target, backend_options={**target.backend_options, **options})
    compiled = compile(_seeded(NarrowNet), target, _images(2, 0), calibration_data=[_images(16, 1)])
    header, scales = parse_cache(compiled.files["calibration.cache"].decode())
    assert header == compiled.report.lowering["calibration_cache"]["header"] == "TRT-8501-MinMaxCalibration"
    assert scales == _activation_scales(compiled.onnx)
    assert compiled.report.lowering["lint_findings"] == [] and compiled.report.fallbacks == []


def test_a_malformed_cache_version_or_algorithm_is_a_target_error():
    target = get_target("trt-int8")
    for options in ({"calibration_cache_version": "ten"}, {"calibration_cache_algorithm": "Histogram"}):
        bad = dataclasses.replace(target, backend_options={**target.backend_options, **options})
        with pytest.raises(TargetError):
            compile(_seeded(NarrowNet), bad, _images(2, 0), calibration_data=[_images(16, 1)])


def test_no_cache_files_when_switched_off():
    target = _without_gptq("trt-int8")
    target = dataclasses.replace(target, backend_options={**target.backend_options, "calibration_cache": False})
    compiled = compile(_seeded(NarrowNet), target, _images(2, 0), calibration_data=[_images(16, 1)])
    assert compiled.files == {}
    assert compiled.report.lowering["calibration_cache"] == {"written": False, "why": "disabled"}
    assert compiled.report.lowering["lint_findings"] == [] and compiled.report.fallbacks == []


@pytest.mark.parametrize(("build", "factory", "data"), [
    ("residual", ResidualNet, _images), ("concat", ConcatNet, _images), ("transformer", TransformerBlock, _tokens)])
def test_the_implicit_model_is_float_names_the_cache_tensors_and_runs_close_to_fp32(build, factory, data):
    compiled = _compiled(build)
    implicit = onnx.load_from_string(compiled.files["model.implicit.onnx"])
    onnx.checker.check_model(implicit, full_check=True)
    ops = collections.Counter(node.op_type for node in implicit.graph.node)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 0, ops
    tensors = {name for node in implicit.graph.node for name in node.output} | {
        value.name for value in implicit.graph.input}
    _, scales = parse_cache(compiled.files["calibration.cache"].decode())
    assert set(scales) <= tensors
    # its weights are the dequantised int8 weights of the Q/DQ model, exactly
    constants, float_constants = _constants(compiled.onnx), _constants(implicit)
    weight_dqs = [node for node in compiled.onnx.graph.node
                  if node.op_type == "DequantizeLinear" and node.input[0] in constants]
    assert weight_dqs
    for node in weight_dqs:
        integers, scale = constants[node.input[0]].astype(np.float64), constants[node.input[1]].astype(np.float64)
        shape = [1] * integers.ndim
        shape[_attribute(node, "axis")] = -1  # 0 for Conv and Gemm, 1 for MatMul's [K, N] weights
        np.testing.assert_array_equal(float_constants[node.output[0]], (integers * scale.reshape(shape))
                                      .astype(np.float32))
    session = ort.InferenceSession(implicit.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = data(32, 9)
    (output,) = session.run(None, {implicit.graph.input[0].name: inputs.numpy()})
    with torch.no_grad():
        reference = _seeded(factory)(inputs)
    assert probe.drift((torch.from_numpy(output),), (reference,)).sqnr_db > 45  # int8 weights alone: 58-67 dB
    quantised = compiled(inputs)
    # without the activation quantisers it is closer to fp32 than the Q/DQ model
    assert probe.drift((torch.from_numpy(output),), (reference,)).sqnr_db > probe.drift((quantised,),
                                                                                          (reference,)).sqnr_db


def test_modelopt_reads_the_cache_to_the_same_scales(tmp_path):
    calib_utils = pytest.importorskip("modelopt.onnx.quantization.calib_utils")
    compiled = _compiled("residual")
    path = tmp_path / "calibration.cache"
    path.write_bytes(compiled.files["calibration.cache"])
    imported = calib_utils.import_scales_from_calib_cache(str(path))  # keys: "<tensor>_scale"
    assert all(key.endswith("_scale") for key in imported)
    assert {key.removesuffix("_scale"): value for key, value in imported.items()} == _activation_scales(compiled.onnx)


# --- save / load ------------------------------------------------------------------------------------------------


_EXTRA_FILES = ("calibration.cache", "calibration.json", "model.implicit.onnx")


def test_save_writes_and_checksums_the_extra_files_and_load_reads_them(tmp_path):
    compiled = _compiled("residual")
    directory = compiled.save(tmp_path / "artifact")
    manifest = json.loads((directory / "manifest.json").read_text())
    for name in _EXTRA_FILES:
        data = (directory / name).read_bytes()
        assert data == compiled.files[name]
        assert manifest["files"][name] == hashlib.sha256(data).hexdigest()
    loaded = load(directory)
    assert loaded.files == compiled.files
    inputs = _images(8, 3)
    torch.testing.assert_close(loaded(inputs), compiled(inputs), rtol=0, atol=0)
    resaved = loaded.save(tmp_path / "again")
    assert sorted(path.name for path in resaved.iterdir()) == sorted(path.name for path in directory.iterdir())
    again = json.loads((resaved / "manifest.json").read_text())
    assert {name: again["files"][name] for name in _EXTRA_FILES} == {name: manifest["files"][name]
                                                                       for name in _EXTRA_FILES}
    assert load(resaved).files == compiled.files


@pytest.mark.parametrize("change", ["tamper", "delete"])
def test_a_changed_or_missing_calibration_cache_is_refused(tmp_path, change):
    directory = _compiled("residual").save(tmp_path / "artifact")
    cache = directory / "calibration.cache"
    if change == "tamper":
        cache.write_text(cache.read_text().replace("TRT-101600", "TRT-8501"))
    else:
        cache.unlink()
    with pytest.raises(ArtifactError, match="calibration.cache"):
        load(directory)


# --- calibrators --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("calibrator", "observer"), [("entropy", "entropy"), ("max", "minmax"),
                                                      ("percentile", "percentile"), ("mse", "mse")])
def test_with_calibrator_sets_the_recorded_observer(calibrator, observer):
    assert CALIBRATORS[calibrator][0] == observer
    compiled = _compiled("residual" if calibrator == "mse" else f"residual-{calibrator}")
    stats = compiled.report.entry("calibrate").stats
    assert stats["observers"] == {observer: stats["tensors"]}
    rows = _activation_rows(compiled)
    assert {row["calibrator"] for row in rows} == {observer}
    for row in rows:
        largest = max(abs(value) for value in row["observed"])
        if calibrator == "max":  # the full range seen: scale = max|x| / 127
            assert math.isclose(row["scale"], largest / 127, rel_tol=1e-6), row
        else:
            assert row["scale"] <= largest / 127 * (1 + 1e-6), row


def test_calibrators_give_different_scales():
    scales = {calibrator: [row["scale"] for row in _activation_rows(
        _compiled("residual" if calibrator == "mse" else f"residual-{calibrator}"))]
        for calibrator in CALIBRATORS}
    assert len({tuple(values) for values in scales.values()}) == len(CALIBRATORS), scales


def test_with_calibrator_options_reach_the_calibrate_pass():
    target = with_calibrator("trt-int8", "percentile", percentile=99.0)
    (spec,) = [spec for spec in target.pipeline if spec.name == "calibrate"]
    assert (spec.options["observer"], spec.options["observer_options"]) == ("percentile", {"percentile": 99.0})
    (default,) = [spec for spec in with_calibrator("trt-int8", "percentile").pipeline if spec.name == "calibrate"]
    assert default.options["observer_options"] == {"percentile": 99.99}
    assert [spec.name for spec in target.pipeline] == [spec.name for spec in get_target("trt-int8").pipeline]


def test_unknown_calibrator_and_non_calibrating_targets_are_target_errors():
    with pytest.raises(TargetError, match="unknown calibrator 'kl'"):
        with_calibrator("trt-int8", "kl")
    with pytest.raises(TargetError, match="does not calibrate"):
        with_calibrator("cpu-fp32", "max")


# --- policy ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [{"activation_dtype": "uint8"}, {"activation_symmetric": False},
                                    {"quantize_bias": True}, {"weight_bits": 7}])
def test_policy_refuses_what_tensorrt_cannot_run(fields):
    with pytest.raises(TargetError, match=next(iter(fields))):
        make_policy(fields)


def test_policy_overrides_and_defaults():
    assert make_policy({}) == TENSORRT
    assert make_policy({"activation_dtype": "int8"}) == TENSORRT
    policy = make_policy({"float_modules": ["blocks.*"], "min_gemm_channels": 32})
    assert policy.float_modules == ("blocks.*",) and policy.min_gemm_channels == 32
    with pytest.raises(TargetError, match="unknown TensorRT quantisation policy"):
        make_policy({"base": "onnxruntime-cpu"})


def test_float_modules_keeps_that_conv_float_with_its_reason():
    compiled = _compiled("residual-float-module")
    gm = compiled.graph_module
    conv = _module_node(gm, "blocks.0.conv1")
    assert not _is_quantised(gm, conv) and conv.args[1].op == "get_attr"
    assert _quantiser_behind(conv.args[0]) is None
    row = _layer_rows(compiled)["blocks.0.conv1"]
    assert row["decision"] == "float" and row["why"] == "module path matches float_modules pattern 'blocks.0.conv1'"
    others = [node for node in _calls(gm, *_WEIGHTED_TARGETS) if node is not conv]
    assert len(others) == 5 and all(_is_quantised(gm, node) for node in others)
    floats = compiled.report.lowering["placement"]["weighted_float"]
    assert [item["module_path"] for item in floats] == ["blocks.0.conv1"]


def test_a_calibrator_option_its_observer_lacks_is_a_target_error():
    target = with_calibrator("trt-int8", "max", percentile=99.0)
    with pytest.raises(TargetError, match="observer 'minmax' has no option"):
        compile(_seeded(NarrowNet), target, _images(2, 0), calibration_data=[_images(16, 1)])
