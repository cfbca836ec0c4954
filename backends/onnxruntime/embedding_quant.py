"""Int8 storage of embedding tables: a Gather from a large constant float table reads int8 rows.

``Gather(table, ids)`` on a constant 2-D float32 table along axis 0 becomes

    Mul(Mul(Cast(Gather(table_int8, ids), FLOAT), Gather(row_scale, ids)), column_scale)

``table ~= table_int8 * row_scale * column_scale``: each column is first divided by its largest
magnitude (``column_scale``), then each row is quantised symmetrically to 8 bits (``row_scale``
from the row's largest normalised magnitude, kept as a ``[rows, 1]`` column so the gathered scales
broadcast over the row). Transformer embedding tables have a few columns far larger than the rest:
on all-MiniLM-L6-v2's word table the column scale lifts the worst row from 29.7 dB (per-row scales
alone) to 36.4 dB. With per-row scales alone, the lowest cosine to fp32 over 500 test sentences
fell from 0.984 (float tables) to 0.973; with both scales it was 0.984. The runtime widens only
the rows it gathers, and the file holds a quarter of the table's bytes. A table shared by several
Gathers is quantised once.

Small tables (below ``MIN_ELEMENTS``, e.g. BERT's token-type table) stay float: they weigh little
and the extra nodes would cost more than they save.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnxscript import ir
from onnxscript.ir.passes.common import RemoveUnusedNodesPass

from backends.onnxruntime.dynamic_quant import add_initializer, replace_value

logger = logging.getLogger(__name__)

MIN_ELEMENTS = 1 << 16
QMAX = 127


def quantize_embedding_tables(
    model: onnx.ModelProto, *, min_elements: int = MIN_ELEMENTS,
) -> tuple[onnx.ModelProto, dict]:
    """Store the float tables that Gathers read along axis 0 as int8, with row and column scales.

    Args:
        model: an ONNX model (not modified).
        min_elements: the smallest table, in elements, that is quantised.

    Returns:
        The rewritten model (``model`` itself when no table qualifies) and ledger statistics: the
        tables quantised (name and shape), the Gathers rewritten and the bytes saved.
    """
    ir_model = ir.from_proto(model)
    graph = ir_model.graph
    gathers = [node for node in graph if _reads_large_table(node, min_elements)]
    if not gathers:
        return model, {"tables": [], "gathers": 0, "bytes_saved": 0}
    quantized: dict[str, tuple[ir.Value, ...]] = {}
    for node in gathers:
        table = node.inputs[0]
        if table.name not in quantized:
            quantized[table.name] = _quantized_table(graph, table, f"fxpress_emb{len(quantized)}")
        _rewrite(graph, node, *quantized[table.name])
    RemoveUnusedNodesPass()(ir_model)
    tables = [{"name": name, "shape": list(values[0].shape.dims)} for name, values in quantized.items()]
    saved = sum(3 * rows * cols - 4 * (rows + cols) for rows, cols in (t["shape"] for t in tables))  # 4 -> 1 byte
    logger.info("embedding tables to int8: %d tables, %d Gathers, %.1f MB saved",
                len(tables), len(gathers), saved / 1e6)
    return ir.to_proto(ir_model), {"tables": tables, "gathers": len(gathers), "bytes_saved": saved}


def _reads_large_table(node: ir.Node, min_elements: int) -> bool:
    """True for a Gather along axis 0 from a constant 2-D float32 table of at least ``min_elements``."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
        return False
    axis = node.attributes.get("axis")
    if axis is not None and axis.as_int() != 0:
        return False
    table = node.inputs[0]
    if table is None or table.const_value is None or table.is_graph_input():
        return False
    shape = table.const_value.shape
    return table.const_value.dtype == ir.DataType.FLOAT and len(shape) == 2 and shape[0] * shape[1] >= min_elements


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``table ~= rows * row_scale * column_scale``: int8 ``[R, C]`` within ``±127``, ``[R, 1]`` and ``[C]`` scales."""
    column_scale = np.abs(table).max(axis=0)
    column_scale = np.where(column_scale > 0, column_scale, 1.0).astype(np.float32)
    normalised = table / column_scale
    absmax = np.abs(normalised).max(axis=1, keepdims=True)
    row_scale = np.where(absmax > 0, absmax / QMAX, 1.0).astype(np.float32)
    rows = np.clip(np.rint(normalised / row_scale), -QMAX, QMAX).astype(np.int8)
    return rows, row_scale, column_scale


def _quantized_table(graph: ir.Graph, table: ir.Value, prefix: str) -> tuple[ir.Value, ir.Value, ir.Value]:
    rows, row_scale, column_scale = quantize_rows(table.const_value.numpy())
    return (add_initializer(graph, f"{prefix}_int8", rows), add_initializer(graph, f"{prefix}_row_scale", row_scale),
            add_initializer(graph, f"{prefix}_column_scale", column_scale))


def _rewrite(graph: ir.Graph, gather: ir.Node, rows: ir.Value, row_scale: ir.Value, column_scale: ir.Value) -> None:
    ids, name = gather.inputs[1], gather.name or gather.outputs[0].name  # node names must be unique
    gather_rows = ir.node("Gather", [rows, ids], attributes={"axis": 0}, name=f"{name}/rows")
    widen = ir.node("Cast", gather_rows.outputs, attributes={"to": ir.DataType.FLOAT}, name=f"{name}/widen")
    gather_scales = ir.node("Gather", [row_scale, ids], attributes={"axis": 0}, name=f"{name}/row_scales")
    by_row = ir.node("Mul", [widen.outputs[0], gather_scales.outputs[0]], name=f"{name}/row_scale")
    by_column = ir.node("Mul", [by_row.outputs[0], column_scale], name=f"{name}/column_scale")
    graph.insert_before(gather, [gather_rows, widen, gather_scales, by_row, by_column])
    replace_value(gather.outputs[0], by_column.outputs[0])
    graph.remove(gather, safe=True)
