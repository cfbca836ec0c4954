"""Coupled channel groups: the channels that must be removed together, found on the IR as a graph.

A channel removed from a conv's output is gone from every tensor it flows into, so it must leave
every weight that reads or writes it. Each tensor that carries channels is a node of a
``networkx`` graph; ops that tie two tensors' channels together (an activation, a residual add, a
depthwise conv) add an edge; each connected component is one group, listed with its members:

* ``out``: a conv or linear writing the channels (rows of its weight, entries of its bias);
* ``in``: a conv or linear reading them (columns of its weight; ``per_channel`` columns each where
  a flatten folded the spatial positions into the features, as before a classifier);
* ``depthwise``: a depthwise conv, whose input and output channels are the same channels;
* ``norm``: a BatchNorm left unfolded (its scale, shift and running statistics per channel).

A group can be pruned only if every op on it is understood. Anything else makes the group
unprunable with a reason that names the op and module path, never a wrong graph: a grouped conv
that is not depthwise, a concat (its offsets are not handled yet), a graph input or output (the
model's interface keeps its width), a group with no ``out`` member, an op this module does not
know. Channels are dimension 1 of 4-D tensors and the last dimension of Linear inputs and outputs.

Multi-head attention gives a group of a second kind, whose channels are whole heads
(:mod:`passes.prune.attention_heads`).
"""

from __future__ import annotations

import math

import networkx as nx
import torch.fx as fx

from compiler import ir
from passes.prune.attention_heads import Attention, attention_blocks
from passes.prune.members import SHAPE_READERS, ChannelGroup, Member
from passes.prune.members import node_shape as _shape

__all__ = ["CHANNELWISE", "ELEMENTWISE", "FLATTENS", "SHAPE_READERS", "ChannelGroup", "Member", "channel_groups"]

#: Ops whose output has the channels of their first input, one for one.
CHANNELWISE = frozenset({
    "aten.relu", "aten.relu_", "aten.hardtanh", "aten.hardtanh_", "aten.relu6", "aten.sigmoid", "aten.silu",
    "aten.gelu", "aten.dropout", "aten.clone", "aten.contiguous", "aten.pad", "aten.constant_pad_nd",
    "aten.max_pool2d", "aten.avg_pool2d", "aten.adaptive_avg_pool2d", "aten.batch_norm", "aten.clamp",
    "aten.hardswish", "aten.hardsigmoid",
})
#: Elementwise ops of two tensors: their channels are the same channels (a residual add, an SE scale).
ELEMENTWISE = frozenset({"aten.add", "aten.add_", "aten.mul", "aten.mul_", "aten.sub"})
#: Reshapes that fold the spatial positions of an N,C,H,W tensor into the features, channel-major.
FLATTENS = frozenset({"aten.flatten", "aten.view", "aten.reshape"})


