"""The int8 bench's quality reference points: the uint8-input ceiling and the top-2 margins."""

from __future__ import annotations

import math

import pytest
import torch

from bench.int8_peers import input_rounding_ceiling, rounded_to_uint8, top2_margins


def test_rounding_to_uint8_stays_within_half_a_step_and_lands_on_the_grid():
    x = torch.linspace(-1.0, 1.0, 1001).reshape(1, 1, 7, 143)
    (rounded,) = rounded_to_uint8((x,), ((-1.0, 1.0),))
    step = 2.0 / 255
    assert (rounded - x).abs().max() <= step / 2 + 1e-6
    zero_point = round(1.0 / step)
    codes = rounded / step + zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().unique().numel() >= 255  # the whole range, at 8 bits


def test_rounding_keeps_integer_inputs_and_includes_zero_in_the_range():
    tokens = torch.arange(10)
    x = torch.full((3,), 0.5)
    rounded_tokens, rounded = rounded_to_uint8((tokens, x), ((0.0, 0.0), (0.4, 0.6)))
    assert rounded_tokens is tokens
    assert torch.allclose(rounded, x, atol=0.6 / 255 / 2 + 1e-7)  # range widened to [0, 0.6]


def test_top2_margins_are_the_gap_between_the_two_largest_probabilities():
    logits = torch.tensor([[0.0, 0.0, -100.0], [math.log(3.0), 0.0, -100.0]])
    assert top2_margins(logits).tolist() == pytest.approx([0.0, 0.5])


def test_the_ceiling_is_exact_for_inputs_already_on_the_grid_and_not_for_others():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)).eval()
    step = 2.0 / 255
    on_grid = (torch.randint(0, 256, (64, 3, 2, 2)).float() - 128) * step
    calibration = (torch.tensor([-128 * step, 127 * step]).repeat(32).reshape(64, 1, 1, 1).expand(64, 3, 2, 2),)
    with torch.no_grad():
        reference = model(on_grid)
    exact = input_rounding_ceiling(model, calibration, (on_grid,), reference)
    assert exact["top1_agreement"] == 1.0 and math.isinf(exact["sqnr_db"])
    off_grid = on_grid + step / 3
    with torch.no_grad():
        reference = model(off_grid)
    rounded = input_rounding_ceiling(model, calibration, (off_grid,), reference)
    assert math.isfinite(rounded["sqnr_db"]) and rounded["sqnr_db"] > 20


def test_the_bench_runs_end_to_end_on_digits_and_records_each_model_under_its_own_name(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "int8.json"
    subprocess.run([sys.executable, "-m", "bench.int8_peers", "--models", "digits-cnn", "--eval", "16", "--calib", "16",
                    "--repeats", "2", "--warmup", "1", "--no-pt2e", "--json", str(out)],
                   cwd=root, check=True, capture_output=True, timeout=600)
    (result,) = json.loads(out.read_text())["results"]
    assert result["model"] == "digits-cnn"  # a loop once rebound the model's name to the last pipeline's
    rows = {row["pipeline"]: row for row in result["rows"]}
    assert {"ort-fp32", "ort-quantize_static", "fxpress cpu-int8"} <= set(rows)
    assert rows["fxpress cpu-int8"]["block_ratio_range_b16"] is not None
    assert result["fragility"]["uint8_input"]["top1_agreement"] <= 1.0
    assert 0.0 <= result["fragility"]["margin_below_0.05"] <= 1.0
