"""smooth_quant: outlier activation channels of Linear inputs move into the weights, the float
outputs stay what they were, and every tensor whose producer cannot absorb the scale exactly is
refused with its reason.

Outliers are made the way trained transformers have them: a few LayerNorm gains (or rows of a
producing Linear) 30 to 50 times the others.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from compiler import ir
from compiler.errors import CalibrationDataError, PassError, TargetError
from compiler.pass_base import PassContext
from compiler.pipeline import run_pipeline
from compiler.targets import TARGETS, PassSpec
from passes import REGISTRY
from passes.quant.calibration_data import validate_calibration_data
from passes.quant.smooth_quant import SmoothQuant, channel_maxima, outlier_ratio

WIDTH, TOKENS = 16, 5
OUTLIERS = (3, 11)


class PreNormBlock(nn.Module):
    """A pre-LayerNorm transformer block: LayerNorm -> Q/K/V, attention, LayerNorm -> fc1 -> ReLU -> fc2."""

    def __init__(self, outliers: bool = True):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(2 * WIDTH, WIDTH)
        with torch.no_grad():
            for norm in (self.ln1, self.ln2):
                norm.weight.copy_(torch.rand(WIDTH) + 0.5)
                norm.bias.copy_(torch.randn(WIDTH) * 0.1)
                if outliers:
                    norm.weight[list(OUTLIERS)] *= 40
                    norm.bias[list(OUTLIERS)] += 5

    def forward(self, x):
        y = self.ln1(x)
        q, k, v = self.q(y), self.k(y), self.v(y)
        x = x + self.o(torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v)
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


class PostNormBlock(nn.Module):
    """BERT's order: the LayerNorm output feeds the next Linear and the residual add."""

    def __init__(self):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, WIDTH)
        with torch.no_grad():
            self.ln.weight[list(OUTLIERS)] *= 40

    def forward(self, x):
        y = self.ln(x)
        return y + self.fc(y)


