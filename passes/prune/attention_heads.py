"""Attention heads as channel groups: whole heads (``unit`` = ``head_dim`` features each) cut together.

The group is recognised structurally, around each attention core (an
``aten.scaled_dot_product_attention``, or ``matmul -> scale/mask -> softmax -> matmul``): the Q, K and
V operands must each be a Linear's output split by a view/reshape into ``(..., heads, head_dim)`` and
moved by transposes/permutes to ``(..., heads, L, head_dim)`` (K to ``(..., heads, head_dim, L)`` for
the matmul form); the core's output must come back the same way, merged into ``heads * head_dim``
features read by one Linear, the output projection. Every node in between must be read only by the
next one (shape readers aside), and a mask or bias added to the scores must broadcast over the
heads. The group then holds the three Linears as ``out`` members (``per_channel`` = ``head_dim``
rows per head: head h is rows h*d..(h+1)*d), the output projection as an ``in`` member
(``per_channel`` = ``head_dim`` columns per head, the flatten layout), the cores as ``attention``
members (nothing to cut, but their MACs count per head), and any reshape that holds the head count
as a literal as a ``split`` (heads at position -2 of its shape) or ``merge`` (``heads * head_dim`` at
position -1) member, whose literal slicing rewrites; ``-1`` needs nothing, and a head count the
graph computes is refused. Q and K lose the same heads as V, since the scores are per head;
head_dim, hence the ``1/sqrt(head_dim)`` scale, is unchanged. Anything else around a core (a
per-head bias on the scores, packed QKV projections, rotary embeddings, grouped-query attention, a
head tensor read elsewhere) leaves the Linears' groups refused, with a reason naming the op and its
module path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from compiler import ir
from passes.prune.members import SHAPE_READERS, Member
from passes.prune.members import node_shape as _shape

#: Reshapes that split a Linear's features into (heads, head_dim), or merge them back.
HEAD_RESHAPES = frozenset({"aten.view", "aten.reshape", "aten._unsafe_view"})
#: Ops that reorder dimensions: a head stays a head.
PERMUTES = frozenset({"aten.transpose", "aten.permute"})
#: Ops that leave a tensor's shape as it is (copies, eval-mode dropout, casts).
PASS_THROUGH = frozenset({"aten.clone", "aten.contiguous", "aten.dropout", "aten.alias", "aten.to", "aten._to_copy"})
#: Ops on attention scores that treat every head alike when their other operand broadcasts over the heads.
SCORE_OPS = frozenset({"aten.mul", "aten.div", "aten.add", "aten.sub", "aten.masked_fill"})
_SOFTMAX = frozenset({"aten.softmax", "aten._softmax"})
_SDPA = "aten.scaled_dot_product_attention"
_SDPA_MASK, _SDPA_GQA = 3, 7  # positions of attn_mask and enable_gqa in aten.scaled_dot_product_attention


@dataclass
class Attention:
    """A multi-head attention recognised on the IR (see the module docstring)."""

    writers: list[fx.Node]  # the Q, K and V Linears
    anchor: fx.Node  # the merged heads, as the output projection reads them
    heads: int
    head_dim: int
    inner: list[fx.Node]  # every node strictly between the writers and the output projection
    members: list[Member]  # the cores, and the reshapes that hold the head count as a literal


class _NotAttention(Exception):
    """Why the nodes around an attention core are not the pattern this module can cut by heads."""


def attention_blocks(gm: fx.GraphModule) -> tuple[list[Attention], dict[fx.Node, list[str]]]:
    """Every attention core of ``gm``: the blocks recognised, and refusals keyed by the Linears feeding the rest."""
    blocks, refusals = [], {}
    for node in gm.graph.nodes:
        name = ir.op_name(node)
        if name != _SDPA and not (name in _SOFTMAX and _score_chain(node) is not None):
            continue
        try:
            blocks.append(_sdpa_block(node) if name == _SDPA else _matmul_block(node))
        except _NotAttention as error:
            for writer in _linears_above(_value_end(node)):
                refusals.setdefault(writer, []).append(f"attention heads: {error}")
    return blocks, refusals


def _sdpa_block(core: fx.Node) -> Attention:
    mask = core.args[_SDPA_MASK] if len(core.args) > _SDPA_MASK else core.kwargs.get("attn_mask")
    if not _broadcasts_over_heads(mask):
        raise _NotAttention(f"{_where(core)} takes a mask of shape {_shape(mask)} that differs per head")
    if core.args[_SDPA_GQA] if len(core.args) > _SDPA_GQA else core.kwargs.get("enable_gqa", False):
        raise _NotAttention(f"{_where(core)} shares key and value heads between query heads (enable_gqa)")
    return _block([(operand, core, "hld") for operand in core.args[:3]], core, [core], [])


def _matmul_block(softmax: fx.Node) -> Attention:
    scores, chain = _score_chain(softmax)
    rank = len(_shape(softmax) or ())
    if softmax.args[1] not in (-1, rank - 1):
        raise _NotAttention(f"{_where(softmax)} normalises over dimension {softmax.args[1]}, not the keys")
    _sole_user(scores)
    for node in chain:
        _sole_user(node)
        _check_score_op(node)
    probabilities, values = _forward(softmax, PASS_THROUGH)
    if ir.op_name(values) != "aten.matmul" or values.args[0] is not probabilities[-1]:
        raise _NotAttention(f"{_where(values)} reads the attention probabilities of {_where(softmax)}")
    operands = [(scores.args[0], scores, "hld"), (scores.args[1], scores, "hdl"), (values.args[1], values, "hld")]
    return _block(operands, values, [scores, values], [*chain, *probabilities])


def _block(operands: list, core: fx.Node, cores: list[fx.Node], between: list[fx.Node]) -> Attention:
    """The attention around ``core`` (whose output is every head's values) from its Q, K, V operands."""
    traced = [_operand(tensor, reader, layout) for tensor, reader, layout in operands]
    writers = [writer for writer, *_ in traced]
    if len(set(writers)) != len(writers):
        raise _NotAttention(f"{_where(core)} reads one Linear as two of query, key and value")
    sizes = {sizes for *_, sizes in traced}
    if len(sizes) != 1:
        raise _NotAttention(f"{_where(core)}: query, key and value split into different (heads, head_dim) {sizes}")
    ((heads, head_dim),) = sizes
    anchor, merged, merge = _merge(core, heads, head_dim)
    members = [Member(node.name, ir.module_path(node), "attention") for node in cores]
    members += [member for _, _, member, _ in traced if member is not None] + ([merge] if merge else [])
    inner = [node for _, chain, _, _ in traced for node in chain] + cores + between + merged
    return Attention(writers, anchor, heads, head_dim, inner, members)


def _operand(tensor: object, reader: fx.Node, layout: str) -> tuple[fx.Node, list[fx.Node], Member | None, tuple]:
    """(Linear, its split and the moves to ``reader``, a literal split member or None, (heads, head_dim)).

    ``layout`` says where ``reader`` wants the heads (h), positions (l) and head features (d): last, in that order.
    """
    chain, node = [], tensor
    while isinstance(node, fx.Node) and ir.op_name(node) in PERMUTES | PASS_THROUGH:
        chain.insert(0, node)
        node = node.args[0]
    split, writer = node, node.args[0] if isinstance(node, fx.Node) and node.args else None
    if ir.op_name(split) not in HEAD_RESHAPES:
        raise _NotAttention(f"{_where(reader)} reads {_where(split)}, not a Linear split into heads")
    if not (isinstance(writer, fx.Node) and ir.op_name(writer) == "aten.linear"):
        raise _NotAttention(f"{_where(split)} splits {_where(writer)} into heads, not a Linear")
    heads, head_dim = _split_sizes(split, writer)
    labels = [*range(len(_shape(split)) - 3), "l", "h", "d"]
    for node in [writer, split, *chain]:
        labels = _moved(node, labels)
        _sole_user(node)
    if labels != [*range(len(labels) - 3), *layout]:
        raise _NotAttention(f"{_where(reader)} reads heads laid out as {labels}, not (..., {', '.join(layout)})")
    member = Member(split.name, ir.module_path(split), "split") if _literal(split, -2, heads) else None
    return writer, [split, *chain], member, (heads, head_dim)


def _merge(core: fx.Node, heads: int, head_dim: int) -> tuple[fx.Node, list[fx.Node], Member | None]:
    """(the merged heads, the nodes from the core's output to them, a literal merge member or None)."""
    moved, merge = _forward(core, PERMUTES | PASS_THROUGH)
    labels = [*range(len(_shape(core) or ()) - 3), "h", "l", "d"]
    for node in moved[1:]:
        labels = _moved(node, labels)
    before, after = _shape(moved[-1]), _shape(merge)
    if ir.op_name(merge) not in HEAD_RESHAPES | {"aten.flatten"} or labels[-3:] != ["l", "h", "d"] or \
            before is None or after != (*before[:-2], heads * head_dim):
        raise _NotAttention(f"{_where(merge)} reads the heads of {_where(core)}; a reshape must merge them into "
                            "the features of a Linear")
    copies, reader = _forward(merge, PASS_THROUGH)
    if ir.op_name(reader) != "aten.linear" or reader.args[0] is not copies[-1]:
        raise _NotAttention(f"{_where(reader)} reads the merged heads of {_where(core)}, not a Linear")
    literal = ir.op_name(merge) != "aten.flatten" and _literal(merge, -1, heads * head_dim)
    member = Member(merge.name, ir.module_path(merge), "merge", head_dim) if literal else None
    return copies[-1], [*moved[1:], *copies], member


def _forward(node: fx.Node, ops: frozenset[str]) -> tuple[list[fx.Node], fx.Node]:
    """``node`` and its chain of sole users with an op in ``ops``; and the first user past them."""
    chain, user = [node], _sole_user(node)
    while ir.op_name(user) in ops:
        chain.append(user)
        user = _sole_user(user)
    return chain, user


def _sole_user(node: fx.Node) -> fx.Node:
    """The one reader of ``node``, shape readers aside (a size read at run time follows the cut by itself)."""
    readers = [user for user in node.users if ir.op_name(user) not in SHAPE_READERS]
    if len(readers) != 1:
        raise _NotAttention(f"{_where(node)} carries heads to {', '.join(map(_where, readers)) or 'nothing'}; "
                            "only one reader is understood")
    return readers[0]


def _score_chain(softmax: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(the scores matmul, the ops from it to ``softmax``), or None when no matmul is found."""
    chain, node = [], softmax.args[0]
    while isinstance(node, fx.Node) and ir.op_name(node) in SCORE_OPS | PASS_THROUGH:
        chain.insert(0, node)
        node = _carried(node)
    return (node, chain) if isinstance(node, fx.Node) and ir.op_name(node) == "aten.matmul" else None


def _carried(node: fx.Node) -> object:
    """The operand of a score op that carries the scores: the first, or the second of an add or mul."""
    first = node.args[0]
    if ir.op_name(node) in ("aten.add", "aten.mul") and len(node.args) > 1 and _shape(first) != _shape(node) and \
            _shape(node.args[1]) == _shape(node):
        return node.args[1]
    return first


def _check_score_op(node: fx.Node) -> None:
    """A score op must treat every head alike: what it combines the scores with broadcasts over the heads."""
    carried = _carried(node)
    for other in node.args:
        if isinstance(other, fx.Node) and other is not carried and not _broadcasts_over_heads(other):
            raise _NotAttention(f"{_where(node)} combines the scores with a tensor of shape {_shape(other)}, "
                                "one per head")


def _broadcasts_over_heads(tensor: object) -> bool:
    """True for no tensor, a scalar, or a tensor of size 1 (or no dimension) where the heads are, at -3."""
    if not isinstance(tensor, fx.Node):
        return True
    shape = _shape(tensor)
    return shape is not None and (len(shape) < 3 or shape[-3] == 1)


def _split_sizes(split: fx.Node, writer: fx.Node) -> tuple[int, int]:
    """(heads, head_dim) of a reshape of a Linear's output ``(..., features)`` to ``(..., heads, head_dim)``."""
    before, after = _shape(writer), _shape(split)
    if before is None or after is None or len(after) != len(before) + 1 or len(after) < 3 or \
            after[:-2] != before[:-1] or not all(isinstance(size, int) for size in after[-2:]) or \
            after[-2] * after[-1] != before[-1]:
        raise _NotAttention(f"{_where(split)} reshapes {before} to {after}, not features into (heads, head_dim)")
    return after[-2], after[-1]


def _literal(node: fx.Node, position: int, size: int) -> bool:
    """Whether reshape ``node`` spells ``size``, the heads' width, as a literal at ``position`` of its shape."""
    shape = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], (list, tuple)) else None
    entry = shape[position] if shape else None
    if entry == -1:
        return False
    if entry == size and isinstance(entry, int):
        return True
    raise _NotAttention(f"{_where(node)} takes the heads' size from {entry!r}, neither -1 nor the literal {size}")


