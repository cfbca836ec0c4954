"""Int8 embedding tables (backends.onnxruntime.embedding_quant): which Gathers change, what ONNX Runtime computes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from backends.onnxruntime.embedding_quant import quantize_embedding_tables, quantize_rows

ROWS, COLS = 1000, 96


def _tables() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    # Rows of very different size: a per-tensor scale would lose the small ones, per-row keeps them.
    words = (rng.standard_normal((ROWS, COLS)) * rng.uniform(0.01, 1.0, (ROWS, 1))).astype(np.float32)
    return {"words": words, "types": rng.standard_normal((2, COLS)).astype(np.float32)}


def _model(axis1_table: bool = False) -> onnx.ModelProto:
    """y = words[ids] + words[ids2] + types[kinds]: one table read twice, one small table."""
    tables = _tables()
    nodes = [
        helper.make_node("Gather", ["words", "ids"], ["w1"]),
        helper.make_node("Gather", ["words", "ids2"], ["w2"], axis=0),
        helper.make_node("Gather", ["types", "kinds"], ["t"]),
        helper.make_node("Add", ["w1", "w2"], ["s"]),
        helper.make_node("Add", ["s", "t"], ["y"]),
    ]
    if axis1_table:
        nodes[1] = helper.make_node("Gather", ["words", "cols"], ["w2"], axis=1)
    inputs = [helper.make_tensor_value_info(name, onnx.TensorProto.INT64, ["batch", 5])
              for name in ("ids", "cols" if axis1_table else "ids2", "kinds")]
    output = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    initializers = [numpy_helper.from_array(array, name) for name, array in tables.items()]
    graph = helper.make_graph(nodes, "embeddings", inputs, [output], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"ids": rng.integers(0, ROWS, (3, 5)), "ids2": rng.integers(0, ROWS, (3, 5)),
            "kinds": rng.integers(0, 2, (3, 5))}


def test_a_large_table_read_twice_is_stored_once_as_int8_and_the_small_one_stays_float():
    quantized, stats = quantize_embedding_tables(_model())
    initializers = {init.name: init for init in quantized.graph.initializer}
    int8 = [init for init in initializers.values() if init.data_type == onnx.TensorProto.INT8]
    assert [list(init.dims) for init in int8] == [[ROWS, COLS]]
    assert "words" not in initializers and "types" in initializers
    assert Counter(node.op_type for node in quantized.graph.node) == {"Gather": 5, "Cast": 2, "Mul": 4, "Add": 2}
    assert stats["gathers"] == 2 and stats["tables"] == [{"name": "words", "shape": [ROWS, COLS]}]
    assert stats["bytes_saved"] == 3 * ROWS * COLS - 4 * (ROWS + COLS)
    assert quantized.ByteSize() < 0.3 * _model().ByteSize()


def test_onnx_runtime_computes_the_per_row_dequantised_table():
    feeds = _feeds()
    expected = _run(_model(), feeds)
    actual = _run(quantize_embedding_tables(_model())[0], feeds)
    rows, row_scale, column_scale = quantize_rows(_tables()["words"])
    dequantized = rows.astype(np.float32) * row_scale * column_scale
    types = _tables()["types"]
    exact = dequantized[feeds["ids"]] + dequantized[feeds["ids2"]] + types[feeds["kinds"]]
    np.testing.assert_allclose(actual, exact, rtol=1e-6, atol=1e-6)
    # each gathered element errs by at most half its own step
    step = (row_scale[feeds["ids"]] + row_scale[feeds["ids2"]]) / 2 * column_scale
    assert np.all(np.abs(actual - expected) <= step + 1e-6)


def test_row_and_column_scales_keep_small_rows_and_rows_with_an_outlier_column_precise():
    table = _tables()["words"]
    table[:, 7] *= 20.0  # one column far larger than the rest, as in transformer embedding tables
    rows, row_scale, column_scale = quantize_rows(table)
    error = np.abs(rows * row_scale * column_scale - table)
    assert np.all(error <= row_scale * column_scale / 2 + 1e-7)
    assert np.abs(rows).max() == 127 and rows.dtype == np.int8

    others = np.arange(COLS) != 7
    per_row = np.abs(table).max(axis=1, keepdims=True) / 127
    per_row_error = np.abs(np.rint(table / per_row) * per_row - table)
    # the ordinary columns keep their own precision instead of one set by the outlier column
    assert error[:, others].max() * 5 < per_row_error[:, others].max()


def test_gathers_along_another_axis_and_models_without_tables_are_left_alone():
    model = _model(axis1_table=True)
    quantized, stats = quantize_embedding_tables(model)
    assert stats["gathers"] == 1  # only the axis-0 read; the table stays float for the axis-1 read
    assert "words" in {init.name for init in quantized.graph.initializer}
    unchanged, stats = quantize_embedding_tables(_model(), min_elements=ROWS * COLS + 1)
    assert unchanged.SerializeToString() == _model().SerializeToString() and stats["gathers"] == 0
