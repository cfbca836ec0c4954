"""Dead-code elimination: erase nodes whose results nobody uses, and the tensors only they read.

Correct because a pure node's only effect is its result; impure nodes (asserts, in-place ops) are
kept, as ``torch.fx.Graph.eliminate_dead_code`` decides.
"""

from __future__ import annotations

import torch.fx as fx

from compiler import ir
from compiler.errors import PassError
from compiler.pass_base import Pass, PassContext, PassResult


class EliminateDeadCode(Pass):
    """Erase unused nodes and drop parameters and buffers no node reads any more."""

    name = "eliminate_dead_code"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Run fx's dead-code elimination, then drop orphaned tensors."""
        nodes_before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        elements = ir.drop_unused_attributes(gm)
        removed = nodes_before - len(gm.graph.nodes)
        gm.recompile()
        stats = {"nodes_removed": removed, "tensor_elements_dropped": elements}
        return PassResult(gm, removed > 0 or elements > 0, stats)

    def ensures(self, gm: fx.GraphModule) -> None:
        """No pure node is left without users."""
        for node in gm.graph.nodes:
            if node.op in ("call_function", "get_attr") and not node.users and not node.is_impure():
                raise PassError(f"dead node left behind: {ir.describe(node)}")
