"""Dynamic shapes at the front door: bounds the exporter finds, the ladder down to static shapes,
the warning and strict mode on a fallback, and the size-1 check.

Each model here is small and written so that one rung of the ladder is the first that traces.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from compiler import FallbackError, InputError, compile, shape_bounds
from compiler.capture import capture
from compiler.dynamic_shapes import narrow_inputs, shape_ladder
from tests.support import PositionTable, tokens

RTOL, ATOL = 1e-3, 1e-5


class FixedLength(nn.Module):
    """Flattens the sequence into a Linear: the length is fixed at 16, the batch may vary."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(50, 4)
        self.head = nn.Linear(16 * 4, 3)

    def forward(self, input_ids):
        return self.head(self.tokens(input_ids).reshape(input_ids.shape[0], 16 * 4))


class FixedBatch(nn.Module):
    """Reshapes to a hard-coded batch of 2: nothing may vary."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x).reshape(2, 3)


class BranchOnBatchOfOne(nn.Module):
    """Computes something else at batch 1, which export (tracing at 2 and up) cannot see."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        if x.shape[0] == 1:
            return self.linear(x) * 2
        return self.linear(x)


class TwoInputsAsVarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, *inputs):
        return self.linear(inputs[0] + inputs[1])


def build(model_class) -> nn.Module:
    torch.manual_seed(0)
    return model_class().eval()


@pytest.fixture(scope="module")
def position_table_model():
    model = build(PositionTable)
    return model, compile(model, example_inputs=tokens(2, 16))


def test_exporter_finds_the_sequence_bound_of_the_position_table(position_table_model):
    _, compiled = position_table_model
    dims = compiled.report.capture["dynamic_dims"]
    expected = {"0": ["batch", 1, None], "1": ["sequence", 1, 32]}
    assert dims == {"input_ids": expected, "attention_mask": expected}
    assert compiled.report.capture["front_end"] == "torch.fx.symbolic_trace"
    assert compiled.report.fallbacks == []
    assert compiled.manifest["inputs"][0]["dynamic_dims"] == {"0": ["batch", 1, None], "1": ["sequence", 1, 32]}


@pytest.mark.parametrize(("batch", "length"), [(1, 1), (1, 32), (3, 7), (5, 32)])
def test_runs_anywhere_within_the_bounds_found(position_table_model, batch, length):
    model, compiled = position_table_model
    inputs = tokens(batch, length)
    with torch.no_grad():
        expected = model(*inputs)
    torch.testing.assert_close(compiled(*inputs).double(), expected.double(), rtol=RTOL, atol=ATOL)


def test_a_length_past_the_position_table_is_an_input_error(position_table_model):
    _, compiled = position_table_model
    message = r"input 'input_ids' dimension 1 \(sequence\) is 33; the artifact accepts 1 to 32"
    with pytest.raises(InputError, match=message):
        compiled(*tokens(2, 33))


def test_a_wider_requested_range_is_narrowed_to_what_the_model_allows():
    dims = {index: {0: ("batch", 1, 64), 1: ("sequence", 1, 1000)} for index in range(2)}
    captured = capture(build(PositionTable), tokens(2, 16), dims)
    assert captured.dynamic_dims == {index: {0: ("batch", 1, 64), 1: ("sequence", 1, 32)} for index in range(2)}
    assert captured.fallbacks == []


def test_fixed_sequence_falls_back_to_batch_only_with_a_warning(caplog):
    model = build(FixedLength)
    ids = tokens(2, 16)[0]
    with caplog.at_level(logging.WARNING, logger="compiler"):
        compiled = compile(model, example_inputs=(ids,))
    assert compiled.report.capture["front_end"] == "torch.export, batch dynamic only"
    assert compiled.manifest["inputs"][0]["dynamic_dims"] == {"0": ["batch", 1, None]}
    (fallback,) = compiled.report.fallbacks
    assert "specialized it to be a constant (16)" in fallback and "input_ids[2, 16]" in fallback
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "dynamic_dims={0: {0: ('batch', 1, None)}}" in warnings[0] and "strict=True" in warnings[0]
    for batch in (1, 5):
        batch_ids = tokens(batch, 16)[0]
        with torch.no_grad():
            expected = model(batch_ids)
        torch.testing.assert_close(compiled(batch_ids), expected, rtol=RTOL, atol=ATOL)
    with pytest.raises(InputError, match=r"dimension 1 is 8; the artifact accepts only 16 there"):
        compiled(tokens(2, 8)[0])


def test_asking_for_the_shapes_the_warning_names_avoids_the_fallback(caplog):
    with caplog.at_level(logging.WARNING, logger="compiler"):
        compiled = compile(build(FixedLength), example_inputs=(tokens(2, 16)[0],),
                           dynamic_dims={0: {0: ("batch", 1, None)}}, strict=True)
    assert compiled.report.fallbacks == []
    assert compiled.report.capture["front_end"] == "torch.fx.symbolic_trace"
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_fixed_batch_falls_back_to_static_shapes():
    model = build(FixedBatch)
    x = torch.randn(2, 4)
    compiled = compile(model, example_inputs=(x,))
    assert compiled.report.capture["front_end"] == "torch.export, static shapes"
    assert compiled.manifest["inputs"][0]["dynamic_dims"] == {}
    assert "x[2, 4]" in compiled.report.fallbacks[0]
    torch.testing.assert_close(compiled(x), model(x), rtol=RTOL, atol=ATOL)
    with pytest.raises(InputError, match=r"input 'x' dimension 0 is 3; the artifact accepts only 2 there"):
        compiled(torch.randn(3, 4))


