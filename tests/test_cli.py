"""The fxpress command: compile and inspect, JSON output, exit codes of typed errors."""

from __future__ import annotations

import json
import textwrap

from click.testing import CliRunner

from compiler.cli import main


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_compile_zoo_model_writes_artifact_and_prints_ledger(tmp_path):
    result = _run("compile", "mlp", "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "eliminate_dead_code" in result.output
    assert (tmp_path / "out" / "model.onnx").stat().st_size > 1_000_000


def test_compile_json_output_is_machine_readable(tmp_path):
    result = _run("compile", "lenet", "-o", str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert [entry["name"] for entry in payload["report"]["passes"]][:2] == ["remove_noops", "fold_constants"]


def test_inspect_prints_every_pass():
    result = _run("inspect", "lenet")
    assert result.exit_code == 0, result.output
    for name in ("remove_noops", "fold_constants", "fold_conv_bn", "mark_activation_fusion"):
        assert name in result.output


def test_unknown_target_exits_2_and_lists_targets(tmp_path):
    result = _run("compile", "mlp", "--target", "gpu-int3", "-o", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "cpu-fp32" in result.output and "gpu-int3" in result.output
    assert not (tmp_path / "out").exists()


def test_unknown_model_exits_2_and_lists_zoo(tmp_path):
    result = _run("inspect", "no-such-model")
    assert result.exit_code == 2
    assert "efficientnet-lite0" in result.output


def test_existing_output_refused_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    result = _run("compile", "mlp", "-o", str(out))
    assert result.exit_code == 7
    assert "--force" in result.output
    assert (out / "keep.txt").read_text() == "old"


def test_factory_file_and_capture_error_exit_code(tmp_path):
    source = tmp_path / "user_model.py"
    source.write_text(textwrap.dedent("""
        import torch

        class Gate(torch.nn.Module):
            def forward(self, x):
                if x.sum() > 0:
                    return x * 2
                return x

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.gate = Gate()

            def forward(self, x):
                return self.gate(x)

        def good():
            return torch.nn.Sequential(torch.nn.Linear(4, 3)).eval(), torch.randn(1, 4)

        def bad():
            return Net().eval(), (torch.randn(2, 4),)
    """))
    good = _run("compile", f"{source}:good", "-o", str(tmp_path / "good"))
    assert good.exit_code == 0, good.output
    bad = _run("compile", f"{source}:bad", "-o", str(tmp_path / "bad"))
    assert bad.exit_code == 3, bad.output
    assert "'gate'" in bad.output and "user_model.py:" in bad.output
    assert not (tmp_path / "bad").exists()
