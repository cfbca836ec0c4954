"""Graph rewrites that let ONNX Runtime's CPU provider use its fused kernels.

The exporter writes erf-GELU as ``x * (0.5 * (erf(x / sqrt 2) + 1))``. ONNX Runtime's own
``GeluFusion`` only matches the two other orderings of that product, so on the CPU the GELU of a
BERT layer runs as five elementwise kernels. onnxscript's ``fuse_erfgelu`` rule set matches this
ordering too and writes one ``com.microsoft.Gelu`` node, the kernel ONNX Runtime would have fused
to. The rewrite is exact: the fused kernel computes the same erf formula.
"""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter.ort_fusions.erfgelu import fuse_erfgelu

from backends.onnx.export import MODULE_PATH_KEY

logger = logging.getLogger(__name__)


def fuse_gelu(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace every erf-GELU subgraph by ``com.microsoft.Gelu``; returns the model and the count.

    A fused node keeps the module path of the subgraph it replaced (that of its input's reader).
    """
    graph = ir.serde.deserialize_model(model)
    count = fuse_erfgelu(graph)
    if not count:
        return model, 0
    _inherit_module_paths(graph)
    RemoveUnusedNodesPass()(graph)  # the replaced subgraphs' constants
    fused = ir.serde.serialize_model(graph)
    logger.debug("fused %d erf-GELU subgraph(s) into com.microsoft.Gelu", count)
    return fused, count


def _inherit_module_paths(model: ir.Model) -> None:
    """Name the nodes the rewrite created like the exporter's: module path, then the node's name.

    The rewriter copies the replaced nodes' metadata; a node without a path takes that of the
    node producing its input.
    """
    for node in model.graph:
        path = node.metadata_props.get(MODULE_PATH_KEY)
        if path is None:
            source = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
            path = source.metadata_props.get(MODULE_PATH_KEY, "") if source is not None else ""
            node.metadata_props[MODULE_PATH_KEY] = path
        prefix = f"{path or 'root'}/"
        if not (node.name or "").startswith(prefix):
            node.name = prefix + (node.name or node.op_type)
