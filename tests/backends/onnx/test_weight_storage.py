"""Float32 weights that float16 represents exactly are stored as float16, losslessly."""

from __future__ import annotations

import onnx
import torch
from torch import nn

from compiler import compile


def _model(round_to_half: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    if round_to_half:
        with torch.no_grad():
            model[0].weight.copy_(model[0].weight.half().float())
    return model


def _float16_initializers(compiled) -> int:
    return sum(init.data_type == onnx.TensorProto.FLOAT16 for init in compiled.onnx.graph.initializer)


def test_exactly_representable_weight_is_stored_as_float16_with_identical_outputs():
    model, inputs = _model(round_to_half=True), torch.randn(4, 32)
    compiled = compile(model, target="cpu-fp32", example_inputs=(inputs,))
    assert _float16_initializers(compiled) == 1
    assert compiled.report.lowering["float16_weights"] == 1
    assert any(node.op_type == "Cast" for node in compiled.onnx.graph.node)
    torch.testing.assert_close(compiled(inputs), model(inputs), rtol=1e-6, atol=1e-6)


def test_ordinary_float32_weights_are_left_alone():
    model, inputs = _model(round_to_half=False), torch.randn(4, 32)
    compiled = compile(model, target="cpu-fp32", example_inputs=(inputs,))
    assert _float16_initializers(compiled) == 0
