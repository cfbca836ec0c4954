"""``fxpress compile --target trt-int8`` (the calibration cache, ``--calibrator``) and ``fxpress lint`` of it."""

from __future__ import annotations

import json

from click.testing import CliRunner

from backends.tensorrt.calibration_cache import parse_cache
from compiler.cli import main

CACHE_FILES = ("calibration.cache", "calibration.json", "model.implicit.onnx")


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def _calibrate_stats(directory) -> dict:
    report = json.loads((directory / "report.json").read_text())
    (entry,) = [entry for entry in report["passes"] if entry["name"] == "calibrate"]
    return entry["stats"]


def test_compile_writes_the_cache_files_and_the_model_lints_clean(tmp_path):
    out = tmp_path / "out"
    result = run("compile", "digits-cnn", "--target", "trt-int8", "--calibration-samples", "64", "-o", str(out))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    for name in CACHE_FILES:
        assert (out / name).is_file() and name in manifest["files"], name
    header, scales = parse_cache((out / "calibration.cache").read_text())
    assert header == "TRT-101600-EntropyCalibration2" and scales
    assert set(json.loads((out / "calibration.json").read_text())) == set(scales)
    stats = _calibrate_stats(out)
    assert stats["samples"] == 64 and stats["observers"] == {"mse": stats["tensors"]}

    linted = run("lint", str(out / "model.onnx"), "--rules", "tensorrt", "--json")
    assert linted.exit_code == 0, linted.output
    report = json.loads(linted.stdout)
    assert (report["count"], report["findings"], report["rules"]) == (0, [], "tensorrt")
    implicit = run("lint", str(out / "model.implicit.onnx"))
    assert implicit.exit_code == 0 and implicit.stdout.splitlines() == ["0 finding(s)"]


def test_calibrator_max_is_recorded(tmp_path):
    out = tmp_path / "out"
    result = run("compile", "digits-cnn", "--target", "trt-int8", "--calibrator", "max", "--calibration-samples", "64",
                 "-o", str(out))
    assert result.exit_code == 0, result.output
    stats = _calibrate_stats(out)
    assert stats["observers"] == {"minmax": stats["tensors"]} and stats["tensors"] > 0
    report = json.loads((out / "report.json").read_text())
    (entry,) = [entry for entry in report["passes"] if entry["name"] == "calibrate"]
    assert entry["options"]["observer"] == "minmax"
    assert run("lint", str(out / "model.onnx"), "--json").exit_code == 0


def test_a_calibrator_for_a_target_that_does_not_calibrate_exits_2(tmp_path):
    out = tmp_path / "out"
    result = run("compile", "digits-cnn", "--target", "cpu-fp32", "--calibrator", "max", "-o", str(out))
    assert result.exit_code == 2, result.output
    assert "does not calibrate" in result.stderr
    assert not out.exists()


def test_an_unknown_calibrator_exits_2(tmp_path):
    result = run("compile", "digits-cnn", "--target", "trt-int8", "--calibrator", "kl", "-o", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "kl" in result.output and not (tmp_path / "out").exists()
