"""sparsify_weights: magnitude and threshold pruning zero exactly the smallest weights, report per-layer
sparsity and say that ONNX Runtime gains no speed from it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import models
from compiler import TARGETS, PassError, PassSpec, TargetError, compile
from compiler.pipeline import run_pipeline
from passes.prune.sparsify_weights import SPEED_NOTE


def sparsity_target(**options):
    base = TARGETS["cpu-fp32"]
    return dataclasses.replace(base, name="cpu-fp32-sparse", pipeline=(*base.pipeline,
                                                                      PassSpec("sparsify_weights", options)))


@pytest.fixture(scope="module")
def digits():
    return models.load("digits-cnn")


def weights(gm):
    return {name: tensor for name, tensor in gm.named_buffers() if tensor.dim() >= 2} | \
        {name: tensor for name, tensor in gm.named_parameters() if tensor.dim() >= 2}


def test_each_layer_loses_its_smallest_half(digits):
    originals = weights(run_pipeline(digits.model, TARGETS["cpu-fp32"], digits.example_inputs).graph_module)
    result = run_pipeline(digits.model, sparsity_target(sparsity=0.5), digits.example_inputs)
    entry = result.ledger.entry("sparsify_weights")
    assert entry.stats["speed"] == SPEED_NOTE and "no speed-up" in SPEED_NOTE
    assert set(entry.stats["layers"]) == {"conv1", "conv2", "fc"}
    for name, tensor in weights(result.graph_module).items():
        zeroed = tensor == 0
        assert zeroed.double().mean() == pytest.approx(0.5, abs=0.01)
        magnitudes = originals[name].abs()
        assert magnitudes[zeroed].max() <= magnitudes[~zeroed].min()  # the smallest went, the rest untouched
        torch.testing.assert_close(tensor[~zeroed], originals[name][~zeroed], rtol=0, atol=0)


def test_a_threshold_zeroes_exactly_the_entries_below_it(digits):
    before = run_pipeline(digits.model, TARGETS["cpu-fp32"], digits.example_inputs).graph_module
    after = run_pipeline(digits.model, sparsity_target(threshold=0.05), digits.example_inputs).graph_module
    originals, pruned = weights(before), weights(after)
    assert originals.keys() == pruned.keys()
    for name, original in originals.items():
        expected = torch.where(original.abs() >= 0.05, original, torch.zeros_like(original))
        torch.testing.assert_close(pruned[name], expected, rtol=0, atol=0)


def test_global_scope_meets_the_overall_sparsity_unevenly(digits):
    result = run_pipeline(digits.model, sparsity_target(sparsity=0.6, scope="global"), digits.example_inputs)
    entry = result.ledger.entry("sparsify_weights")
    assert entry.stats["sparsity"] == pytest.approx(0.6, abs=0.01)
    assert len(set(entry.stats["layers"].values())) > 1


def test_compile_takes_unstructured_budgets_and_the_runtime_computes_the_sparse_model(digits):
    compiled = compile(digits.model, "cpu-fp32", digits.example_inputs, prune={"sparsity": 0.5},
                       recover_seconds=0)
    images = digits.eval_data(32)[0]
    with torch.no_grad():
        expected = compiled.graph_module(images)[0]
    torch.testing.assert_close(compiled(images), expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        eager = digits.model(images)
    assert (compiled(images).argmax(1) == eager.argmax(1)).double().mean() > 0.9


@pytest.mark.parametrize(("options", "message"), [
    ({"sparsity": 1.0}, "fraction of weights zeroed"),
    ({"threshold": -1}, "threshold must be a number >= 0"),
    ({"scope": "model"}, "scope must be 'layer' or 'global'"),
])
def test_bad_options_are_pass_errors(digits, options, message):
    with pytest.raises(PassError, match=message):
        run_pipeline(digits.model, sparsity_target(**options), digits.example_inputs)


def test_mixing_unstructured_and_structured_keys_is_refused(digits):
    with pytest.raises(TargetError, match="belong to structured pruning"):
        compile(digits.model, "cpu-fp32", digits.example_inputs, prune={"sparsity": 0.5, "round_to": 8})
    with pytest.raises(TargetError, match="needs one budget"):
        compile(digits.model, "cpu-fp32", digits.example_inputs, prune={"sparsity": 0.5, "threshold": 0.1})
