"""low_rank: exact at full rank on every zoo model, output-aware beats plain SVD, budgets met with the
backend's block, refusals with reasons, and factorised models that lower, quantise and recover."""

from __future__ import annotations

import json

import pytest
import torch

import models
from compiler import CalibrationDataError, PassError, TargetError, compile, ir
from compiler.pipeline import run_pipeline
from passes.low_rank import factors

FULL_RANK = {"energy": 1.0, "round_to": 1, "savings_only": False, "refit": False}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread per test worker: two workers' eigendecompositions on two cores otherwise thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mlp():
    return models.load("mlp")


@pytest.fixture(scope="module")
def digits():
    return models.load("digits-cnn")


def weighted_layers(gm) -> int:
    return sum(ir.op_name(node) in ("aten.linear", "aten.conv2d") for node in ir.call_nodes(gm))


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("name", models.registry.names())
def test_full_rank_factorisation_of_every_zoo_model_is_exact(name):
    """Every conv (one group) and linear split into its chain at full rank computes the original within 1e-4."""
    zoo = models.load(name)
    compiled = compile(zoo.model, "cpu-fp32", zoo.example_inputs, calibration_data=[zoo.calibration_data(16)],
                       low_rank=FULL_RANK, recover_seconds=0)
    stats = compiled.report.entry("low_rank").stats
    skipped = stats["skipped"]
    assert set(skipped) <= {"grouped or depthwise conv (nothing to factor across channels)"}, skipped
    assert stats["layers_factorised"] >= 1
    assert weighted_layers(compiled.graph_module) > stats["layers_factorised"]  # really split into chains
    inputs = zoo.eval_data(4)
    with torch.no_grad():
        reference = zoo.model(*inputs)
        found = compiled.graph_module(*inputs)
    reference = reference[0] if isinstance(reference, (tuple, list)) else reference
    assert relative_error(found[0], reference) <= 1e-4
    assert relative_error(torch.as_tensor(compiled(*inputs)), reference) <= 1e-4  # and in ONNX Runtime


def test_plain_svd_at_full_rank_is_exact_too(digits):
    compiled = compile(digits.model, "cpu-fp32", digits.example_inputs, low_rank={**FULL_RANK, "method": "svd"},
                       recover_seconds=0)
    inputs = digits.eval_data(8)
    with torch.no_grad():
        assert relative_error(compiled.graph_module(*inputs)[0], digits.model(*inputs)) <= 1e-4


def output_error(compiled, zoo, count: int = 200) -> float:
    inputs = zoo.eval_data(count)
    with torch.no_grad():
        reference = zoo.model(*inputs)
        found = compiled.graph_module(*inputs)[0]
    return float((found - reference).pow(2).mean() / reference.pow(2).mean())


@pytest.mark.parametrize("name", ["mlp", "digits-cnn"])
def test_output_aware_truncation_beats_plain_svd_at_the_same_ranks(name):
    """Same ranks (uniform allocation), no re-fit: only the truncation differs; held-out inputs judge it."""
    zoo = models.load(name)
    errors = {}
    for method in ("activation", "svd"):
        compiled = compile(zoo.model, "cpu-fp32", zoo.example_inputs, calibration_data=[zoo.calibration_data(256)],
                           low_rank={"macs": 0.3, "method": method, "allocation": "uniform", "refit": False,
                                     "round_to": 4}, recover_seconds=0)
        errors[method] = output_error(compiled, zoo)
        ranks = {name: row["rank"] for name, row in compiled.report.entry("low_rank").stats["layers"].items()}
        errors[f"{method} ranks"] = ranks
    assert errors["activation ranks"] == errors["svd ranks"]
    assert errors["activation"] < 0.7 * errors["svd"], errors