class LinearChain(nn.Module):
    """Linear -> Linear with nothing in between; then a constant-weight matmul reader."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.projection = nn.Parameter(torch.randn(WIDTH, 6))
        with torch.no_grad():
            self.first.weight[list(OUTLIERS)] *= 50

    def forward(self, x):
        return self.second(self.first(x)) @ self.projection


def _inputs(count: int, seed: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(count, TOKENS, WIDTH, generator=torch.Generator().manual_seed(seed)),)


def _context(inputs, calibration=None) -> PassContext:
    context = PassContext(example_inputs=inputs, probe_inputs=inputs)
    if calibration is not None:
        context.calibration_data = validate_calibration_data(calibration, inputs, ("x",), {0: {0: ("batch", 1, 64)}})
    return context


def _smooth(capture_gm, model, **options):
    inputs = _inputs(2, 0)
    gm = capture_gm(model, inputs)
    result = SmoothQuant(**options)(gm, _context(inputs, [_inputs(16, 1), _inputs(8, 2)]))
    result.graph_module.graph.lint()
    result.graph_module.recompile()
    return gm, result, inputs


def _column_norms(gm, path: str) -> torch.Tensor:
    node = next(node for node in ir.call_nodes(gm) if ir.module_path(node) == path and node.args[1].op == "get_attr")
    return ir.get_attribute(gm, node.args[1].target).detach().double().abs().amax(dim=0)


def test_registered_under_its_file_name():
    assert REGISTRY["smooth_quant"] is SmoothQuant


def test_pre_norm_block_is_smoothed_and_outputs_match(capture_gm, assert_matches_model):
    model = PreNormBlock().eval()
    original = {name: _column_norms(capture_gm(model, _inputs(2, 0)), name) for name in ("q", "k", "v", "fc1")}

    gm, result, inputs = _smooth(capture_gm, model)

    assert result.modified and result.stats["smoothed"] == 2
    rows = {row["producer"]: row for row in result.stats["layers"]}
    assert rows["ln1"]["layers"] == ["q", "k", "v"] and rows["ln2"]["layers"] == ["fc1"]
    assert all(row["producer_op"] == "aten.layer_norm" for row in rows.values())
    for row in rows.values():  # alpha = 0.5 moves about half of the outlier (in log scale) into the weights
        assert row["outlier_ratio_before"] > 20 and row["outlier_ratio_after"] < row["outlier_ratio_before"] / 4
    # Q, K and V share one scale: their weight columns grew by the same factor
    factors = [_column_norms(gm, name) / original[name] for name in ("q", "k", "v")]
    torch.testing.assert_close(factors[0], factors[1])
    torch.testing.assert_close(factors[0], factors[2])
    assert factors[0][list(OUTLIERS)].min() > factors[0].median()  # outlier channels moved most
    assert_matches_model(model, gm, inputs)


def test_measured_activation_maxima_lose_their_outliers(capture_gm):
    model = PreNormBlock().eval()
    gm, result, _ = _smooth(capture_gm, model, alpha=1.0)
    calibration = _context(_inputs(2, 0), [_inputs(16, 1), _inputs(8, 2)]).calibration_data
    norms = [node for node in ir.call_nodes(gm) if ir.op_name(node) == "aten.layer_norm"]
    maxima = channel_maxima(gm, norms, calibration, batch_size=32)
    for node in norms:
        # alpha = 1 divides every channel by its own maximum: all maxima become 1
        torch.testing.assert_close(maxima[node], torch.ones(WIDTH, dtype=torch.float64), rtol=1e-5, atol=0)
        assert outlier_ratio(maxima[node]) == pytest.approx(1.0, rel=1e-5)
    assert all(row["outlier_ratio_after"] == pytest.approx(1.0, rel=1e-6) for row in result.stats["layers"])


def test_linear_producer_and_matmul_reader(capture_gm, assert_matches_model):
    model = LinearChain().eval()
    gm, result, inputs = _smooth(capture_gm, model)

    (row,) = result.stats["layers"]
    assert (row["producer"], row["producer_op"], row["layers"]) == ("first", "aten.linear", ["second"])
    assert row["outlier_ratio_after"] < row["outlier_ratio_before"] / 4
    # second's output (read by the matmul) is a candidate too, without outliers: left alone
    assert result.stats["candidates"] == 2
    assert result.stats["refused"]["no outlier channels (max/median below 5)"] == 1
    assert_matches_model(model, gm, inputs)


def test_tensor_without_outliers_is_left_alone(capture_gm, assert_untouched):
    model = PreNormBlock(outliers=False).eval()
    inputs = _inputs(2, 0)
    gm = capture_gm(model, inputs)
    fingerprint = ir.fingerprint(gm)

    result = SmoothQuant()(gm, _context(inputs, [_inputs(16, 1)]))

    assert_untouched(result, fingerprint)
    assert result.stats["refused"] == {
        "no outlier channels (max/median below 5)": 2,  # ln1 and ln2
        "producer aten.matmul cannot absorb a per-channel scale": 1,  # attention output -> o
        "producer aten.relu cannot absorb a per-channel scale": 1,  # fc1 -> ReLU -> fc2
    }


def test_layer_norm_also_read_by_a_residual_add_is_refused(capture_gm, assert_untouched):
    model = PostNormBlock().eval()
    inputs = _inputs(2, 0)
    gm = capture_gm(model, inputs)
    fingerprint = ir.fingerprint(gm)

    result = SmoothQuant()(gm, _context(inputs, [_inputs(16, 1)]))

    assert_untouched(result, fingerprint)
    (reason,) = result.stats["refused"]
    assert reason == "also read by aten.add"
    assert result.stats["left_alone"] == [{"producer": "ln", "reason": reason}]


def test_producer_that_cannot_absorb_a_scale_is_refused(capture_gm, assert_untouched):
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH)).eval()
    inputs = _inputs(2, 0)
    gm = capture_gm(model, inputs)
    fingerprint = ir.fingerprint(gm)

    result = SmoothQuant()(gm, _context(inputs, [_inputs(16, 1)]))

    assert_untouched(result, fingerprint)
    assert "producer aten.gelu cannot absorb a per-channel scale" in result.stats["refused"]
    assert "producer placeholder cannot absorb a per-channel scale" in result.stats["refused"]


def test_declares_calibration_and_runs_in_a_pipeline():
    assert SmoothQuant.needs_calibration
    target = dataclasses.replace(TARGETS["cpu-fp32"], name="smooth", pipeline=(PassSpec("smooth_quant"),))
    model = PreNormBlock().eval()

    result = run_pipeline(model, target, _inputs(2, 0), calibration_data=[_inputs(16, 1)])

    (entry,) = result.ledger.entries
    assert entry.name == "smooth_quant" and entry.modified and entry.stats["smoothed"] == 2
    assert entry.drift["max_abs"] < 1e-4  # the pass manager checked it as an exact pass
    with pytest.raises(CalibrationDataError, match="calibration_data"):
        run_pipeline(model, target, _inputs(2, 0))


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"alpha": 1.5}, PassError, "alpha"), ({"outlier_threshold": 0.5}, PassError, "outlier_threshold"),
    ({"batch_size": 0}, PassError, "batch_size"),
    ({"iterations": 2}, TargetError, "iterations"),
])
def test_bad_options_are_refused(capture_gm, options, error, match):
    inputs = _inputs(2, 0)
    gm = capture_gm(PreNormBlock().eval(), inputs)
    with pytest.raises(error, match=match):
        SmoothQuant(**options)(gm, _context(inputs, [_inputs(4, 1)]))


def test_missing_calibration_data_is_a_typed_error(capture_gm):
    inputs = _inputs(2, 0)
    gm = capture_gm(PreNormBlock().eval(), inputs)
    with pytest.raises(CalibrationDataError, match="smooth_quant"):
        SmoothQuant()(gm, _context(inputs))


def test_channel_maxima_do_not_depend_on_the_batch_size(capture_gm):
    inputs = _inputs(2, 0)
    calibration = _context(inputs, [_inputs(16, 1), _inputs(7, 2)]).calibration_data
    everything = torch.cat([_inputs(16, 1)[0], _inputs(7, 2)[0]])
    model = PreNormBlock().eval()
    gm = capture_gm(model, inputs)
    norms = [node for node in ir.call_nodes(gm) if ir.op_name(node) == "aten.layer_norm"]
    whole = channel_maxima(gm, norms, calibration, batch_size=32)
    pieces = channel_maxima(gm, norms, calibration, batch_size=3)
    with torch.no_grad():
        expected = model.ln1(everything).abs().amax(dim=(0, 1))
    for node in norms:
        torch.testing.assert_close(whole[node], pieces[node])
    torch.testing.assert_close(whole[norms[0]], expected.double())
