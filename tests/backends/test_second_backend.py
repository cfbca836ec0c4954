"""A second backend is a class and a registry entry: no edit of ``passes/`` or of the core.

The backend here lowers with the shared ONNX exporter (``backends.onnx``), runs the IR in PyTorch,
and hands the quantisation passes its own placement policy: symmetric int8 activations, nothing
but convs and linears on integers. Compiling through it must put that policy's quantisers in the
IR, record it in the ledger, and leave out what only ONNX Runtime has (its ISA, its emulation).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import backends
from backends.onnx.export import ExportRequest, export_onnx
from compiler import TARGETS, EmulationError, Target, compile, meta
from compiler.backend_base import Backend, Lowered, LoweringRequest
from compiler.quant_ops import QUANTIZE_DEQUANTIZE
from compiler.quant_policy import QuantPolicy, with_fields
from tests.support import SmallCNN, randomize_batch_norm

SYMMETRIC = QuantPolicy(name="symmetric-int8", integer_ops=frozenset(), activation_dtype="int8",
                        activation_symmetric=True)


class TorchRunner:
    def __init__(self, graph_module):
        self.graph_module = graph_module

    def run(self, inputs):
        with torch.no_grad():
            return tuple(self.graph_module(*inputs))


class TorchReferenceBackend(Backend):
    """ONNX out, the IR itself as the runner: a stand-in for a runtime this machine lacks."""

    name = "torch-reference"
    default_options = {"opset": 18}

    def lower(self, request: LoweringRequest) -> Lowered:
        model = export_onnx(ExportRequest(request.graph_module, request.example_inputs, request.input_names,
                                          request.output_names, request.dynamic_dims, self.options["opset"]))
        info = {"backend": self.name, "opset": self.options["opset"], "ir_version": model.ir_version,
                "onnx_nodes": len(model.graph.node), "seconds": 0.0}
        return Lowered(model, TorchRunner(request.graph_module), info)

    def quant_policy(self, spec):
        return with_fields(SYMMETRIC, {key: value for key, value in spec.items() if key != "base"})


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(backends.REGISTRY, TorchReferenceBackend.name, TorchReferenceBackend)


def int8_target() -> Target:
    cpu_int8 = TARGETS["cpu-int8"]
    pipeline = tuple(spec for spec in cpu_int8.pipeline if spec.name not in ("gptq", "quant_sensitivity"))
    return dataclasses.replace(cpu_int8, name="reference-int8", pipeline=pipeline, backend="torch-reference",
                               backend_options={}, quant_policy={"float_modules": ["head"]},
                               linear_heavy_target=None)


def test_a_registered_backend_compiles_with_its_own_policy(registered):
    torch.manual_seed(0)
    model = randomize_batch_norm(SmallCNN())
    inputs = (torch.randn(4, 3, 8, 8),)
    compiled = compile(model, int8_target(), inputs, calibration_data=[torch.randn(32, 3, 8, 8)])
    policy = compiled.report.capture["quant_policy"]
    assert policy["name"] == "symmetric-int8" and policy["activation_dtype"] == "int8"
    assert policy["float_modules"] == ["head"] and policy["integer_ops"] == []
    assert "isa" not in compiled.report.capture  # ONNX Runtime's facts come from its backend only
    quantisers = [node for node in compiled.graph_module.graph.nodes if node.target is QUANTIZE_DEQUANTIZE]
    assert quantisers and {node.args[2:5] for node in quantisers} == {(0, -128, 127)}  # zero point 0, int8
    for node in quantisers:  # scale = amax / 127 of the calibrated range
        low, high = (node.args[0].meta[meta.QUANT_RANGE][key] for key in ("low", "high"))
        assert node.args[1] == pytest.approx(max(abs(low), abs(high)) / 127, rel=1e-6)
    (head,) = [node for node in compiled.graph_module.graph.nodes if str(node.target) == "aten.linear.default"]
    assert head.args[0].target is not QUANTIZE_DEQUANTIZE  # float_modules=["head"] keeps it float
    assert any("no emulation" in line for line in compiled.report.fallbacks)
    torch.testing.assert_close(compiled(*inputs), compiled.simulate(*inputs, exact=False))
    with pytest.raises(EmulationError, match="no emulation"):
        compiled.simulate(*inputs)


def test_a_backend_without_a_policy_refuses_a_quantising_target(monkeypatch):
    class Plain(TorchReferenceBackend):
        name = "plain"
        quant_policy = Backend.quant_policy

    monkeypatch.setitem(backends.REGISTRY, Plain.name, Plain)
    target = dataclasses.replace(int8_target(), backend="plain")
    with pytest.raises(Exception, match="backend 'plain' has no quantisation policy"):
        compile(SmallCNN().eval(), target, (torch.randn(2, 3, 8, 8),), calibration_data=[torch.randn(8, 3, 8, 8)])
