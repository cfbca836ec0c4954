"""The integer emulation against real ONNX Runtime sessions: every kernel bit for bit, then a whole CNN.

Each kernel test builds a one-group IR with the ``fxpress`` quantisation ops, lowers it with the
onnxruntime backend (the same export the compiler uses), checks in the optimised graph that the
runtime really runs the kernel meant (QLinearConv, QLinearAdd, QGemm; NCHWc Conv, Gemm, ReduceMean
for float layers), and compares the runtime's output with ``emulate`` element by element. The data
are sized (~10^4 to 10^5 outputs) and some scales chosen so that rounding ties occur often.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
from torch import nn

from backends.onnxruntime import DISABLED_OPTIMIZERS, OnnxRuntimeBackend
from backends.onnxruntime.emulation import emulate, grid_integers
from backends.onnxruntime.kernels import QParams, fma32, nchwc_block_size, qlinear_add
from backends.onnxruntime.qdq_fusion import find_groups
from compiler import compile, probe
from compiler.backend_base import LoweringRequest
from compiler.errors import EmulationError
from compiler.quant_ops import DEQUANTIZE_PER_CHANNEL, QUANTIZE_DEQUANTIZE
from compiler.targets import get_target
from tests.support import randomize_batch_norm

aten = torch.ops.aten
UINT8 = (0, 255)
INT8 = (-128, 127)


def _grid(scale: float, zero_point: int, bounds=UINT8) -> tuple:
    return (float(np.float32(scale)), zero_point, *bounds)


def _on_grid(generator: torch.Generator, shape, grid: tuple) -> torch.Tensor:
    """Float inputs whose quantiser reproduces random integers over the whole range (and some off-grid values)."""
    scale, zero_point, qmin, qmax = grid
    q = torch.randint(qmin, qmax + 1, shape, generator=generator)
    jitter = (torch.rand(shape, generator=generator) - 0.5) * scale * 0.98
    return ((q - zero_point).float() * scale + jitter).float()


def _constants(weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor, x_grid: tuple) -> tuple:
    """Integer weights and bias with their scales, as parameters: tracing keeps them (and their DQ) in the graph."""
    bias_scale = (weight_scale.double() * x_grid[0]).float()
    return tuple(nn.Parameter(tensor, requires_grad=False) for tensor in (weight, weight_scale, bias, bias_scale))


class QuantConv(nn.Module):
    """Q(x) [-> pad] -> conv(DQ(w), DQ(b)) [-> ReLU6] -> Q: one QLinearConv."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor, x_grid: tuple,
                 y_grid: tuple, *, stride: int = 1, groups: int = 1, pad: bool = False, relu6: bool = False):
        super().__init__()
        self.weight, self.weight_scale, self.bias, self.bias_scale = _constants(weight, weight_scale, bias, x_grid)
        self.x_grid, self.y_grid, self.stride, self.groups = x_grid, y_grid, stride, groups
        self.pad, self.relu6 = pad, relu6

    def forward(self, x):
        x = QUANTIZE_DEQUANTIZE(x, *self.x_grid)
        if self.pad:
            x = aten.pad.default(x, [1, 1, 1, 1], "constant", 0.0)
        weight = DEQUANTIZE_PER_CHANNEL(self.weight, self.weight_scale, 0)
        bias = DEQUANTIZE_PER_CHANNEL(self.bias, self.bias_scale, 0)
        y = aten.conv2d.default(x, weight, bias, [self.stride, self.stride], [0, 0], [1, 1], self.groups)
        if self.relu6:
            y = aten.hardtanh.default(y, 0.0, 6.0)
        return QUANTIZE_DEQUANTIZE(y, *self.y_grid)


class QuantAdd(nn.Module):
    """Q(a) + Q(b) [-> ReLU] -> Q: one QLinearAdd."""

    def __init__(self, a_grid: tuple, b_grid: tuple, y_grid: tuple, relu: bool = False):
        super().__init__()
        self.a_grid, self.b_grid, self.y_grid, self.relu = a_grid, b_grid, y_grid, relu

    def forward(self, a, b):
        y = aten.add.Tensor(QUANTIZE_DEQUANTIZE(a, *self.a_grid), QUANTIZE_DEQUANTIZE(b, *self.b_grid))
        if self.relu:
            y = aten.relu.default(y)
        return QUANTIZE_DEQUANTIZE(y, *self.y_grid)


