"""Constant folding: evaluate parameter-only subgraphs once, at compile time.

Each subgraph that reads only parameters and constants is replaced by a single tensor. Correct
because a deterministic pure function of constants has one value for every input; random and
impure operators are never folded. A fold that would grow the stored tensors more than
``max_growth`` times (an ``expand`` of a weight, say) is refused, since it trades a cheap op for
model size.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from compiler import ir, meta
from compiler.pass_base import Pass, PassContext, PassResult


class FoldConstants(Pass):
    """Replace parameter-only subgraphs by their precomputed values."""

    name = "fold_constants"
    default_options = {"max_growth": 1.0}

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Evaluate constant nodes and replace the frontier (constants with non-constant users)."""
        values = _constant_values(gm)
        refused: Counter = Counter()
        folded = 0
        for node in [n for n in gm.graph.nodes if n.op == "call_function" and n in values]:
            reason = self.check(node, values)
            if reason is None:
                _replace_with_constant(gm, node, values[node])
                folded += 1
            elif reason != "not a frontier":
                refused[reason] += 1
        erased = ir.erase_unused(gm, [n for n in values if n.graph is gm.graph]) if folded else 0
        gm.recompile()
        stats = {"folded": folded, "nodes_erased": erased, "refused": dict(refused)}
        return PassResult(gm, folded > 0, stats)

    def check(self, node: fx.Node, values: dict[fx.Node, torch.Tensor]) -> str | None:
        """Why ``node`` is not folded, or None to fold it."""
        if all(user in values for user in node.users):
            return "not a frontier"
        value = values[node]
        if not isinstance(value, torch.Tensor):
            return "not a tensor"
        source_elements = sum(
            values[leaf].numel()
            for leaf in _constant_leaves(node, values)
            if isinstance(values[leaf], torch.Tensor)
        )
        if value.numel() > max(self.options["max_growth"] * source_elements, 1024):
            return "would grow stored tensors"
        return None


def _constant_values(gm: fx.GraphModule) -> dict[fx.Node, object]:
    """Values of every node that depends only on get_attr nodes and literals."""
    values: dict[fx.Node, object] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            values[node] = ir.get_attribute(gm, node.target)
        elif node.op == "call_function" and _foldable(node, values):
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
            with torch.no_grad():
                values[node] = node.target(*args, **kwargs)
    return values


def _foldable(node: fx.Node, values: dict[fx.Node, object]) -> bool:
    if node.is_impure() or not all(n in values for n in node.all_input_nodes):
        return False
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded not in tags


def _constant_leaves(node: fx.Node, values: dict) -> set[fx.Node]:
    leaves, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current.op == "get_attr":
            leaves.add(current)
        stack.extend(n for n in current.all_input_nodes if n in values)
    return leaves


def _replace_with_constant(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor) -> None:
    path = ir.module_path(node)
    base = f"{path}._folded_{node.name}" if path else f"_folded_{node.name}"
    constant = ir.add_get_attr(gm, base, value.detach().clone().contiguous(), before=node)
    constant.meta[meta.MODULE_PATH] = path
    node.replace_all_uses_with(constant)
