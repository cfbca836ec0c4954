"""The README's examples run, and its two fresh-machine commands are the ones CI runs."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from compiler.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _readme_command(which: str) -> str:
    return subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "readme_command.py"), which],
        check=True, capture_output=True, text=True,
    ).stdout.strip()


def test_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"<!-- example -->\s*```python\n(.+?)```", README, flags=re.S)
    assert blocks, "README has no marked Python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102
    assert (tmp_path / "digits-artifact" / "model.onnx").is_file()


def test_ci_runs_the_readme_test_command():
    command = _readme_command("test")
    assert "pytest" in command and "torch==2.13.0" in command
    assert "readme_command.py test" in (ROOT / ".ci" / "run").read_text()


def test_readme_run_command_works(tmp_path, monkeypatch):
    command = _readme_command("run")
    install, _, run = command.partition(" && ")
    assert install.startswith("pip install") and run.startswith("fxpress compile")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, shlex.split(run)[1:])
    assert result.exit_code == 0, result.output
    assert "fold_conv_bn" in result.output
    output_dir = shlex.split(run)[shlex.split(run).index("-o") + 1]
    assert sorted(p.name for p in (tmp_path / output_dir).iterdir()) == [
        "manifest.json", "model.onnx", "report.html", "report.json", "report.txt",
    ]
