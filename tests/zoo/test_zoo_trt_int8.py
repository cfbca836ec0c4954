"""trt-int8 on the zoo's small models: clean TensorRT placement, emulation agreement, every float layer explained."""

from __future__ import annotations

import functools

import pytest
import torch

import models
from backends.tensorrt.lint import lint_tensorrt
from compiler import compile as fxpress_compile
from compiler import ir

NAMES = ["mlp", "lenet", "digits-cnn"]
# Golden placement: the layers left float (too narrow for TensorRT's int8 kernels) and the activation Q/DQ pairs.
EXPECTED = {
    "mlp": ({"fc3": "256 input / 10 output channels"}, 2),
    "lenet": ({"features.0": "1 input / 6 output channels", "classifier.4": "84 input / 10 output channels"}, 3),
    "digits-cnn": ({"fc": "512 input / 10 output channels"}, 2),
}


@functools.cache
def _compiled(name: str):
    zoo = models.load(name)
    calibration = zoo.calibration_data(64)
    # dynamic_dims left to the defaults (batch), as ``fxpress compile`` does for zoo models
    compiled = fxpress_compile(zoo.model, "trt-int8", tuple(zoo.example_inputs), calibration_data=[calibration],
                               model_name=name)
    return zoo, compiled


@pytest.mark.parametrize("name", NAMES)
def test_lints_clean_and_agrees_with_the_emulation(name):
    zoo, compiled = _compiled(name)
    assert compiled.report.lowering["lint_findings"] == []
    assert compiled.report.fallbacks == []
    assert lint_tensorrt(compiled.onnx) == []
    assert compiled.report.lowering["simulation_agreement"]["fraction"] >= 0.999
    assert compiled.report.lowering["calibration_cache"]["tensors"] == compiled.report.entry("insert_qdq").stats[
        "activations"]
    assert set(compiled.files) == {"calibration.cache", "calibration.json", "model.implicit.onnx"}


@pytest.mark.parametrize("name", NAMES)
def test_every_weighted_op_is_quantised_unless_the_ledger_says_why_not(name):
    _, compiled = _compiled(name)
    placement = compiled.report.lowering["placement"]
    quantised = {item["module_path"] for item in placement["weighted_quantized"]}
    floats = {item["module_path"] for item in placement["weighted_float"]}
    weighted = {ir.module_path(node) for node in compiled.graph_module.graph.nodes
                if str(node.target) in ("aten.conv2d.default", "aten.linear.default")}
    assert placement["weighted_ops"] == len(weighted) == len(quantised) + len(floats)
    assert quantised | floats == weighted and not quantised & floats
    rows = {row["module_path"]: row for row in compiled.report.entry("insert_qdq").stats["layers"]
            if row["kind"] == "weight"}
    assert {path for path, row in rows.items() if row["decision"] == "int8"} == quantised
    float_rows = {path: row["why"] for path, row in rows.items() if row["decision"] == "float"}
    assert set(float_rows) == floats
    expected_floats, qdq_pairs = EXPECTED[name]
    assert set(float_rows) == set(expected_floats)
    for path, why in float_rows.items():
        assert why.startswith(expected_floats[path]) and "under the 16 of the int8 kernels" in why, (path, why)
    assert placement["qdq_pairs"] == qdq_pairs and placement["qoperator_ops"] == 0


def test_digits_cnn_keeps_its_predictions():
    zoo, compiled = _compiled("digits-cnn")
    inputs, labels = zoo.eval_data(256), zoo.eval_labels(256)
    with torch.no_grad():
        reference = zoo.model(*inputs).argmax(1)
    predicted = compiled(*inputs).argmax(1)
    assert (predicted == reference).double().mean() >= 0.98
    before, after = ((reference == labels).double().mean().item(), (predicted == labels).double().mean().item())
    assert before - after <= 0.01, (before, after)
