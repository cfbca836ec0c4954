"""Latency-driven pruning: layer shapes read off the IR, a layer table measured once per machine, and a
pruned model whose latency is measured side by side (no wall-clock assertion: the ledger's record)."""

from __future__ import annotations

import dataclasses
import json

import onnx
import onnxruntime as ort
import pytest
import torch

import models
from backends.onnxruntime.backend import DISABLED_OPTIMIZERS, session_options
from backends.onnxruntime.layer_latency import LayerTimer, _layer_model
from compiler import TARGETS, PassError, PassSpec, compile, probe
from compiler.layer_shapes import LayerShape, layer_shapes
from compiler.pass_base import PassContext
from compiler.pipeline import run_pipeline
from passes.prune.groups import Member
from passes.prune.prune_channels import PruneChannels, narrower, next_aim


@pytest.fixture(scope="module")
def digits():
    return models.load("digits-cnn")


def pruning_target(**options):
    base = TARGETS["cpu-fp32"]
    return dataclasses.replace(base, name="cpu-fp32-pruned",
                               pipeline=(*base.pipeline, PassSpec("prune_channels", options),
                                         PassSpec("eliminate_dead_code")))


def test_layer_shapes_are_read_off_the_ir_at_the_batch_asked(digits):
    result = run_pipeline(digits.model, TARGETS["cpu-fp32"], digits.example_inputs)
    probe.run_annotated(result.graph_module, digits.example_inputs)
    shapes = layer_shapes(result.graph_module, batch=16)
    convs = [shape for shape in shapes.values() if shape.op == "conv"]
    linears = [shape for shape in shapes.values() if shape.op == "linear"]
    assert [(s.in_channels, s.out_channels) for s in convs] == [(1, 16), (16, 32)]
    assert all(s.rows == 16 and s.kernel == (3, 3) and s.padding == (1, 1) for s in convs)
    assert convs[0].height == convs[1].height == 8  # 8x8 digits; the pool comes after conv2
    assert [(s.rows, s.in_channels, s.out_channels) for s in linears] == [(16, 512, 10)]


def test_a_narrower_shape_loses_the_channels_where_the_member_holds_them():
    conv = LayerShape("conv", 16, 64, 64, 28, 28, (3, 3), groups=64)
    assert narrower(conv, Member("n", "m", "depthwise"), 16) == dataclasses.replace(
        conv, in_channels=48, out_channels=48, groups=48)
    linear = LayerShape("linear", 16, 512, 10)
    assert narrower(linear, Member("n", "m", "in", per_channel=16), 2).in_channels == 480
    assert narrower(linear, Member("n", "m", "out"), 2).out_channels == 8
    query = LayerShape("linear", 16, 384, 384)  # a head group: 2 heads of 32 features
    assert narrower(query, Member("q", "m", "out", per_channel=32), 2).out_channels == 320
    assert narrower(query, Member("o", "m", "in", per_channel=32), 2).in_channels == 320


def test_the_layer_table_is_measured_once_and_kept_on_disk(tmp_path):
    path = tmp_path / "table.json"
    shape = LayerShape("conv", 2, 16, 32, 14, 14, (3, 3), padding=(1, 1))
    timer = LayerTimer(threads=1, table_path=path)
    first = timer.seconds(shape)
    assert first > 0 and timer.seconds(shape) == first and timer.measured == 1
    timer.save()
    again = LayerTimer(threads=1, table_path=path)
    assert again.seconds(shape) == first and again.measured == 0
    assert json.loads(path.read_text()) == {shape.key(): first}


def test_the_int8_table_times_the_integer_kernel_onnx_runtime_fuses(tmp_path):
    shape = LayerShape("conv", 2, 16, 32, 14, 14, (3, 3), padding=(1, 1))
    model, feed = _layer_model(shape, "int8")
    options = session_options("all", 1)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(DISABLED_OPTIMIZERS)).run(None, feed)
    assert "QLinearConv" in {node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node}
    timer = LayerTimer(threads=1, table_path=tmp_path / "int8.json", precision="int8")
    assert timer.seconds(shape) > 0 and timer.precision == "int8"
    with pytest.raises(ValueError, match="precision must be one of float32, int8"):
        LayerTimer(precision="fp16")