class QuantLinear(nn.Module):
    """Q(x) -> linear(DQ(w), DQ(b)) with float output: one QGemm."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor, x_grid: tuple):
        super().__init__()
        self.weight, self.weight_scale, self.bias, self.bias_scale = _constants(weight, weight_scale, bias, x_grid)
        self.x_grid = x_grid

    def forward(self, x):
        weight = DEQUANTIZE_PER_CHANNEL(self.weight, self.weight_scale, 0)
        bias = DEQUANTIZE_PER_CHANNEL(self.bias, self.bias_scale, 0)
        return aten.linear.default(QUANTIZE_DEQUANTIZE(x, *self.x_grid), weight, bias)


def _runtime(module: nn.Module, inputs: tuple, tmp_path) -> tuple[tuple[torch.Tensor, ...], collections.Counter]:
    """The onnxruntime backend's outputs for the traced module, and the op counts of its optimised graph."""
    gm = fx.symbolic_trace(module.eval())
    names = tuple(f"input_{index}" for index in range(len(inputs)))
    lowered = OnnxRuntimeBackend().lower(LoweringRequest(gm, inputs, names, ("output",), {}))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(lowered.model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(DISABLED_OPTIMIZERS))
    ops = collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    return lowered.runner.run(inputs), ops


def _conv_case(seed: int, channels: int, *, groups: int = 1, bits: int = 7, ties: bool = False):
    generator = torch.Generator().manual_seed(seed)
    largest = 2 ** (bits - 1) - 1
    weight = torch.randint(-largest, largest + 1, (channels, channels // groups, 3, 3), generator=generator)
    if ties:  # multiplier x_s * w_s / y_s = 2**-8 exactly: every accumulator 128 (mod 256) is a tie
        weight_scale, x_grid, y_grid = torch.ones(channels), _grid(0.5, 131), _grid(128.0, 120)
    else:
        weight_scale = torch.rand(channels, generator=generator) * 0.02 + 0.002
        x_grid, y_grid = _grid(0.037, 131), _grid(0.21, 97)
    bias = torch.randint(-3000, 3000, (channels,), generator=generator, dtype=torch.int32)
    return weight.to(torch.int8), weight_scale, bias, x_grid, y_grid


CONV_CASES = {
    "3x3, 7-bit weights, uint8 with zero points": dict(channels=32),
    "3x3 rounding ties": dict(channels=32, ties=True),
    "depthwise, 8-bit weights (ConvSym depthwise)": dict(channels=32, groups=32, bits=8),
    "depthwise, 24 channels (generic depthwise)": dict(channels=24, groups=24, bits=8),
}


@pytest.mark.parametrize("case", CONV_CASES)
def test_qlinearconv_is_bit_exact(case, tmp_path):
    weight, weight_scale, bias, x_grid, y_grid = _conv_case(1, **CONV_CASES[case])
    groups = weight.shape[0] if weight.shape[1] == 1 else 1
    module = QuantConv(weight, weight_scale, bias, x_grid, y_grid, groups=groups, pad=True, stride=1 + (groups > 1))
    x = _on_grid(torch.Generator().manual_seed(2), (4, weight.shape[0], 40, 40), x_grid)
    (runtime,), ops = _runtime(module, (x,), tmp_path)
    assert ops["QLinearConv"] == 1 and ops["Conv"] == 0, ops
    (emulated,) = emulate(fx.symbolic_trace(module), x)
    assert runtime.numel() > 10_000
    assert torch.equal(runtime, emulated), f"{(runtime != emulated).sum()} of {runtime.numel()} differ"


def test_relu6_made_redundant_by_the_quantiser_is_fused_and_exact(tmp_path):
    weight, weight_scale, bias, x_grid, _ = _conv_case(3, channels=16)
    module = QuantConv(weight, weight_scale, bias, x_grid, _grid(6.0 / 255, 0), relu6=True)
    x = _on_grid(torch.Generator().manual_seed(4), (4, 16, 40, 40), x_grid)
    (runtime,), ops = _runtime(module, (x,), tmp_path)
    assert ops["QLinearConv"] == 1 and ops["Clip"] == 0, ops
    assert [group.kind for group in find_groups(fx.symbolic_trace(module))] == ["conv"]
    assert torch.equal(runtime, emulate(fx.symbolic_trace(module), x)[0])


def test_relu6_wider_than_the_quantiser_stays_float_as_in_the_runtime(tmp_path):
    weight, weight_scale, bias, x_grid, _ = _conv_case(5, channels=16)
    module = QuantConv(weight, weight_scale, bias, x_grid, _grid(8.0 / 255, 0), relu6=True)
    x = _on_grid(torch.Generator().manual_seed(6), (2, 16, 24, 24), x_grid)
    (runtime,), ops = _runtime(module, (x,), tmp_path)
    assert ops["QLinearConv"] == 0, ops  # the Clip keeps the conv out of the QDQ group
    assert find_groups(fx.symbolic_trace(module)) == []
    assert probe.within_steps((runtime,), emulate(fx.symbolic_trace(module), x), 1.0) == 1.0


def test_int8_activations_are_bit_exact(tmp_path):
    weight, weight_scale, bias, _, _ = _conv_case(7, channels=32)
    x_grid, y_grid = _grid(0.05, -9, INT8), _grid(0.3, 14, INT8)
    module = QuantConv(weight, weight_scale, bias, x_grid, y_grid, pad=True)
    x = _on_grid(torch.Generator().manual_seed(8), (4, 32, 32, 32), x_grid)
    (runtime,), ops = _runtime(module, (x,), tmp_path)
    assert ops["QLinearConv"] == 1, ops
    assert torch.equal(runtime, emulate(fx.symbolic_trace(module), x)[0])


ADD_CASES = {
    "different grids": ((_grid(0.031, 128), _grid(0.047, 101), _grid(0.06, 93)), False),
    "ratios 1 and 0.5 (ties everywhere), ReLU made redundant": ((_grid(0.5, 7), _grid(0.25, 250), _grid(0.5, 0)), True),
}


@pytest.mark.parametrize("case", ADD_CASES)
def test_qlinearadd_is_bit_exact(case, tmp_path):
    (a_grid, b_grid, y_grid), relu = ADD_CASES[case]
    generator = torch.Generator().manual_seed(9)
    a, b = (_on_grid(generator, (4, 24, 32, 32), grid) for grid in (a_grid, b_grid))
    module = QuantAdd(a_grid, b_grid, y_grid, relu=relu)
    (runtime,), ops = _runtime(module, (a, b), tmp_path)
    assert ops["QLinearAdd"] == 1 and ops["Add"] == 0 and ops["Relu"] == 0, ops
    assert torch.equal(runtime, emulate(fx.symbolic_trace(module), a, b)[0])


def test_relu_the_quantiser_does_not_cover_keeps_the_add_in_float(tmp_path):
    grids = _grid(0.05, 128), _grid(0.05, 120), _grid(0.08, 30)  # zero point 30: ReLU clips inside the range
    generator = torch.Generator().manual_seed(13)
    a, b = (_on_grid(generator, (2, 16, 32, 32), grid) for grid in grids[:2])
    module = QuantAdd(*grids, relu=True)
    (runtime,), ops = _runtime(module, (a, b), tmp_path)
    assert ops["QLinearAdd"] == 0 and ops["Add"] == 1, ops
    assert find_groups(fx.symbolic_trace(module)) == []
    assert torch.equal(runtime, emulate(fx.symbolic_trace(module), a, b)[0])


def test_qgemm_with_float_output_is_bit_exact(tmp_path):
    generator = torch.Generator().manual_seed(10)
    weight = torch.randint(-63, 64, (100, 640), generator=generator).to(torch.int8)
    weight_scale = torch.rand(100, generator=generator) * 0.01 + 0.001
    bias = torch.randint(-20000, 20000, (100,), generator=generator, dtype=torch.int32)
    x_grid = _grid(0.023, 17)
    module = QuantLinear(weight, weight_scale, bias, x_grid)
    x = _on_grid(generator, (64, 640), x_grid)
    (runtime,), ops = _runtime(module, (x,), tmp_path)
    assert ops["QGemm"] == 1 and ops["Gemm"] == 0, ops
    assert torch.equal(runtime, emulate(fx.symbolic_trace(module), x)[0])


class QuantOnly(nn.Module):
    """Q -> DQ alone: QuantizeLinear and DequantizeLinear."""

    def __init__(self, grid: tuple):
        super().__init__()
        self.grid = grid

    def forward(self, x):
        return QUANTIZE_DEQUANTIZE(x, *self.grid)


def test_quantize_dequantize_matches_the_runtime_on_ties(tmp_path):
    grid = _grid(0.1, 100)
    halves = (torch.arange(-120, 160).float() + 0.5) * np.float32(0.1)  # midpoints, as near as float32 gets
    x = torch.cat([halves, torch.randn(10_000) * 10]).reshape(1, -1)
    (runtime,), ops = _runtime(QuantOnly(grid), (x,), tmp_path)
    assert ops["QuantizeLinear"] == 1, ops
    assert torch.equal(runtime, emulate(fx.symbolic_trace(QuantOnly(grid)), x)[0])


def test_fma32_rounds_once():
    x = y = torch.tensor(1 + 2.0**-12, dtype=torch.float32)
    z = torch.tensor(2.0**-60, dtype=torch.float32)
    # exact: 1 + 2^-11 + 2^-24 + 2^-60, just above a float32 midpoint; rounding twice lands on the even side
    assert float(fma32(x, y, z)) == 1 + 2.0**-11 + 2.0**-23
    assert float((x.double() * y.double() + z.double()).float()) == 1 + 2.0**-11


def test_qlinear_add_kernels_differ_only_in_rounding():
    grid = QParams(0.05, 128, 0, 255)
    generator = torch.Generator().manual_seed(11)
    a, b = (torch.randint(0, 256, (50_000,), generator=generator).float() for _ in range(2))
    output = QParams(0.07, 120, 0, 255)
    fused, plain = qlinear_add(a, grid, b, grid, output), qlinear_add(a, grid, b, grid, output, fused=False)
    assert (fused - plain).abs().max() <= 1


def test_values_off_the_grid_are_an_emulation_error():
    node = fx.symbolic_trace(QuantAdd(_grid(1.0, 0), _grid(1.0, 0), _grid(1.0, 0))).graph.find_nodes(
        op="placeholder")[0]
    with pytest.raises(EmulationError, match="not on its quantisation grid"):
        grid_integers(torch.tensor([0.3]), QParams(1.0, 0, 0, 255), node)


# --------------------------------------------------------------------------------------------
# Float layers: MLAS's NCHWc convolutions, SGEMM and Eigen's ReduceMean


class FloatLayers(nn.Module):
    """A float conv, then global average pooling and a linear layer (Conv, ReduceMean, Gemm)."""

    def __init__(self, channels: int, outputs: int, kernel: int, *, stride: int = 1, groups: int = 1):
        super().__init__()
        generator = torch.Generator().manual_seed(channels * 100 + kernel)
        self.register_buffer("weight", torch.randn(outputs, channels // groups, kernel, kernel, generator=generator))
        self.register_buffer("bias", torch.randn(outputs, generator=generator))
        self.register_buffer("head", torch.randn(10, outputs, generator=generator))
        self.stride, self.padding, self.groups = stride, kernel // 2, groups

    def forward(self, x):
        y = aten.conv2d.default(x, self.weight, self.bias, [self.stride] * 2, [self.padding] * 2, [1, 1], self.groups)
        pooled = aten.adaptive_avg_pool2d.default(y, [1, 1])
        return aten.linear.default(aten.flatten.using_ints(pooled, 1), self.head, None)


FLOAT_CASES = {
    "NCHW input (3 channels)": dict(channels=3, outputs=32, kernel=3, stride=2),
    "NCHWc blocks": dict(channels=32, outputs=16, kernel=3),
    "pointwise, 2 chunks of 128 channels, K > 256 in the Gemm": dict(channels=256, outputs=288, kernel=1),
    "depthwise": dict(channels=32, outputs=32, kernel=3, groups=32),
}


@pytest.mark.skipif(nchwc_block_size() == 0, reason="MLAS's NCHWc kernels run on x86-64 with AVX2 or AVX-512")
@pytest.mark.parametrize("case", FLOAT_CASES)
def test_float_layers_run_as_mlas_runs_them(case, tmp_path):
    module = FloatLayers(**FLOAT_CASES[case])
    x = torch.randn(4, FLOAT_CASES[case]["channels"], 21, 21, generator=torch.Generator().manual_seed(12))
    (runtime,), ops = _runtime(module, (x,), tmp_path)
    assert ops["ReduceMean"] == 1 and ops["Gemm"] == 1 and ops["Conv"] == 1, ops
    gm = fx.symbolic_trace(module)
    assert torch.equal(runtime, emulate(gm, x)[0])
    assert not torch.equal(runtime, emulate(gm, x, float_kernels=False)[0])  # PyTorch's own order differs


# --------------------------------------------------------------------------------------------
# A whole CNN through compile(): the runtime against simulate()


class ResidualCNN(nn.Module):
    """Conv-BN-ReLU6, depthwise conv with ReLU6, a residual add, global pooling and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU6())
        self.project = nn.Conv2d(32, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        y = self.stem(x)
        y = y + self.project(self.depthwise(y))
        return self.head(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, 24, 24, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _target():
    """cpu-int8 without the sensitivity fallback: every conv, the add and the head run on integers."""
    base = get_target("cpu-int8")
    return dataclasses.replace(base, pipeline=tuple(spec for spec in base.pipeline if spec.name != "quant_sensitivity"))


@pytest.fixture(scope="module")
def compiled_cnn():
    torch.manual_seed(0)
    return compile(randomize_batch_norm(ResidualCNN()), _target(), _images(1, 0), calibration_data=[_images(32, 1)])


def test_emulated_groups_are_the_runtime_integer_kernels(compiled_cnn, tmp_path):
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(compiled_cnn.onnx.SerializeToString(), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(DISABLED_OPTIMIZERS))
    ops = collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    kinds = collections.Counter(group.kind for group in find_groups(compiled_cnn.graph_module))
    assert kinds == {"conv": ops["QLinearConv"], "add": ops["QLinearAdd"], "gemm": ops["QGemm"]}
    assert kinds == {"conv": 3, "add": 1, "gemm": 1}


def test_simulate_matches_the_runtime_bit_for_bit(compiled_cnn):
    inputs = _images(64, 7)
    runtime, simulated = compiled_cnn(inputs), compiled_cnn.simulate(inputs)
    if nchwc_block_size():  # x86-64: the global mean (ReduceMean) runs in Eigen's order too
        assert torch.equal(runtime, simulated), f"{(runtime != simulated).sum()} of {runtime.numel()} differ"
    assert probe.within_steps((runtime,), (simulated,), 1.0) == 1.0
    agreement = compiled_cnn.report.lowering["simulation_agreement"]
    assert agreement["simulation"] == "integer emulation" and agreement["fraction"] == 1.0


def test_float_simulation_stays_available_and_is_not_exact(compiled_cnn):
    inputs = _images(64, 7)
    floating = compiled_cnn.simulate(inputs, exact=False)
    assert not torch.equal(floating, compiled_cnn.simulate(inputs))
    assert probe.within_steps((compiled_cnn(inputs),), (floating,), 4.0) == 1.0


def test_an_emulation_error_falls_back_to_the_float_simulation_on_record(monkeypatch):
    def refuse(*args, **kwargs):
        raise EmulationError("the input of conv2d is not on its quantisation grid")

    monkeypatch.setattr(OnnxRuntimeBackend, "emulate", refuse)
    compiled = compile(randomize_batch_norm(ResidualCNN()), _target(), _images(1, 0), calibration_data=[_images(16, 1)])
    assert compiled.report.lowering["simulation_agreement"]["simulation"] == "float simulation"
    assert any("integer emulation failed" in fallback for fallback in compiled.report.fallbacks)
