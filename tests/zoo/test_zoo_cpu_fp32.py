"""Every zoo model through cpu-fp32 as a user calls it (``compile(entry.model, target,
entry.example_inputs)``, no dynamic_dims): dynamic batch with no fallback, matches eager at batch 1
and 3 (and, for the sentence encoder, at sequence lengths 16, 128 and 512), with golden op
histograms of the optimised IR."""

from __future__ import annotations

import pytest
import torch

import models
from compiler import compile as fxpress_compile
from compiler import ir
from compiler.cli.model_source import resolve

# Operator counts of the optimised IR (golden: a change here is a change in what passes do).
GOLDEN_OPS = {
    "mlp": {"aten.linear": 3, "aten.relu": 2},
    "lenet": {"aten.conv2d": 2, "aten.linear": 3},
    "resnet18": {"aten.conv2d": 20, "aten.linear": 1, "aten.add": 8, "aten.batch_norm": 0},
    "mobilenet-v2": {"aten.conv2d": 52, "aten.linear": 1, "aten.add": 10, "aten.batch_norm": 0},
    "efficientnet-lite0": {"aten.conv2d": 49, "aten.linear": 1, "aten.add": 9, "aten.batch_norm": 0},
    "minilm-l6": {"aten.linear": 36, "aten.layer_norm": 13, "aten.dropout": 0, "aten.gelu": 6},
    "digits-cnn": {"aten.conv2d": 2, "aten.batch_norm": 0},
}


@pytest.fixture(scope="module", params=models.names())
def compiled_zoo(request):
    source = resolve(request.param)
    entry = models.load(request.param)
    compiled = fxpress_compile(entry.model, "cpu-fp32", entry.example_inputs, model_name=request.param)
    return request.param, source, compiled


def _cases(name: str) -> list[dict]:
    sizes = [{"seq_len": 16}, {"seq_len": 128}, {"seq_len": 512}] if name == "minilm-l6" else [{}]
    return [{"batch": batch, **options} for batch in (1, 3) for options in sizes]


def test_batch_is_dynamic_with_no_fallback(compiled_zoo):
    name, source, compiled = compiled_zoo
    assert compiled.report.fallbacks == []
    assert "static" not in compiled.report.capture["front_end"]
    for record in compiled.manifest["inputs"]:
        assert record["dynamic_dims"]["0"] == ["batch", 1, None], (name, record)
    if name == "minilm-l6":  # the exporter found the position table's 512, with no hand-written bound
        assert [record["dynamic_dims"]["1"] for record in compiled.manifest["inputs"]] == [["sequence", 1, 512]] * 2


def test_matches_eager_at_several_batch_sizes(compiled_zoo):
    name, source, compiled = compiled_zoo
    entry = source.zoo_entry
    for case in _cases(name):
        options = {key: value for key, value in case.items() if key != "batch"}
        inputs = entry.eval_data(case["batch"], **options)
        with torch.no_grad():
            expected = source.model(*inputs)
        actual = compiled(*inputs)
        assert actual.shape == expected.shape, case
        error = (actual.double() - expected.double()).abs().max().item()
        scale = expected.double().abs().max().item()
        assert error <= 1e-4 * scale, f"{name} {case}: max abs diff {error:.3g} vs max |ref| {scale:.3g}"


def test_golden_op_histogram(compiled_zoo):
    name, source, compiled = compiled_zoo
    final = compiled.report.entries[-1]
    histogram = dict(compiled.report.initial["ops"])
    for entry in compiled.report.entries:
        for op, delta in entry.op_delta.items():
            histogram[op] = histogram.get(op, 0) + delta
    for op, count in GOLDEN_OPS[name].items():
        assert histogram.get(op, 0) == count, f"{name}: {op} {histogram.get(op, 0)} != {count}"
    assert final.drift["cosine"] > 0.99999


def test_every_onnx_node_names_its_module(compiled_zoo):
    name, source, compiled = compiled_zoo
    module_paths = {path for path, _ in source.model.named_modules()}
    for node in compiled.onnx.graph.node:
        paths = [p.value for p in node.metadata_props if p.key == "fxpress.module_path"]
        assert len(paths) == 1, node.name
        assert paths[0] in module_paths, f"{name}: {node.name} names unknown module {paths[0]!r}"
        assert node.name.startswith(f"{paths[0] or 'root'}/")


def test_ir_histogram_helper_agrees_with_ledger():
    source = resolve("lenet")
    from compiler.capture import capture

    captured = capture(source.model, source.example_inputs)
    assert ir.op_histogram(captured.graph_module)["aten.conv2d"] == 2
