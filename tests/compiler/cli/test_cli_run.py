"""``fxpress run RECIPE``: the examples run on the zoo's data; gates decide what is written; bad recipes exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from compiler.cli import main
from compiler.recipe import load_recipe

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def _digits_recipe(tmp_path: Path, gates: str = '["top1_agreement >= 0.9"]', extra: str = "") -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(f'gates = {gates}\n[model]\nsource = "digits-cnn"\n[compile]\ntarget = "cpu-int8"\n'
                    f'[data.calibration]\nzoo = true\nsamples = 64\n[data.evaluation]\nzoo = true\nsamples = 64\n'
                    f'[bench]\nruns = 3\nwarmup = 1\n{extra}')
    return path


@pytest.mark.parametrize("example", sorted(path.name for path in EXAMPLES.glob("*.toml")))
def test_every_example_recipe_runs_and_passes_its_gates(tmp_path, example):
    out = tmp_path / "out"
    result = run("run", str(EXAMPLES / example), "-o", str(out), "--json")
    assert result.exit_code == 0, result.output + result.stderr
    summary = json.loads(result.stdout)
    recipe = load_recipe(EXAMPLES / example)
    assert summary["passed"] and [gate["gate"] for gate in summary["gates"]] == [str(g) for g in recipe.gates]
    assert all(gate["passed"] and gate["value"] is not None for gate in summary["gates"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["sha256"] == recipe.sha256 and manifest["recipe"]["text"] == recipe.text
    assert json.loads((out / "report.json").read_text())["gates"] == summary["gates"]


def test_a_failed_gate_exits_6_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    result = run("run", str(_digits_recipe(tmp_path, '["sqnr_db >= 200"]')), "-o", str(out), "--json")
    assert result.exit_code == 6, result.output
    summary = json.loads(result.stdout)
    assert not summary["passed"] and summary["artifact"] is None
    assert summary["gates"][0]["gate"] == "sqnr_db >= 200" and summary["gates"][0]["value"] < 200
    assert "gate(s) failed: sqnr_db >= 200; nothing written" in result.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "recipe.toml"]


def test_keep_failed_writes_the_artifact_under_a_failed_name(tmp_path):
    out = tmp_path / "out"
    result = run("run", str(_digits_recipe(tmp_path)), "-o", str(out), "--gate", "sqnr_db >= 200", "--keep-failed")
    assert result.exit_code == 6
    kept = tmp_path / "out.failed"
    assert not out.exists() and (kept / "manifest.json").is_file()
    gates = json.loads((kept / "report.json").read_text())["gates"]
    assert [(gate["gate"], gate["passed"]) for gate in gates] == [("top1_agreement >= 0.9", True),
                                                                  ("sqnr_db >= 200", False)]


def test_a_latency_gate_is_measured_side_by_side_against_its_baseline(tmp_path):
    out = tmp_path / "out"
    recipe = _digits_recipe(tmp_path, '["latency_ratio <= 1000000 vs eager", "latency_ratio <= 1000000 vs fp32"]')
    result = run("run", str(recipe), "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {"fxpress@1", "eager@1", "fp32@1"} == set(summary["latency_p50_ms"])
    values = {gate["gate"]: gate["value"] for gate in summary["gates"]}
    medians = summary["latency_p50_ms"]
    assert values["latency_ratio <= 1e+06 vs eager"] == pytest.approx(medians["fxpress@1"] / medians["eager@1"])
    assert values["latency_ratio <= 1e+06 vs fp32"] == pytest.approx(medians["fxpress@1"] / medians["fp32@1"])


def test_the_output_directory_may_come_from_the_recipe(tmp_path):
    recipe = _digits_recipe(tmp_path, extra='[output]\ndirectory = "from-recipe"\n')
    assert run("run", str(recipe)).exit_code == 0
    assert (tmp_path / "from-recipe" / "model.onnx").is_file()


def test_a_user_model_with_its_own_array_data(tmp_path):
    import numpy as np

    (tmp_path / "model.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n    torch.manual_seed(0)\n"
        "    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 4))\n"
        "    return model.eval(), (torch.randn(1, 3, 8, 8),)\n")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.standard_normal((32, 3, 8, 8)).astype(np.float32))
    np.save(tmp_path / "eval.npy", rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    (tmp_path / "recipe.toml").write_text(
        'gates = ["cosine_mean >= 0.9"]\n[model]\nsource = "model.py:build"\n[compile]\ntarget = "cpu-int8"\n'
        '[data.calibration]\nnpy = "calib.npy"\n[data.evaluation]\nnpy = "eval.npy"\n[bench]\nruns = 3\n')
    result = run("run", str(tmp_path / "recipe.toml"), "-o", str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(result.stdout)["metrics"]["samples"] == 16


def test_a_user_model_without_evaluation_data_cannot_be_gated(tmp_path):
    (tmp_path / "model.py").write_text(
        "import torch\ndef build():\n    return torch.nn.Linear(4, 2).eval(), (torch.randn(1, 4),)\n")
    (tmp_path / "recipe.toml").write_text('gates = ["cosine_mean >= 0.9"]\n[model]\nsource = "model.py:build"\n')
    result = run("run", str(tmp_path / "recipe.toml"), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "recipe key data.evaluation: gates are measured on evaluation data" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("body", "message"), [
    ('[model]\nsource = "digits-cnn"\n[compile]\ntargte = "cpu-int8"\n', "did you mean 'compile.target'?"),
    ('[model]\nsource = "nosuch"\n', "unknown model 'nosuch'"),
    ('gates = ["top1 >= 1"]\n[model]\nsource = "digits-cnn"\n', "unknown metric 'top1'"),
    ('[model\n', "is not valid TOML"),
    ('[model]\nsource = "digits-cnn"\n[data.evaluation]\nnpy = "gone.npy"\n', "gone.npy does not exist"),
])
def test_a_bad_recipe_exits_2_with_one_line_and_writes_nothing(tmp_path, body, message):
    (tmp_path / "recipe.toml").write_text(body)
    result = run("run", str(tmp_path / "recipe.toml"), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2 and message in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def test_a_bad_command_line_gate_exits_2(tmp_path):
    result = run("run", str(_digits_recipe(tmp_path)), "-o", str(tmp_path / "out"), "--gate", "cosine >= 0.9")
    assert result.exit_code == 2 and "unknown metric 'cosine' (did you mean 'cosine_min'?)" in result.stderr
