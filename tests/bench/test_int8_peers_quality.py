"""The int8 bench's quality measures (reference points, decisive and top-5 agreement) and its NNCF peer."""

from __future__ import annotations

import math

import pytest
import torch

from bench.int8_peers import (
    classifier_quality,
    export_fp32,
    input_rounding_ceiling,
    integer_convs,
    nncf_pipeline,
    ort_quantize_static,
    rounded_to_uint8,
    top2_margins,
)


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


def test_decisive_and_top5_agreement_follow_fp32s_top1():
    reference = torch.tensor([[5.0, 0, 0, 0, 0, 0, 0],  # decisive, class 0
                              [1.0, 0.9, 0, 0, 0, 0, 0],  # top-2 within 0.2: not decisive
                              [0.0, 0, 0, 0, 0, 0, 5]])  # decisive, class 6
    actual = torch.tensor([[1.0, 0, 0, 2, 0, 0, 0],  # class 0 second: top-5 only
                           [1.0, 0, 0, 0, 0, 0, 0],  # agrees
                           [0.0, 1, 2, 3, 4, 5, -1]])  # class 6 last: neither
    quality = classifier_quality(reference, actual, None)
    assert quality["top1_agreement"] == pytest.approx(1 / 3)
    assert quality["decisive_agreement"] == 0.0  # the one agreeing crop is not decisive
    assert quality["top5_agreement"] == pytest.approx(2 / 3)
    assert classifier_quality(reference[1:2], actual[1:2], None)["decisive_agreement"] is None


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
    import importlib.util
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
    assert 0 <= result["fragility"]["decisive_crops"] <= 16
    assert {"decisive_agreement", "top5_agreement"} <= set(rows["ort-quantize_static"])
    assert "convs in integer kernels" in rows["ort-quantize_static"]["notes"][0]
    if importlib.util.find_spec("nncf") is None:
        assert rows["nncf-ptq"]["status"].startswith("not available: import nncf failed")
    else:
        assert {"top1_agreement", "decisive_agreement", "top5_agreement", "p50_ms_b16"} <= set(rows["nncf-ptq"])


@pytest.fixture(scope="module")
def small_cnn():
    """A two-conv ReLU classifier, its fp32 exports at batch 1 and 4, calibration and timing inputs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    calibration = (torch.randn(8, 3, 8, 8),)
    timing = {batch: (torch.randn(batch, 3, 8, 8),) for batch in (1, 4)}
    return model, export_fp32(model, timing), calibration, timing


def test_integer_convs_counts_quantize_statics_fused_convs(small_cnn, tmp_path):
    _, fp32, calibration, _ = small_cnn
    quantized = ort_quantize_static(fp32, calibration, tmp_path)
    assert integer_convs(quantized[1], tmp_path).startswith("2 of 2 convs in integer kernels (")
    assert integer_convs(fp32[1], tmp_path) == "0 of 2 convs in integer kernels (none)"


def test_the_nncf_row_is_not_available_without_nncf(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "nncf", None)  # import nncf now raises ImportError
    row = nncf_pipeline({}, (), {}, tmp_path)
    assert row.name == "nncf-ptq" and row.status.startswith("not available: import nncf failed (")


def test_nncf_quantizes_the_export_and_its_row_runs_at_every_batch(small_cnn, tmp_path):
    pytest.importorskip("nncf")
    model, fp32, calibration, timing = small_cnn
    row = nncf_pipeline(fp32, calibration, timing, tmp_path)
    assert row.status == "ok" and set(row.runners) == {1, 4}
    for runner in row.runners.values():
        runner()
    evaluation = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        reference = model(evaluation)
    quality = classifier_quality(reference, row.predict((evaluation,)), None)
    assert quality["sqnr_db"] > 15
    assert "of 2 convs in integer kernels" in row.notes[0] and row.notes[0].startswith("nncf ")


def test_pixels_of_recovers_the_pixels_behind_normalised_images():
    from bench.int8_peers import pixels_of
    from models.images import IMAGENET_NORMALISATION, normalise

    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = normalise(pixels.float() / 255, IMAGENET_NORMALISATION)
    input_format = {"mean": list(IMAGENET_NORMALISATION[0]), "std": list(IMAGENET_NORMALISATION[1])}
    assert torch.equal(pixels_of(images, input_format), pixels)