@pytest.mark.parametrize("model_class", [FixedLength, FixedBatch])
def test_strict_refuses_a_capture_fallback_before_any_pass(model_class):
    inputs = (tokens(2, 16)[0],) if model_class is FixedLength else (torch.randn(2, 4),)
    with pytest.raises(FallbackError, match="strict mode: capture recorded a fallback: capture fell back to"):
        compile(build(model_class), example_inputs=inputs, strict=True)


def test_a_model_that_differs_at_size_one_accepts_sizes_from_two():
    model = build(BranchOnBatchOfOne)
    compiled = compile(model, example_inputs=(torch.randn(3, 4),))
    assert compiled.manifest["inputs"][0]["dynamic_dims"] == {"0": ["batch", 2, None]}
    assert "batch of size 1" in compiled.report.fallbacks[0]
    with pytest.raises(InputError, match=r"dimension 0 \(batch\) is 1; the artifact accepts 2 or more"):
        compiled(torch.randn(1, 4))
    x = torch.randn(4, 4)
    torch.testing.assert_close(compiled(x), model(x), rtol=RTOL, atol=ATOL)


def test_size_one_examples_are_traced_wider_and_stay_dynamic():
    model = build(PositionTable)
    compiled = compile(model, example_inputs=tokens(1, 1))
    assert compiled.manifest["inputs"][1]["dynamic_dims"] == {"0": ["batch", 1, None], "1": ["sequence", 1, 32]}
    inputs = tokens(4, 9)
    torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=RTOL, atol=ATOL)


def test_inputs_caught_by_varargs_are_dynamic_too():
    model = build(TwoInputsAsVarArgs)
    compiled = compile(model, example_inputs=(torch.randn(2, 4), torch.randn(2, 4)))
    assert compiled.report.fallbacks == []
    inputs = (torch.randn(5, 4), torch.randn(5, 4))
    torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=RTOL, atol=ATOL)


def test_the_ladder_skips_rungs_that_ask_for_nothing_new():
    both = {0: {0: ("batch", 1, None), 1: ("sequence", 1, None)}}
    assert [suffix for suffix, _ in shape_ladder(both)] == ["", ", batch dynamic only", ", static shapes"]
    assert [suffix for suffix, _ in shape_ladder({0: {0: ("batch", 1, None)}})] == ["", ", static shapes"]
    assert [suffix for suffix, _ in shape_ladder({})] == [""]


def test_narrowing_cuts_only_the_named_dims_and_copies():
    ids, mask = tokens(3, 5)
    dims = {0: {0: ("batch", 1, None), 1: ("sequence", 1, 32)}, 1: {0: ("batch", 1, None)}}
    narrowed_ids, narrowed_mask = narrow_inputs((ids, mask), dims, {"batch", "sequence"})
    assert narrowed_ids.shape == (1, 1) and narrowed_mask.shape == (1, 5)
    assert narrowed_ids.data_ptr() != ids.data_ptr()
    assert narrow_inputs(tokens(1, 1), dims, {"batch", "sequence"}) is None


def test_example_inputs_are_not_marked_by_tracing():
    x = torch.randn(2, 4)
    capture(build(FixedBatch), (x,))
    assert not getattr(x, "_dynamo_dynamic_indices", None)


class ArangePositions(nn.Module):
    """GPT-2's way: positions from ``arange`` into an ``nn.Embedding`` of 24 rows, invisible to export."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(50, 8)
        self.positions = nn.Embedding(24, 8)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return (self.tokens(input_ids) + self.positions(positions)).mean(1)


def test_a_table_export_cannot_see_is_found_by_probing_eager():
    model = build(ArangePositions)
    compiled = compile(model, example_inputs=(tokens(2, 16)[0],))
    assert compiled.manifest["inputs"][0]["dynamic_dims"] == {"0": ["batch", 1, None], "1": ["sequence", 1, 24]}
    record = compiled.report.capture["probed_bounds"]["sequence"]
    assert record["max"] == 24 and record["table_rows"] == 24
    assert record["reason"].startswith("eager fails at 25 (IndexError")
    assert "bound probed: sequence <= 24" in str(compiled.report)
    ids = tokens(3, 24)[0]
    torch.testing.assert_close(compiled(ids), model(ids), rtol=RTOL, atol=ATOL)
    with pytest.raises(InputError, match="is 25; the artifact accepts 1 to 24"):
        compiled(tokens(1, 25)[0])


def test_tables_longer_than_the_probe_limit_are_not_probed(monkeypatch):
    monkeypatch.setattr(shape_bounds, "MAX_PROBED_LENGTH", 20)
    captured = capture(build(ArangePositions), (tokens(2, 16)[0],))
    assert captured.dynamic_dims[0][1] == ("sequence", 1, None)
    assert captured.probed_bounds == {}


def test_a_model_that_runs_past_every_table_stays_unbounded():
    ids = tokens(2, 16)[0]
    mean_of_tokens = nn.Sequential(nn.Embedding(50, 4)).eval()
    captured = capture(mean_of_tokens, (ids,))
    assert captured.dynamic_dims[0][1] == ("sequence", 1, None) and captured.probed_bounds == {}


def test_resizing_for_probes_tiles_the_named_dim_and_keeps_a_fixed_batch():
    ids, mask = tokens(2, 4)
    dims = {0: {0: ("batch", 1, None), 1: ("sequence", 1, None)}, 1: {1: ("sequence", 1, None)}}
    resized_ids, resized_mask = shape_bounds.resize_inputs((ids, mask), dims, "sequence", 10)
    assert resized_ids.shape == (1, 10) and resized_mask.shape == (2, 10)
    assert torch.equal(resized_ids[0, 4:8], ids[0])
