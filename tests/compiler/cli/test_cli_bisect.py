"""``fxpress bisect RECIPE``: a planted fault is named with its patch, and the patched recipe passes ``fxpress run``."""

from __future__ import annotations

import json
import tomllib

from click.testing import CliRunner

from compiler.cli import main

PLANTED = """\
gates = ["top1_agreement >= 0.97"]

[model]
source = "digits-cnn"

[compile]
target = "cpu-int8"
threads = 1

[passes.calibrate]
ranges = { conv1 = [0.0, 0.01] }   # the planted fault: conv1's output clipped to [0, 0.01]

[data.calibration]
zoo = true
samples = 128

[data.evaluation]
zoo = true
samples = 200

[bench]
runs = 3
"""


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_bisect_names_the_planted_layer_and_its_patch_makes_the_run_pass(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(PLANTED)
    assert run("run", str(recipe), "-o", str(tmp_path / "out")).exit_code == 6  # the fault fails the gate
    patched = tmp_path / "patched.toml"
    result = run("bisect", str(recipe), "--json", "--write-patched", str(patched))
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    assert report["guilty_pass"] == "insert_qdq" and report["layers"] == ["conv1"]
    assert report["patch"] == {"compile": {"float_modules": ["conv1"]}} and report["patched"]["passed"]
    written = tomllib.loads(patched.read_text())
    assert written["compile"]["float_modules"] == ["conv1"] and written["passes"]["calibrate"]["ranges"]
    assert run("run", str(patched), "-o", str(tmp_path / "out")).exit_code == 0


def test_bisect_prints_the_pass_table_the_layer_and_the_patch(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(PLANTED)
    result = run("bisect", str(recipe), "--no-verify")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "insert_qdq" in text and "conv1" in text and 'float_modules = ["conv1"]' in text
    assert "patched compile" not in text


def test_bisect_without_a_quality_gate_exits_2(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(PLANTED.replace('gates = ["top1_agreement >= 0.97"]', 'gates = ["latency_ratio <= 1.0"]'))
    result = run("bisect", str(recipe))
    assert result.exit_code == 2 and "gate" in result.stderr
