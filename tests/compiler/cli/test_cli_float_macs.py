"""``fxpress compile --float-macs``: cpu-int8 keeps no float layer unless asked, and says so in the report."""

from __future__ import annotations

import json

from click.testing import CliRunner

from compiler.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def _passes(directory) -> dict[str, dict]:
    report = json.loads((directory / "report.json").read_text())
    return {entry["name"]: entry for entry in report["passes"]}


def test_the_default_reconstructs_and_keeps_no_layer_float(tmp_path):
    out = tmp_path / "out"
    result = run("compile", "digits-cnn", "--target", "cpu-int8", "--calibration-samples", "64", "-o", str(out))
    assert result.exit_code == 0, result.output
    passes = _passes(out)
    assert "quant_sensitivity" not in passes
    layers = passes["reconstruct"]["stats"]["layers"]
    assert layers and all(row["module_path"] and row["chosen"] for row in layers)


def test_float_macs_runs_the_sensitivity_fallback_with_that_budget(tmp_path):
    out = tmp_path / "out"
    result = run("compile", "digits-cnn", "--target", "cpu-int8", "--float-macs", "0.5", "--calibration-samples", "64",
                 "-o", str(out))
    assert result.exit_code == 0, result.output
    passes = _passes(out)
    assert passes["quant_sensitivity"]["options"]["max_float_macs"] == 0.5
    assert "reconstruct" in passes


def test_float_macs_for_a_target_that_does_not_quantise_exits_2(tmp_path):
    out = tmp_path / "out"
    result = run("compile", "digits-cnn", "--target", "cpu-fp32", "--float-macs", "0.1", "-o", str(out))
    assert result.exit_code == 2, result.output
    assert "float fallback" in result.stderr and not out.exists()


def test_a_float_share_outside_0_1_exits_2(tmp_path):
    result = run("compile", "digits-cnn", "--target", "cpu-int8", "--float-macs", "1.5", "-o", str(tmp_path / "out"))
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