def test_sensitivity_allocation_and_refit_each_help(digits):
    """The defaults (measured allocation, sequential re-fit) against uniform ranks, and against no re-fit.

    On digits-cnn, whose convs give many rows per weight; the mlp's data is too low-rank for either
    to show (its cut layers lose nothing at the measured ranks, and it has too few rows to re-fit).
    """
    data = [digits.calibration_data(256)]
    errors = {}
    for label, options in {"default": {}, "uniform": {"allocation": "uniform"}, "no refit": {"refit": False}}.items():
        compiled = compile(digits.model, "cpu-fp32", digits.example_inputs, calibration_data=data,
                           low_rank={"macs": 0.5, "round_to": 4, **options}, recover_seconds=0)
        errors[label] = output_error(compiled, digits)
    assert errors["default"] < 0.5 * min(errors["uniform"], errors["no refit"]), errors


def test_mac_budget_met_with_ranks_in_the_backends_block(mlp):
    compiled = compile(mlp.model, "cpu-fp32", mlp.example_inputs, calibration_data=[mlp.calibration_data(128)],
                       low_rank={"macs": 0.3}, recover_seconds=0)
    entry = compiled.report.entry("low_rank")
    stats = entry.stats
    assert stats["budget"]["met"] and 0.3 <= stats["budget"]["removed"] <= 0.4, stats["budget"]
    assert stats["round_to"] == 16 and stats["allocation"] == "sensitivity"
    assert 1 - entry.macs_after / entry.macs_before >= 0.3  # the pass manager's own count agrees
    for row in stats["layers"].values():
        assert row["module"].startswith("fc") and all(rank % 16 == 0 for rank in row["rank"])
        assert row["macs_kept"] < 1 and 0 <= row["energy_lost"] < 1
    assert any("low_rank" in line for line in str(compiled.report).splitlines())


def test_tucker_2_factorises_a_3x3_conv_into_three(digits):
    compiled = compile(digits.model, "cpu-fp32", digits.example_inputs,
                       calibration_data=[digits.calibration_data(128)], low_rank={"macs": 0.3, "round_to": 4},
                       recover_seconds=0)
    rows = compiled.report.entry("low_rank").stats["layers"]
    tucker = [row for row in rows.values() if row["kind"] == "tucker"]
    assert tucker and all(len(row["rank"]) == 2 for row in tucker)
    convs = [node for node in ir.call_nodes(compiled.graph_module) if ir.op_name(node) == "aten.conv2d"]
    shapes = [tuple(ir.tensor_of(compiled.graph_module, node.args[1]).shape) for node in convs]
    assert any(shape[2:] == (3, 3) and shape[0] < 32 and shape[1] < 16 for shape in shapes), shapes  # the thin core
    assert len(convs) == 4  # conv1, and conv2 as 1x1, 3x3 core, 1x1
    inputs = digits.eval_data(200)
    with torch.no_grad():
        agree = (compiled.graph_module(*inputs)[0].argmax(1) == digits.model(*inputs).argmax(1)).double().mean()
    assert agree >= 0.9


def test_a_layer_no_rank_saves_on_is_left_alone_with_the_reason(digits):
    compiled = compile(digits.model, "cpu-fp32", digits.example_inputs,
                       calibration_data=[digits.calibration_data(32)], low_rank={"macs": 0.3, "round_to": 64},
                       recover_seconds=0)
    stats = compiled.report.entry("low_rank").stats
    assert stats["skipped"] == {"no rank in multiples of 64 saves MACs": 3}
    assert compiled.report.entry("low_rank").modified is False


def test_protected_layers_keep_their_weight(mlp):
    compiled = compile(mlp.model, "cpu-fp32", mlp.example_inputs, calibration_data=[mlp.calibration_data(64)],
                       low_rank={"macs": 0.2, "protect": ["fc1"]}, recover_seconds=0)
    stats = compiled.report.entry("low_rank").stats
    assert stats["skipped"]["protected"] == 1 and "fc1" not in {row["module"] for row in stats["layers"].values()}


