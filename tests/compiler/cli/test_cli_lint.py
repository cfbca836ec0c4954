"""``fxpress lint``: one line per finding and a count, JSON, exit 0 clean, 6 with findings, 7 unreadable."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from compiler.cli import main


def write_model(path, activation_quantized: bool) -> str:
    """x -> [Q/DQ] -> Conv(DQ(int8 weight)): half-quantised (TRT005) without the activation's Q/DQ."""
    constants = {"s": np.float32(0.1), "zp": np.int8(0), "w": np.ones((4, 4, 1, 1), np.int8),
                 "ws": np.full(4, 0.01, np.float32), "wzp": np.zeros(4, np.int8)}
    nodes = [helper.make_node("DequantizeLinear", ["w", "ws", "wzp"], ["dq_w"], name="dq_w", axis=0)]
    source = "x"
    if activation_quantized:
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q_x"], name="q_x"),
                  helper.make_node("DequantizeLinear", ["q_x", "s", "zp"], ["dq_x"], name="dq_x")]
        source = "dq_x"
    conv = helper.make_node("Conv", [source, "dq_w"], ["y"], name="conv")
    conv.metadata_props.add(key="fxpress.module_path", value="features.0")
    graph = helper.make_graph(nodes + [conv], "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                        [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [numpy_helper.from_array(value, name) for name, value in constants.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def run(*args: str):
    return CliRunner().invoke(main, ["lint", *args])


def test_a_clean_model_exits_0(tmp_path):
    result = run(write_model(tmp_path / "m.onnx", activation_quantized=True))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["0 finding(s)"]


def test_findings_print_one_line_each_and_exit_6(tmp_path):
    result = run(write_model(tmp_path / "m.onnx", activation_quantized=False), "--rules", "tensorrt")
    assert result.exit_code == 6, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("TRT005 weighted-op-half-quantized conv [features.0]: its weight is quantised")
    assert lines[1:] == ["1 finding(s)"]


def test_json_output(tmp_path):
    path = write_model(tmp_path / "m.onnx", activation_quantized=False)
    result = run(path, "--json")
    assert result.exit_code == 6, result.output
    report = json.loads(result.stdout)
    assert (report["model"], report["rules"], report["count"]) == (path, "tensorrt", 1)
    assert {key: report["findings"][0][key] for key in ("rule", "name", "node", "module_path")} == {
        "rule": "TRT005", "name": "weighted-op-half-quantized", "node": "conv", "module_path": "features.0"}


@pytest.mark.parametrize("content", [None, b"not an onnx model"])
def test_a_missing_or_unreadable_file_exits_7(tmp_path, content):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    result = run(str(path))
    assert result.exit_code == 7, result.output
    assert result.stderr.startswith("fxpress: error: ") and str(path) in result.stderr


def test_only_known_rule_sets_are_accepted(tmp_path):
    result = run(write_model(tmp_path / "m.onnx", activation_quantized=True), "--rules", "openvino")
    assert result.exit_code == 2


def test_help_lists_the_rules_and_unwrapped_examples():
    result = run("--help")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[lines.index("  Examples:") + 1].startswith("    fxpress lint")
    assert any(line.split()[:2] == ["TRT010", "concat-scales:"] for line in lines)