def test_a_quantising_target_prunes_to_the_latency_of_its_integer_kernels(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("FXPRESS_CACHE_DIR", str(tmp_path))
    compiled = compile(digits.model, "cpu-int8", digits.example_inputs, calibration_data=[digits.calibration_data(64)],
                       prune={"latency": 0.8, "latency_batch": 8, "round_to": 8}, recover_seconds=0)
    record = compiled.report.entry("prune_channels").stats["latency"]
    assert record["precision"] == "int8" and record["attempts"][0]["measured"] > 0
    tables = list((tmp_path / "latency").glob("*.json"))  # its own table, beside no float one
    assert len(tables) == 1 and tables[0].name.endswith("-int8.json")


def test_a_latency_budget_prunes_and_records_the_measured_latency(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("FXPRESS_CACHE_DIR", str(tmp_path))
    compiled = compile(digits.model, pruning_target(latency=0.6, latency_batch=8, round_to=8), digits.example_inputs,
                       calibration_data=[digits.calibration_data(64)])
    entry = compiled.report.entry("prune_channels")
    record = entry.stats["latency"]
    assert entry.stats["budget"] == {"latency": 0.6} and record["batch"] == 8
    assert 1 <= len(record["attempts"]) <= 4
    for attempt in record["attempts"]:
        assert attempt["predicted"] > 0 and attempt["measured"] > 0 and 0 <= attempt["kept_share"] < 1
    assert record["met"] == any(attempt["measured"] <= 0.6 for attempt in record["attempts"])
    chosen = record["attempts"][record["chosen"]]  # the met try keeping most channels, else the last
    assert chosen["kept_share"] == entry.stats["kept_share"]
    if record["met"]:
        assert chosen["measured"] <= 0.6
        assert all(attempt["kept_share"] <= chosen["kept_share"] for attempt in record["attempts"]
                   if attempt["measured"] <= 0.6)
    assert entry.stats["allocation"] == "sensitivity"
    assert set(entry.stats["sensitivity"]["output_error_at_half"]) == {"conv1", "conv2"}  # round_to 8
    assert entry.stats["widths"] and entry.macs_after < entry.macs_before
    assert list((tmp_path / "latency").glob("*.json"))  # the table is kept for the next compile
    images = digits.eval_data(5)[0]  # the runtime computes what the pruned IR computes, at another batch
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), compiled.graph_module(images)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("options", "message"), [
    ({"latency": 1.2}, "latency is the share of the unpruned model's measured latency"),
    ({"latency": 0.7, "macs": 0.3}, "give one budget"),
    ({"latency": 0.7, "latency_batch": -1}, "latency_batch is the batch size"),
])
def test_bad_latency_options_are_refused(digits, options, message):
    gm = run_pipeline(digits.model, TARGETS["cpu-fp32"], digits.example_inputs).graph_module
    context = PassContext(digits.example_inputs, digits.example_inputs, layer_timer=object())
    with pytest.raises(PassError, match=message):
        PruneChannels(**options).requires(gm, context)


def test_a_latency_budget_reads_calibration_data_to_allocate_unless_told_otherwise():
    assert PruneChannels(latency=0.7, importance="l1", reconstruct=False).needs_calibration  # sensitivity
    assert not PruneChannels(latency=0.7, importance="l1", reconstruct=False, allocation="uniform").needs_calibration
    assert not PruneChannels(macs=0.3, importance="l1", reconstruct=False).needs_calibration  # uniform


def test_a_backend_that_cannot_time_layers_is_refused_a_latency_budget(digits):
    gm = run_pipeline(digits.model, TARGETS["cpu-fp32"], digits.example_inputs).graph_module
    context = PassContext(digits.example_inputs, digits.example_inputs, target_name="toy", layer_timer=None)
    with pytest.raises(PassError, match="'toy''s backend cannot time layers"):
        PruneChannels(latency=0.7).requires(gm, context)


def test_the_latency_aim_follows_the_miss_until_bracketed_then_halves_the_bracket():
    assert next_aim(0.8, 0.8 / 0.9, [0.0, 0.8]) == pytest.approx(0.8 * 0.8 / 0.9)  # missed: aim lower
    assert next_aim(0.8, 0.8 / 0.7, [0.8, float("inf")]) == pytest.approx(0.8 * 0.8 / 0.7)  # cut too much: higher
    assert next_aim(0.8019, 0.8 / 0.7158, [0.8019, 0.8543]) == pytest.approx((0.8019 + 0.8543) / 2)  # overshoot
    assert next_aim(0.8543, 0.8 / 0.8523, [0.8, 0.8543]) == pytest.approx(0.8543 * 0.8 / 0.8523)  # inside