@pytest.mark.parametrize(("low_rank", "message"), [
    ({"macs": 0.3, "energy": 0.9}, "one budget"),
    ({}, "one budget"),
    ({"macs": 0.3, "ranks": 4}, "no key(s) ranks"),
    ("0.3", "must be a dict"),
])
def test_bad_low_rank_arguments_are_refused_by_compile(mlp, low_rank, message):
    with pytest.raises(TargetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compile(mlp.model, "cpu-fp32", mlp.example_inputs, low_rank=low_rank, recover_seconds=0)


@pytest.mark.parametrize(("options", "message"), [
    ({"macs": 1.2}, "macs is the share"),
    ({"energy": -0.1}, "energy is the share"),
    ({"macs": 0.3, "method": "tucker"}, "method must be"),
    ({"macs": 0.3, "allocation": "greedy"}, "allocation must be"),
    ({"macs": 0.3, "round_to": 0}, "round_to must be"),
    ({"macs": 0.3, "weighting": "fisher"}, "weighting must be"),
])
def test_bad_options_are_refused_by_the_pass(mlp, options, message):
    with pytest.raises(PassError, match=message):
        compile(mlp.model, "cpu-fp32", mlp.example_inputs, calibration_data=[mlp.calibration_data(8)],
                low_rank=options, recover_seconds=0)


def test_data_aware_factorisation_without_data_says_what_to_pass(mlp):
    with pytest.raises(CalibrationDataError, match=r"needs calibration_data \(read by low_rank\)"):
        compile(mlp.model, "cpu-fp32", mlp.example_inputs, low_rank={"macs": 0.3}, recover_seconds=0)


def test_plain_svd_needs_no_data(mlp):
    compiled = compile(mlp.model, "cpu-fp32", mlp.example_inputs, low_rank={"macs": 0.3, "method": "svd"},
                       recover_seconds=0)
    assert compiled.report.entry("low_rank").stats["allocation"] == "uniform"


def test_factorised_linears_become_dynamic_int8_gemms(mlp):
    compiled = compile(mlp.model, "cpu-int8-dynamic", mlp.example_inputs, calibration_data=[mlp.calibration_data(64)],
                       low_rank={"macs": 0.3}, recover_seconds=0)
    factorised = compiled.report.entry("low_rank").stats["layers_factorised"]
    ops = [node.op_type for node in compiled.onnx.graph.node]
    assert factorised >= 1
    assert ops.count("DynamicQuantizeMatMul") + ops.count("MatMulIntegerToFloat") == 3 + factorised
    assert "MatMul" not in ops


def test_factorised_then_static_int8_runs_in_integer_kernels(digits):
    compiled = compile(digits.model, "cpu-int8", digits.example_inputs, calibration_data=[digits.calibration_data(64)],
                       low_rank={"macs": 0.2, "round_to": 8}, recover_seconds=0)
    assert compiled.report.entry("low_rank").stats["layers_factorised"] >= 1
    inputs = digits.eval_data(64)
    with torch.no_grad():
        agree = (torch.as_tensor(compiled(*inputs)).argmax(1) == digits.model(*inputs).argmax(1)).double().mean()
    assert agree >= 0.9


def test_recovery_trains_every_factor(mlp):
    data = [mlp.calibration_data(128)]
    result = run_pipeline(mlp.model, "cpu-fp32", mlp.example_inputs, calibration_data=data,
                          extra_passes=_passes({"macs": 0.5, "refit": False}, seconds=3.0))
    recover = result.ledger.entry("recover").stats
    factorised = result.ledger.entry("low_rank").stats["layers_factorised"]
    assert recover["steps"] > 0 and recover["tensors_trained"] == 6 + factorised  # 3 weights, 3 biases, + factors
    assert recover["held_out_after"] >= recover["held_out_before"]


def _passes(low_rank: dict, seconds: float):
    from compiler.pruning_options import compression_passes

    return compression_passes(None, low_rank, seconds)


@pytest.mark.parametrize("seed", range(5))
def test_projection_is_optimal_and_exact_at_full_rank(seed):
    """On random data: never worse than plain SVD in output error at any rank, and exact at full rank."""
    generator = torch.Generator().manual_seed(seed)
    weight, bias = torch.randn(12, 20, generator=generator), torch.randn(12, generator=generator)
    rows = torch.randn(400, 20, generator=generator) @ torch.randn(20, 20, generator=generator) + 2
    mean, covariance = factors.moments(rows)
    reference = rows.double() @ weight.double().T + bias.double()
    for rank in (2, 6, 11):
        first, last, new_bias = factors.project(weight, bias, mean, covariance, rank)
        plain = factors.weight_svd(weight, bias, rank)
        mine = ((rows.double() @ (last @ first).T + new_bias - reference).pow(2).mean())
        theirs = ((rows.double() @ (plain[1] @ plain[0]).T + plain[2] - reference).pow(2).mean())
        assert mine <= theirs * (1 + 1e-9)
    first, last, new_bias = factors.project(weight, bias, mean, covariance, 12)
    torch.testing.assert_close(last @ first, weight.double(), rtol=0, atol=1e-9)
    importance = torch.rand(12, generator=generator) + 0.1
    first, last, _ = factors.project(weight, bias, mean, covariance, 12, importance)
    torch.testing.assert_close(last @ first, weight.double(), rtol=0, atol=1e-9)


def test_tucker_input_factor_is_the_identity_at_full_rank():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 6, 3, 3, generator=generator)
    rows = torch.randn(300, 6, generator=generator)
    first, widen, _ = factors.input_factor(weight, factors.moments(rows)[1], 6)
    torch.testing.assert_close(widen @ first, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-9)
    core = torch.einsum("oikl,ir->orkl", weight.double(), widen)
    torch.testing.assert_close(factors.compose(first, torch.eye(8, dtype=torch.float64), core), weight.double(),
                               rtol=0, atol=1e-9)


