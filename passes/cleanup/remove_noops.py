"""No-op removal: bypass every node whose output equals its input.

The no-ops: dropout at inference, identities (alias, detach, clone, contiguous, same-dtype casts),
reshapes and expands to the shape the tensor already has, slices that keep everything, arithmetic
by 1 or 0, and permute/transpose pairs that cancel.

Correct because each removed node returns a tensor equal to its input (same shape, dtype and
values); shapes are compared symbolically, so a reshape is removed only when it is a no-op for
every batch size.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from compiler import meta
from compiler.pass_base import Pass, PassContext, PassResult

aten = torch.ops.aten

_IDENTITIES = {
    aten.alias.default, aten.detach.default, aten.clone.default, aten.contiguous.default,
    aten.lift_fresh_copy.default,
}
_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default}
_CASTS = {
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
    aten.type_as.default,
}
_RESHAPES = {aten.reshape.default, aten.view.default, aten.expand.default, aten.flatten.using_ints,
             aten._unsafe_view.default}
_NEUTRAL_SCALARS = {
    aten.mul.Tensor: 1, aten.mul.Scalar: 1, aten.div.Tensor: 1, aten.div.Scalar: 1,
    aten.add.Tensor: 0, aten.add.Scalar: 0, aten.sub.Tensor: 0, aten.sub.Scalar: 0,
}


class RemoveNoops(Pass):
    """Bypass nodes whose output equals their input."""

    name = "remove_noops"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Replace every no-op's uses by its input, then erase it."""
        removed: Counter = Counter()
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or getattr(node, "_erased", False):
                continue
            replacement, kind = noop_input(node)
            if replacement is None:
                continue
            node.replace_all_uses_with(replacement)
            _erase_chain(gm, node)
            removed[kind] += 1
        gm.recompile()
        stats = {"removed": sum(removed.values()), **dict(sorted(removed.items()))}
        return PassResult(gm, bool(removed), stats)


def noop_input(node: fx.Node) -> tuple[fx.Node | None, str]:
    """(the node that ``node`` merely forwards, a kind label), or (None, reason) if not a no-op."""
    target, args = node.target, node.args
    if target in _DROPOUTS:
        training = args[2] if len(args) > 2 else node.kwargs.get("train", False)
        if training is False or args[1] == 0:
            return args[0], "dropout"
        return None, "training dropout"
    if target in _IDENTITIES and not node.kwargs.get("memory_format"):
        return args[0], "identity"
    if target in _CASTS or target in _RESHAPES:
        if _same_tensor_type(args[0], node):
            return args[0], _kind(target)
        return None, "changes shape or type"
    if target == aten.slice.Tensor:
        return (args[0], "slice") if _full_slice(node) else (None, "partial slice")
    neutral = _NEUTRAL_SCALARS.get(target)
    if neutral is not None and len(args) == 2 and _is_number(args[1], neutral):
        if _same_tensor_type(args[0], node):
            return args[0], "neutral arithmetic"
        return None, "changes type"
    if target in (aten.permute.default, aten.transpose.int):
        return _cancelling_pair(node)
    return None, "not a no-op"


def _kind(target) -> str:
    return "cast" if target in _CASTS else "reshape"


def _val(node: object):
    return node.meta.get(meta.VAL) if isinstance(node, fx.Node) else None


def _same_tensor_type(source: object, node: fx.Node) -> bool:
    before, after = _val(source), _val(node)
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        return False
    return (
        before.dtype == after.dtype
        and before.device == after.device
        and [str(size) for size in before.shape] == [str(size) for size in after.shape]
    )


def _full_slice(node: fx.Node) -> bool:
    args = list(node.args) + [None] * (5 - len(node.args))
    _, dim, start, end, step = args[:5]
    return start in (None, 0) and step in (None, 1) and _same_tensor_type(node.args[0], node)


def _is_number(value: object, expected: int) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == expected


def _cancelling_pair(node: fx.Node) -> tuple[fx.Node | None, str]:
    source = node.args[0]
    if not isinstance(source, fx.Node) or source.target != node.target:
        return None, "no pair"
    rank = _val(node).dim() if isinstance(_val(node), torch.Tensor) else None
    if rank is None:
        return None, "unknown rank"
    if _as_permutation(source, rank) is None or _as_permutation(node, rank) is None:
        return None, "unknown permutation"
    first, second = _as_permutation(source, rank), _as_permutation(node, rank)
    composed = [first[index] for index in second]
    if composed != list(range(rank)):
        return None, "not inverse"
    return source.args[0], "permute pair"


def _as_permutation(node: fx.Node, rank: int) -> list[int] | None:
    if node.target == aten.permute.default:
        return [dim % rank for dim in node.args[1]]
    dim0, dim1 = (dim % rank for dim in node.args[1:3])
    order = list(range(rank))
    order[dim0], order[dim1] = order[dim1], order[dim0]
    return order


def _erase_chain(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase ``node`` and those of its inputs the removal left without users (a first permute)."""
    inputs = [n for n in node.all_input_nodes if n.op == "call_function"]
    gm.graph.erase_node(node)
    for input_node in inputs:
        if not input_node.users and not input_node.is_impure():
            gm.graph.erase_node(input_node)