class _Builder:
    """Walks the graph once, in order, tying each tensor's channels to those it came from."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.graph = nx.Graph()
        self.space: dict[fx.Node, fx.Node] = {}  # tensor node -> node whose channels it carries
        self.factor: dict[fx.Node, int] = {}  # flattened tensors: features per channel
        self.members: dict[fx.Node, list[Member]] = {}
        self.refusals: dict[fx.Node, list[str]] = {}
        blocks, self.attention_refusals = attention_blocks(gm)
        self.inner = {node for block in blocks for node in block.inner}
        self.anchors = {block.anchor: block for block in blocks}
        self.head_dims = {writer: block.head_dim for block in blocks for writer in block.writers}
        self.heads: dict[fx.Node, tuple[int, int]] = {}  # space -> (heads, head_dim)

    def build(self) -> list[ChannelGroup]:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self._new_space(node, refusal=f"graph input {node.name!r}: the model's interface keeps its width")
            elif node.op == "call_function":
                self._visit(node)
            elif node.op == "output":
                for value in node.all_input_nodes:
                    self._refuse(value, f"graph output {value.name!r}: the model's interface keeps its width")
        return self._groups()

    def _visit(self, node: fx.Node) -> None:
        name = ir.op_name(node)
        if node in self.inner:  # inside a recognised attention: its heads join at the merged tensor
            if node in self.anchors:
                self._join_heads(self.anchors[node])
        elif name == "aten.conv2d":
            self._conv(node)
        elif name == "aten.linear":
            self._linear(node)
        elif name == "aten.batch_norm":
            self._follow(node, node.args[0])
            self._add_member(node, Member(node.name, ir.module_path(node), "norm"))
        elif name in CHANNELWISE:
            self._follow(node, node.args[0])
        elif name in ELEMENTWISE:
            self._elementwise(node)
        elif name in FLATTENS:
            self._flatten(node)
        elif name == "aten.mean" and _keeps_channels(node):
            self._follow(node, node.args[0])
        elif name not in SHAPE_READERS:
            for value in node.all_input_nodes:
                if value in self.space:
                    self._refuse(value, f"{name} in module {ir.module_path(node) or '<root>'!r} is not understood")

    def _conv(self, node: fx.Node) -> None:
        source, weight = node.args[0], ir.tensor_of(self.gm, node.args[1])
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        path = ir.module_path(node)
        if groups == 1:
            self._add_member(source, Member(node.name, path, "in"))
            self._new_space(node, Member(node.name, path, "out"))
        elif weight is not None and weight.shape[1] == 1 and weight.shape[0] == groups:
            self._follow(node, source)
            self._add_member(node, Member(node.name, path, "depthwise"))
        else:
            reason = f"grouped conv (groups={groups}) in module {path or '<root>'!r}"
            self._refuse(source, reason)
            self._new_space(node, refusal=reason)

    def _linear(self, node: fx.Node) -> None:
        source, path = node.args[0], ir.module_path(node)
        self._add_member(source, Member(node.name, path, "in", self.factor.get(source, 1)))
        self._new_space(node, Member(node.name, path, "out", self.head_dims.get(node, 1)))
        for reason in self.attention_refusals.get(node, ()):
            self._refuse(node, reason)

    def _join_heads(self, block: Attention) -> None:
        """Q, K and V become one group of heads, which the merged tensor carries to the output projection."""
        space = self.space[block.writers[0]]
        for writer in block.writers[1:]:
            self.graph.add_edge(space, self.space[writer])
        self.space[block.anchor], self.factor[block.anchor] = space, block.head_dim
        self.heads[space] = (block.heads, block.head_dim)
        self.members.setdefault(space, []).extend(block.members)

    def _elementwise(self, node: fx.Node) -> None:
        tensors = [value for value in node.args[:2] if isinstance(value, fx.Node) and value in self.space]
        if not tensors:
            return
        self._follow(node, tensors[0])
        for other in tensors[1:]:
            if _channels(other) == _channels(tensors[0]):
                self.graph.add_edge(self.space[tensors[0]], self.space[other])
            elif _channels(other) != 1:  # one channel broadcasts over all: nothing couples
                self._refuse(other, f"{ir.op_name(node)} in module {ir.module_path(node) or '<root>'!r} "
                                    "broadcasts channels")

    def _flatten(self, node: fx.Node) -> None:
        source = node.args[0]
        before, after = _shape(source), _shape(node)
        if source not in self.space:
            return
        if before is not None and after is not None and len(after) == 2 and len(before) >= 2 and \
                before[0] == after[0] and after[1] == math.prod(before[1:]):
            self._follow(node, source)
            self.factor[node] = math.prod(before[2:]) * self.factor.get(source, 1)
        else:
            self._refuse(source, f"{ir.op_name(node)} in module {ir.module_path(node) or '<root>'!r} "
                                 f"reshapes {before} to {after}")

    def _new_space(self, node: fx.Node, member: Member | None = None, refusal: str | None = None) -> None:
        self.space[node] = node
        self.graph.add_node(node)
        if member is not None:
            self.members.setdefault(node, []).append(member)
        if refusal is not None:
            self.refusals.setdefault(node, []).append(refusal)

    def _follow(self, node: fx.Node, source: object) -> None:
        if isinstance(source, fx.Node) and source in self.space:
            self.space[node] = self.space[source]
            self.factor[node] = self.factor.get(source, 1)

    def _add_member(self, tensor: object, member: Member) -> None:
        if isinstance(tensor, fx.Node) and tensor in self.space:
            self.members.setdefault(self.space[tensor], []).append(member)

    def _refuse(self, tensor: fx.Node, reason: str) -> None:
        if tensor in self.space:
            self.refusals.setdefault(self.space[tensor], []).append(reason)

    def _groups(self) -> list[ChannelGroup]:
        groups = []
        for component in nx.connected_components(self.graph):
            ordered = sorted(component, key=_position(self.gm))
            members = [member for space in ordered for member in self.members.get(space, [])]
            refusals = [reason for space in ordered for reason in self.refusals.get(space, [])]
            if members and not any(member.role == "out" for member in members):
                refusals.append("no conv or linear writes these channels")
            if not members:
                continue
            heads = [self.heads[space] for space in ordered if space in self.heads]
            channels, unit = heads[0] if heads else (_channels(ordered[0]) or 0, 1)
            groups.append(ChannelGroup(channels, members, sorted(set(refusals)), unit))
        return groups


def channel_groups(gm: fx.GraphModule) -> list[ChannelGroup]:
    """The coupled channel groups of ``gm`` (run :func:`compiler.probe.run_annotated` or capture first)."""
    return _Builder(gm).build()


def _position(gm: fx.GraphModule):
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    return lambda node: order[node]


def _channels(node: fx.Node) -> int | None:
    """Channel count: dimension 1 of a 4-D tensor, the last dimension otherwise."""
    shape = _shape(node)
    if not shape:
        return None
    size = shape[1] if len(shape) == 4 else shape[-1]
    return int(size) if isinstance(size, int) else None


def _keeps_channels(node: fx.Node) -> bool:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return isinstance(dims, (list, tuple)) and 1 not in dims and -3 not in dims
