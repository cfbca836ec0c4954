"""The ONNX Runtime backend writes erf-GELU as one fused com.microsoft.Gelu node."""

from __future__ import annotations

import collections

import torch
from torch import nn

from backends.onnx.export import MODULE_PATH_KEY
from compiler import compile


class GeluMlp(nn.Module):
    def __init__(self, approximate: str):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 64), nn.GELU(approximate=approximate), nn.Linear(64, 8)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _compiled(approximate: str):
    torch.manual_seed(0)
    model = GeluMlp(approximate).eval()
    inputs = torch.randn(4, 16) * 3
    return model, inputs, compile(model, target="cpu-fp32", example_inputs=(inputs,))


def test_erf_gelu_becomes_one_fused_node_with_its_module_path():
    model, inputs, compiled = _compiled("none")
    ops = collections.Counter((node.domain, node.op_type) for node in compiled.onnx.graph.node)
    assert ops[("com.microsoft", "Gelu")] == 1 and ops[("", "Erf")] == 0, ops
    gelu = next(node for node in compiled.onnx.graph.node if node.op_type == "Gelu")
    assert {entry.key: entry.value for entry in gelu.metadata_props}[MODULE_PATH_KEY] == "act"
    assert gelu.name.startswith("act/")
    used = {name for node in compiled.onnx.graph.node for name in node.input}
    assert all(init.name in used for init in compiled.onnx.graph.initializer), "the replaced constants remain"
    torch.testing.assert_close(compiled(inputs), model(inputs), rtol=1e-5, atol=1e-5)


def test_tanh_gelu_is_left_as_exported_and_stays_exact():
    model, inputs, compiled = _compiled("tanh")
    assert not any(node.op_type == "Gelu" for node in compiled.onnx.graph.node)
    torch.testing.assert_close(compiled(inputs), model(inputs), rtol=1e-5, atol=1e-5)