def _moved(node: fx.Node, labels: list) -> list:
    """``labels``, one per dimension, as a transpose or permute leaves them."""
    labels, rank = list(labels), len(labels)
    if ir.op_name(node) == "aten.transpose":
        first, second = node.args[1] % rank, node.args[2] % rank
        labels[first], labels[second] = labels[second], labels[first]
    elif ir.op_name(node) == "aten.permute":
        labels = [labels[dim % rank] for dim in node.args[1]]
    return labels


def _value_end(core: fx.Node) -> fx.Node:
    """The core itself, or the matmul by the values a few sole users past a softmax."""
    node = core
    for _ in range(4):
        if ir.op_name(node) in (_SDPA, "aten.matmul") or len(node.users) != 1:
            break
        node = next(iter(node.users))
    return node


def _linears_above(node: fx.Node, depth: int = 10) -> list[fx.Node]:
    """The Linears ``node`` reads through at most ``depth`` ops, not through another Linear or a conv."""
    found, frontier, seen = [], [node], {node}
    for _ in range(depth):
        frontier = [value for current in frontier for value in current.all_input_nodes if value not in seen]
        seen.update(frontier)
        found += [value for value in frontier if ir.op_name(value) == "aten.linear"]
        frontier = [value for value in frontier if ir.op_name(value) not in ("aten.linear", "aten.conv2d")]
    return found


def _where(node: object) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    return f"{ir.op_name(node)} in module {ir.module_path(node) or '<root>'!r}"