def test_the_command_factorises_a_zoo_model(tmp_path):
    from click.testing import CliRunner

    from compiler.cli.main import main

    result = CliRunner().invoke(main, ["compile", "mlp", "-o", str(tmp_path / "out"), "--low-rank-macs", "0.3",
                                       "--recover-seconds", "0", "--calibration-samples", "64", "--json"])
    assert result.exit_code == 0, result.output
    passes = {entry["name"]: entry for entry in json.loads(result.stdout)["report"]["passes"]}
    assert passes["low_rank"]["stats"]["budget"]["met"] and "recover" not in passes
    assert (tmp_path / "out" / "model.onnx").exists()


def test_the_command_asks_for_data_it_cannot_find(tmp_path):
    from click.testing import CliRunner

    from compiler.cli.main import main

    factory = tmp_path / "user.py"
    factory.write_text("import torch\nfrom torch import nn\n\ndef build():\n"
                       "    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval(), "
                       "torch.randn(2, 64)\n")
    result = CliRunner().invoke(main, ["compile", f"{factory}:build", "-o", str(tmp_path / "out"),
                                       "--low-rank-macs", "0.3", "--recover-seconds", "0"])
    assert result.exit_code == 2
    assert "low-rank factorisation measures layers on data" in result.stderr
    assert not (tmp_path / "out").exists()


def test_too_few_calibration_rows_to_refit_is_reported(mlp, caplog):
    """64 samples are 64 rows: fc1 (784 inputs) and fc2 (512) need 4 per input feature to be re-fitted."""
    compiled = compile(mlp.model, "cpu-fp32", mlp.example_inputs, calibration_data=[mlp.calibration_data(64)],
                       low_rank={"macs": 0.3}, recover_seconds=0)
    stats = compiled.report.entry("low_rank").stats
    assert stats["refit"]["projected_only"]["layers"] == sorted(stats["layers"])
    assert "pass more calibration data" in caplog.text
