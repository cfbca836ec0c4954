"""bench.int8_ceilings takes the int8 simulation apart: each variant keeps exactly the quantisation it names."""

from __future__ import annotations

import math

import pytest
import torch

from bench.int8_ceilings import ceiling_rows, compile_pair, render, strip_quantization
from bench.int8_peers import fxpress_target
from compiler.quant_ops import DEQUANTIZE_PER_CHANNEL, QUANTIZE_DEQUANTIZE


def _count(gm, target) -> int:
    return sum(node.op == "call_function" and node.target == target for node in gm.graph.nodes)


@pytest.fixture(scope="module")
def digits():
    import models

    zoo = models.load("digits-cnn")
    calibration = tuple(zoo.calibration_data(64))
    compiled, float_compiled = compile_pair(zoo, calibration, fxpress_target(None), "digits-cnn")
    return zoo, calibration, compiled, float_compiled


def test_each_variant_keeps_only_the_quantisation_it_names(digits):
    _, _, compiled, float_compiled = digits
    gm, float_gm = compiled.graph_module, float_compiled.graph_module
    activations, weights = _count(gm, QUANTIZE_DEQUANTIZE), _count(gm, DEQUANTIZE_PER_CHANNEL)
    assert activations > 0 and weights > 0
    weights_only = strip_quantization(gm, float_gm, activations=True, weights=False)
    assert (_count(weights_only, QUANTIZE_DEQUANTIZE), _count(weights_only, DEQUANTIZE_PER_CHANNEL)) == (0, weights)
    activations_only = strip_quantization(gm, float_gm, activations=False, weights=True)
    assert (_count(activations_only, QUANTIZE_DEQUANTIZE),
            _count(activations_only, DEQUANTIZE_PER_CHANNEL)) == (activations, 0)
    assert _count(gm, QUANTIZE_DEQUANTIZE) == activations  # the original is left as it was


def test_with_every_quantisation_removed_the_simulation_computes_eager_fp32(digits):
    zoo, _, compiled, float_compiled = digits
    model, inputs = zoo.model.eval(), zoo.eval_data(64)
    stripped = strip_quantization(compiled.graph_module, float_compiled.graph_module,
                                  activations=True, weights=True, float16=True)
    with torch.no_grad():
        expected, actual, quantised = model(*inputs), stripped(*inputs), compiled.graph_module(*inputs)
    actual = actual[0] if isinstance(actual, (tuple, list)) else actual
    quantised = quantised[0] if isinstance(quantised, (tuple, list)) else quantised
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(quantised, expected, rtol=1e-4, atol=1e-4)


def test_the_table_has_every_row_and_the_float32_row_is_exact_to_rounding(digits):
    zoo, calibration, compiled, float_compiled = digits
    rows = ceiling_rows(zoo.model.eval(), compiled, float_compiled, calibration, tuple(zoo.eval_data(64)))
    assert list(rows) == ["onnxruntime int8", "simulation", "int8 weights only", "int8 activations only",
                          "float layers only", "float32", "uint8 input"]
    assert rows["float32"]["top1_agreement"] == 1.0 and rows["float32"]["sqnr_db"] > 80
    assert math.isfinite(rows["simulation"]["sqnr_db"])
    assert rows["simulation"]["sqnr_db"] < rows["int8 weights only"]["sqnr_db"]
    assert "int8 activations only" in render({"model": "digits-cnn", "eval": 64, "calib": 64, "rows": rows})
