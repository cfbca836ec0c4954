"""Bisection on the digits CNN: a planted quantisation fault, a clean compile, gates it cannot bisect, pruning."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest

import models
from compiler.bisect import bisect
from compiler.errors import TargetError, UsageError
from compiler.gates import parse_gate
from compiler.recipe import to_toml
from compiler.targets import PassSpec, get_target
from passes.quant.calibrate import Calibrate

AGREEMENT = [parse_gate("top1_agreement >= 0.97")]


@pytest.fixture(scope="module")
def digits():
    return models.load("digits-cnn")


def _bisect(zoo, target, gates=AGREEMENT, **options):
    return bisect(zoo.model, target, zoo.example_inputs, eval_inputs=zoo.eval_data(200), gates=gates,
                  calibration_data=zoo.calibration_data(128), threads=1, **options)


def _ruined(path: str):
    """cpu-int8 whose calibrate fixes the output range of ``path`` to [0, 0.01]: that one layer is ruined."""
    target = get_target("cpu-int8")
    pipeline = tuple(PassSpec("calibrate", {"ranges": {path: [0.0, 0.01]}}) if spec.name == "calibrate" else spec
                     for spec in target.pipeline)
    return dataclasses.replace(target, pipeline=pipeline)


def test_a_ruined_layer_is_named_alone_and_its_float_patch_passes(digits):
    report = _bisect(digits, _ruined("conv1"), labels=digits.eval_labels(200))
    assert report.verdict == "layers found"
    assert report.guilty_pass == "insert_qdq" and report.family == "quantisation"
    assert report.layers == ["conv1"]
    assert report.harm("conv1").metrics["top1_agreement"] < 0.5
    assert report.patch == {"compile": {"float_modules": ["conv1"]}}
    assert report.patched["passed"] and report.patched["metrics"]["top1_agreement"] >= 0.97
    failing = [row.name for row in report.passes if not row.passed]
    assert failing == ["insert_qdq", "reconstruct"]
    text = report.render()
    assert "conv1" in text and "insert_qdq" in text
    assert tomllib.loads(text.split("patch (recipe):\n", 1)[1].split("\n\n", 1)[0]) == report.patch
    assert report.to_dict()["layers"] == ["conv1"]


def test_a_compile_that_passes_has_nothing_to_bisect(digits):
    report = _bisect(digits, "cpu-int8")
    assert report.verdict == "nothing to bisect" and report.guilty_pass is None
    assert report.patch == {} and report.patched is None
    assert "nothing to bisect" in report.render()


def test_a_gate_the_captured_model_misses_blames_no_pass(digits):
    report = _bisect(digits, "cpu-fp32", gates=[parse_gate("cosine_min >= 1.5")])
    assert report.verdict == "captured fails" and report.guilty_pass is None and report.patch == {}
    assert "captured IR already fails" in report.render()


def test_gates_that_cannot_be_bisected_are_usage_errors(digits):
    with pytest.raises(UsageError, match="accuracy_drop cannot be measured"):
        _bisect(digits, "cpu-fp32", gates=[parse_gate("accuracy_drop <= 1")])  # no labels
    with pytest.raises(UsageError, match="needs a quality gate"):
        _bisect(digits, "cpu-fp32", gates=[parse_gate("latency_ratio <= 1.0 vs fp32")])


def test_calibrate_ranges_are_validated():
    with pytest.raises(TargetError, match=r"ranges\['conv1'\]"):
        Calibrate(ranges={"conv1": [0.1, 1.0]})  # no zero on the grid
    with pytest.raises(TargetError, match="two finite numbers"):
        Calibrate(ranges={"conv1": [0.0]})
    with pytest.raises(TargetError, match="module paths"):
        Calibrate(ranges={3: [0.0, 1.0]})


def test_a_ranges_path_the_model_lacks_is_a_target_error(digits):
    from compiler import compile as compile_model

    with pytest.raises(TargetError, match="'no_such_layer'"):
        compile_model(digits.model, _ruined("no_such_layer"), digits.example_inputs,
                      calibration_data=digits.calibration_data(64), threads=1)


def test_hard_pruning_is_bisected_to_the_group_to_protect(digits):
    report = _bisect(digits, "cpu-fp32", gates=[parse_gate("top1_agreement >= 0.99")], prune={"macs": 0.5},
                     recover_seconds=0)
    assert report.guilty_pass == "prune_channels" and report.family == "pruning"
    assert report.layers == ["conv2"]
    assert report.patch == {"prune": {"protect": ["conv2"]}}
    assert report.patched["passed"]


def test_to_toml_writes_what_tomllib_reads():
    patch = {"compile": {"float_modules": ['a."b"', "c.*"], "strict": True}, "prune": {"macs": 0.3}}
    assert tomllib.loads(to_toml(patch)) == patch
