"""Reproducibility: two compiles in separate processes give byte-identical artifacts.

The processes differ in everything that must not matter: ``PYTHONHASHSEED`` (set and dict
iteration order, hence any name or order that leaks from a hash), the working directory and the
output path (which must not leak into the files). Only the reports (``report.json``, ``report.txt``,
``report.html``) may differ: they hold timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from compiler import load

COMPARED = ("model.onnx", "manifest.json")


def _start(model: str, output: Path, hash_seed: str) -> subprocess.Popen:
    output.parent.mkdir(parents=True)
    environment = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.Popen(
        [sys.executable, "-m", "compiler.cli", "compile", model, "-o", str(output)],
        cwd=output.parent, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _compile_twice(model: str, tmp_path: Path) -> tuple[Path, Path]:
    """Compile ``model`` in two concurrent processes with different hash seeds, cwd and output path."""
    first, second = tmp_path / "a" / "first-artifact", tmp_path / "deeper" / "b" / "second"
    processes = [_start(model, first, "0"), _start(model, second, "12345")]
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    return first, second


@pytest.mark.parametrize(("model", "min_nodes"), [("mlp", 3), ("lenet", 8)])
def test_compiles_in_separate_processes_give_identical_bytes(model, min_nodes, tmp_path):
    first, second = _compile_twice(model, tmp_path)
    for name in COMPARED:
        assert (first / name).read_bytes() == (second / name).read_bytes(), f"{name} differs between processes"
    # The comparison is of real artifacts: a graph with the model's layers, a manifest naming the model.
    assert len(onnx.load(str(first / "model.onnx")).graph.node) >= min_nodes
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["model"] == model and set(manifest["files"]) == {"model.onnx"}
    for directory in (first, second):
        assert str(directory) not in (directory / "manifest.json").read_text()
        assert str(directory.parent).encode() not in (directory / "model.onnx").read_bytes()
    assert load(first).manifest == load(second).manifest
