"""Capture: front ends, dynamic batch, provenance, and the bad models of TESTING.md.

Each bad model either compiles and matches eager, or raises the intended typed error whose
message names the module path (and, for tracing failures, the file and line of the user code).
"""

from __future__ import annotations

import inspect as pyinspect
import os

import pytest
import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from compiler import CaptureError, UnsupportedOperatorError, compile, meta
from compiler.capture import capture
from tests.support import SmallCNN, randomize_batch_norm

RTOL, ATOL = 1e-3, 1e-5
THIS_FILE = os.path.basename(__file__)


# --- helpers -------------------------------------------------------------------------------


def line_of(function, text: str) -> int:
    """Absolute line number of the first source line of ``function`` containing ``text``."""
    lines, first = pyinspect.getsourcelines(function)
    return first + next(index for index, line in enumerate(lines) if text in line)


def assert_matches_eager(compiled, model: nn.Module, *inputs: torch.Tensor) -> None:
    expected = model(*inputs)
    actual = compiled(*inputs)
    assert pytree.tree_structure(actual) == pytree.tree_structure(expected)
    for got, want in zip(pytree.tree_leaves(actual), pytree.tree_leaves(expected), strict=True):
        if want is None:
            assert got is None
            continue
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want.detach().double(), rtol=RTOL, atol=ATOL)


def with_gate(gate: nn.Module) -> nn.Module:
    """``Linear -> block.gate`` so that the failing code sits at a nested module path."""

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Linear(4, 4)
            self.block = nn.Module()
            self.block.gate = gate

        def forward(self, x):
            return self.block.gate(self.pre(x))

    torch.manual_seed(0)
    return Wrapper().eval()


# --- models ------------------------------------------------------------------------------------


class CNNWithItemAssignment(SmallCNN):
    """Item assignment on a proxy: symbolic tracing fails, torch.export does not."""

    def forward(self, x):
        features = self.layers(x).mean((2, 3))
        features[:, 0] = 0.0
        return self.head(features)


class LoopOverChannels(nn.Module):
    """``range(x.shape[1])`` and item assignment: symbolic tracing cannot follow it."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        scaled = x.clone()
        for index in range(x.shape[1]):
            scaled[:, index] = x[:, index] * (index + 1)
        return self.linear(scaled) + x  # reads x after the writes: dropping the clone is wrong


class DataDependentBranch(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


class ItemBranch(nn.Module):
    def forward(self, x):
        if x.mean().item() > 0:
            return x * 2
        return x


class ItemValue(nn.Module):
    """``.item()`` as a Python scalar: capture must keep it computed, not baked in."""

    def forward(self, x):
        return x / (x.abs().max().item() + 1.0)


class FloatOfShape(nn.Module):
    def forward(self, x):
        return x * float(x.shape[1])


class MutatesInput(nn.Module):
    def forward(self, x):
        x.mul_(2)
        return x


class AssignsIntoInput(nn.Module):
    def forward(self, x):
        x[0] = 1.0
        return x + 1


class EagerCounter(nn.Module):
    """``self.count += 1`` never touches a proxy: symbolic tracing runs it and records nothing."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(1))

    def forward(self, x):
        self.count += 1
        return x + 1


class RunningTotal(nn.Module):
    """A buffer written with a value computed from the input: the write is a graph node."""

    def __init__(self):
        super().__init__()
        self.register_buffer("total", torch.zeros(()))

    def forward(self, x):
        self.total.add_(x.sum())
        return x * 2


class StructuredOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        y = self.linear(x)
        return {"logits": y, "aux": None, "pair": (y.relu(), (y * 2, y.sum(1)))}


class TiedLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 4, bias=False)
        self.decoder = nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight

    def forward(self, x):
        return self.decoder(self.encoder(x).relu())


class ClampTimesTwo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0) * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


class CustomFunction(nn.Module):
    def forward(self, x):
        return ClampTimesTwo.apply(x)


