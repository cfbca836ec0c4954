"""bench.trt_peers measures one Q/DQ artifact the same way whichever tool made it, and renders the comparison."""

from __future__ import annotations

import copy

import pytest
import torch

from bench.trt_peers import artifact_row, ledger_floats, render, simulation_agreement, weighted_comparison


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    import models
    from compiler import compile

    zoo = models.load("digits-cnn")
    compiled = compile(zoo.model, "trt-int8", zoo.example_inputs, calibration_data=[zoo.calibration_data(64)])
    evaluation = tuple(zoo.eval_data(32))
    with torch.no_grad():
        reference = zoo.model(*evaluation)
    row = artifact_row(compiled.onnx, evaluation, reference, False, tmp_path_factory.mktemp("trt-peers"))
    return compiled, evaluation, row


def test_the_row_places_lints_and_scores_the_artifact(digits):
    compiled, _, row = digits
    assert row["lint"] == [] and row["lint_rules"] == {}
    placement = row["placement"]
    assert len(placement["weighted_quantized"]) == 2
    assert [site["module_path"] for site in placement["weighted_float"]] == ["fc"]
    assert row["quality"]["top1_agreement"] >= 0.95
    assert row["integer_kernels"] == {}  # no conv output quantiser: ONNX Runtime's QLinearConv pattern never matches
    assert ledger_floats(compiled) == [{"module_path": "fc", "why": ledger_floats(compiled)[0]["why"]}]
    assert "10 output" in ledger_floats(compiled)[0]["why"]


def test_the_simulation_matches_the_reference_session(digits):
    compiled, evaluation, _ = digits
    agreement = simulation_agreement(compiled, evaluation, 20)
    assert agreement["samples"] == 20 and agreement["within_one_step"] == 1.0


def test_the_comparison_names_what_only_the_peer_quantises(digits):
    _, _, row = digits
    ours = copy.deepcopy(row)
    ours["ledger_float"] = [{"module_path": "fc", "why": "too narrow"}]
    theirs = copy.deepcopy(row)
    theirs["placement"]["weighted_quantized"] = row["placement"]["weighted_quantized"] + [
        {"node": "n", "op": "Gemm", "module_path": "fc"}, {"node": "m", "op": "MatMul", "module_path": "val_7"}]
    theirs["facts"] = {}
    result = {"model": "digits-cnn", "fxpress": {**ours, "compile_s": 1.0, "cache_round_trip": {
        "read": 2, "tensors": 2, "identical": True}, "simulation": {"samples": 20, "within_one_step": 1.0,
                                                                    "cosine": 1.0, "max_abs": 0.0}},
              "modelopt": theirs}
    comparison = weighted_comparison(result)
    assert comparison["only_modelopt"] == ["fc"] and comparison["only_modelopt_with_reason"] == ["fc"]
    assert comparison["unnamed"] == 1
    result["weighted_comparison"] = comparison
    text = render({"calibration_samples": 64, "evaluation_samples": 32, "modelopt_version": "x", "method": "entropy",
                   "results": [result]})
    assert "digits-cnn" in text and "fxpress float: fc: too narrow" in text