class SharedConvOutput(nn.Module):
    """The conv feeds a BatchNorm and another conv: folding the BN would change the other path."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.other = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + self.other(y)


class ConvBatchNorm(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, groups=groups)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return self.bn(self.conv(x)).relu()


@torch.library.custom_op("fxpress_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x.sin() * 2


@mystery.register_fake
def _mystery_fake(x):
    return torch.empty_like(x)


class Mystery(nn.Module):
    def forward(self, x):
        return mystery(x)


# --- front ends, dynamic batch, provenance ------------------------------------------------


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batch_norm(SmallCNN())


@pytest.fixture(scope="module")
def compiled_cnn(cnn):
    return compile(cnn, example_inputs=(torch.randn(2, 3, 8, 8),))


def test_cnn_is_captured_by_symbolic_trace(cnn):
    captured = capture(cnn, (torch.randn(2, 3, 8, 8),))
    assert captured.front_end == "torch.fx.symbolic_trace"
    assert captured.attempts == [{"front_end": "torch.fx.symbolic_trace", "error": ""}]
    assert captured.input_names == ("x",)


def test_compiled_ledger_records_the_front_end(compiled_cnn):
    assert compiled_cnn.report.front_end == "torch.fx.symbolic_trace"
    assert compiled_cnn.manifest["front_end"] == "torch.fx.symbolic_trace"


def test_item_assignment_on_a_proxy_falls_back_to_torch_export(cnn):
    model = CNNWithItemAssignment().eval()
    model.load_state_dict(cnn.state_dict())
    captured = capture(model, (torch.randn(2, 3, 8, 8),))
    assert captured.front_end == "torch.export"
    first, second = captured.attempts
    assert first["front_end"] == "torch.fx.symbolic_trace" and first["error"]
    assert second == {"front_end": "torch.export", "error": ""}
    compiled = compile(model, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert compiled.report.front_end == "torch.export"
    for batch in (1, 3):
        assert_matches_eager(compiled, model, torch.randn(batch, 3, 8, 8))


def test_loop_over_a_dimension_compiles_and_leaves_the_inputs_alone():
    torch.manual_seed(0)
    model = LoopOverChannels().eval()
    example = torch.randn(2, 4)
    untouched = example.clone()
    compiled = compile(model, example_inputs=(example,))
    assert compiled.report.front_end == "torch.export"
    torch.testing.assert_close(example, untouched, rtol=0, atol=0)
    for batch in (1, 3):
        assert_matches_eager(compiled, model, torch.randn(batch, 4))


def test_batch_dimension_is_dynamic_by_default(cnn):
    captured = capture(cnn, (torch.randn(2, 3, 8, 8),))
    assert captured.dynamic_dims == {0: {0: ("batch", 1, None)}}
    for batch in (1, 3):
        x = torch.randn(batch, 3, 8, 8)
        (output,) = captured.graph_module(x)
        assert output.shape == (batch, 5)
        torch.testing.assert_close(output, cnn(x), rtol=RTOL, atol=ATOL)


def test_compiled_model_runs_at_other_batch_sizes(compiled_cnn, cnn):
    for batch in (1, 3):
        assert_matches_eager(compiled_cnn, cnn, torch.randn(batch, 3, 8, 8))


@pytest.mark.parametrize("model_class", [SmallCNN, CNNWithItemAssignment])
def test_nodes_carry_module_paths(model_class):
    model = model_class().eval()
    graph = capture(model, (torch.randn(2, 3, 8, 8),)).graph_module.graph
    by_op: dict[str, set[str]] = {}
    for node in graph.nodes:
        if node.op == "call_function":
            by_op.setdefault(str(node.target), set()).add(node.meta[meta.MODULE_PATH])
    assert by_op["aten.conv2d.default"] == {"layers.0.conv", "layers.1.conv"}
    assert by_op["aten.relu.default"] == {"layers.0.act", "layers.1.act"}
    assert by_op["aten.linear.default"] == {"head"}
    conv = next(node for node in graph.nodes if node.target == torch.ops.aten.conv2d.default)
    assert conv.meta[meta.MODULE_TYPE] == "Conv2d"
    weights = {node.target: node.meta[meta.MODULE_PATH] for node in graph.nodes if node.op == "get_attr"}
    assert weights["layers.1.conv.weight"] == "layers.1.conv"


# --- tracing failures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gate", "function", "text"),
    [
        (DataDependentBranch, DataDependentBranch.forward, "if x.sum() > 0"),
        (ItemBranch, ItemBranch.forward, "if x.mean().item() > 0"),
    ],
    ids=["tensor-in-if", "item-in-if"],
)
def test_data_dependent_control_flow_names_module_and_source_line(gate, function, text):
    with pytest.raises(CaptureError) as raised:
        compile(with_gate(gate()), example_inputs=(torch.randn(2, 4),))
    message = str(raised.value)
    assert "'block.gate'" in message
    assert f"{THIS_FILE}:{line_of(function, text)}" in message
    assert raised.value.module_path == "block.gate"
    assert raised.value.source.startswith(f"{THIS_FILE}:{line_of(function, text)}")
    assert "torch.where" in message  # the hint


def test_item_as_a_python_scalar_stays_computed():
    model = with_gate(ItemValue())
    compiled = compile(model, example_inputs=(torch.randn(2, 4),))
    # a value baked in at capture time would be wrong for an input of another magnitude
    assert_matches_eager(compiled, model, 100 * torch.randn(3, 4))


def test_float_of_a_shape_compiles_or_names_the_module():
    model = with_gate(FloatOfShape())
    try:
        compiled = compile(model, example_inputs=(torch.randn(2, 4),))
    except CaptureError as error:
        assert "'block.gate'" in str(error)
        assert f"{THIS_FILE}:{line_of(FloatOfShape.forward, 'float(x.shape[1])')}" in str(error)
    else:
        for batch in (1, 3):
            assert_matches_eager(compiled, model, torch.randn(batch, 4))


# --- refused models --------------------------------------------------------------------------


def test_submodule_in_train_mode_is_refused():
    model = with_gate(nn.Dropout(0.5))
    model.block.gate.train()
    with pytest.raises(CaptureError, match=r"'block\.gate'.*training mode.*eval\(\)") as raised:
        compile(model, example_inputs=(torch.randn(2, 4),))
    assert raised.value.module_path == "block.gate"


def test_model_in_train_mode_is_refused():
    model = SmallCNN().train()
    with pytest.raises(CaptureError, match=r"'<root>'.*training mode"):
        compile(model, example_inputs=(torch.randn(2, 3, 8, 8),))


@pytest.mark.parametrize(
    ("tensor_name", "value"),
    [("layers.1.conv.weight", float("nan")), ("layers.0.bn.running_var", float("inf"))],
)
def test_non_finite_weights_are_refused(tensor_name, value):
    model = SmallCNN().eval()
    with torch.no_grad():
        owner, _, attribute = tensor_name.rpartition(".")
        getattr(model.get_submodule(owner), attribute).view(-1)[0] = value
    with pytest.raises(CaptureError) as raised:
        compile(model, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert f"'{tensor_name}'" in str(raised.value)
    assert f"'{owner}'" in str(raised.value)
    assert "NaN or Inf" in str(raised.value)
    assert raised.value.module_path == owner


def test_zero_size_batch_is_refused():
    with pytest.raises(CaptureError, match="batch size 0"):
        compile(SmallCNN().eval(), example_inputs=(torch.randn(0, 3, 8, 8),))


def test_in_place_write_to_an_input_names_the_module():
    with pytest.raises(CaptureError, match=r"'block\.gate' writes to the model input .* in place") as raised:
        compile(_gate_on_input(MutatesInput()), example_inputs=(torch.randn(2, 4),))
    assert raised.value.module_path == "block.gate"


def test_item_assignment_into_an_input_names_the_source_line():
    with pytest.raises(CaptureError, match="in place") as raised:
        compile(AssignsIntoInput().eval(), example_inputs=(torch.randn(2, 4),))
    assert f"{THIS_FILE}:{line_of(AssignsIntoInput.forward, 'x[0] = 1.0')}" in str(raised.value)


@pytest.mark.parametrize(
    ("gate", "buffer"),
    [(EagerCounter, "block.gate.count"), (RunningTotal, "block.gate.total")],
    ids=["python-increment", "graph-write"],
)
def test_buffer_written_during_forward_is_refused(gate, buffer):
    with pytest.raises(CaptureError) as raised:
        compile(with_gate(gate()), example_inputs=(torch.randn(2, 4),))
    message = str(raised.value)
    assert "'block.gate'" in message and buffer.rpartition(".")[2] in message
    assert "during forward" in message
    assert raised.value.module_path == "block.gate"


def test_operator_without_onnx_mapping_lists_op_and_module_path():
    model = with_gate(Mystery())
    with pytest.raises(UnsupportedOperatorError) as raised:
        compile(model, example_inputs=(torch.randn(2, 4),))
    assert raised.value.operators == [("fxpress_test.mystery", "block.gate")]
    assert "fxpress_test.mystery" in str(raised.value)
    assert "'block.gate'" in str(raised.value)


# --- models that must compile and match -----------------------------------------------------


def test_dict_none_and_nested_tuple_outputs_keep_their_structure():
    torch.manual_seed(0)
    model = StructuredOutputs().eval()
    compiled = compile(model, example_inputs=(torch.randn(2, 4),))
    output = compiled(torch.randn(3, 4))
    assert type(output) is dict and list(output) == ["logits", "aux", "pair"]
    assert output["aux"] is None
    assert type(output["pair"]) is tuple and type(output["pair"][1]) is tuple
    assert_matches_eager(compiled, model, torch.randn(3, 4))


def test_tied_weights_compile_and_count_once():
    torch.manual_seed(0)
    model = TiedLinears().eval()
    compiled = compile(model, example_inputs=(torch.randn(2, 4),))
    assert compiled.report.initial["params"] == 16 + 4  # one shared 4x4 weight, one bias
    assert_matches_eager(compiled, model, torch.randn(3, 4))


def test_custom_autograd_function_compiles_or_gives_a_typed_error():
    model = with_gate(CustomFunction())
    try:
        compiled = compile(model, example_inputs=(torch.randn(2, 4),))
    except (CaptureError, UnsupportedOperatorError) as error:
        assert "'block.gate'" in str(error)
    else:
        assert_matches_eager(compiled, model, torch.randn(3, 4))


def test_conv_with_several_consumers_keeps_its_batch_norm():
    torch.manual_seed(0)
    model = randomize_batch_norm(SharedConvOutput())
    compiled = compile(model, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert "aten.batch_norm" not in compiled.report.entry("fold_conv_bn").op_delta
    assert_matches_eager(compiled, model, torch.randn(3, 3, 8, 8))


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "groups"),
    [(3, 1, 1), (4, 8, 2)],
    ids=["out-channels-1", "groups-2-of-4"],
)
def test_unusual_convs_fold_and_match(in_channels, out_channels, groups):
    torch.manual_seed(0)
    model = randomize_batch_norm(ConvBatchNorm(in_channels, out_channels, groups))
    compiled = compile(model, example_inputs=(torch.randn(2, in_channels, 8, 8),))
    assert compiled.report.entry("fold_conv_bn").op_delta.get("aten.batch_norm") == -1
    for batch in (1, 3):
        assert_matches_eager(compiled, model, torch.randn(batch, in_channels, 8, 8))


def _gate_on_input(gate: nn.Module) -> nn.Module:
    """``block.gate`` applied to the model input itself, then a Linear."""

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Module()
            self.block.gate = gate
            self.post = nn.Linear(4, 4)

        def forward(self, x):
            return self.post(self.block.gate(x))

    return Wrapper().eval()
