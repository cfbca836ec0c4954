"""Removing channels for real: each member of a group loses the same channels from its tensors.

``out`` members lose weight rows and bias entries, ``norm`` members (unfolded BatchNorm) their
per-channel scale, shift and statistics; ``in`` members lose weight columns (a block of
``per_channel`` columns each behind a flatten); ``depthwise`` members lose rows, bias entries and
as many groups. The tensors are replaced, not masked, so the model, its ONNX file and its MACs
shrink.

In a group of attention heads a channel is a head: the Q, K and V Linears (``out``, ``per_channel`` =
head_dim) lose the block of rows h*d..(h+1)*d of every cut head h, the output projection (``in``)
the same block of columns; a reshape that spells the head count as a literal has it rewritten to the
heads kept (``split``: position -2 of its shape; ``merge``: ``heads * head_dim`` at position -1). The
attention cores (``attention``) need nothing: their shapes follow from their inputs.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from compiler import ir
from compiler.errors import PassError
from passes.prune.groups import ChannelGroup, Member

_GROUPS_ARGUMENT = 6  # aten.conv2d(input, weight, bias, stride, padding, dilation, groups)


def keep_channels(gm: fx.GraphModule, group: ChannelGroup, keep: torch.Tensor) -> None:
    """Keep only the channels ``keep`` (sorted indices) in every member of ``group``."""
    nodes = {node.name: node for node in gm.graph.nodes}
    for member in group.members:
        _SLICERS[member.role](gm, nodes[member.node], keep, member)


def shared_weights(gm: fx.GraphModule, group: ChannelGroup) -> list[str]:
    """Weights of the group's members that something else reads too (tied weights cannot be cut alone)."""
    nodes = {node.name: node for node in gm.graph.nodes}
    readers: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers[node.target] = readers.get(node.target, 0) + len(node.users)
    shared = []
    for member in group.members:
        for argument in nodes[member.node].args[1:3]:
            if isinstance(argument, fx.Node) and argument.op == "get_attr" and readers[argument.target] > 1:
                shared.append(argument.target)
    return shared


def features(keep: torch.Tensor, per_channel: int) -> torch.Tensor:
    """The rows or columns of channels ``keep`` when each channel is a block of ``per_channel`` of them."""
    return (keep[:, None] * per_channel + torch.arange(per_channel)[None, :]).reshape(-1) if per_channel > 1 else keep


def _slice_out(gm: fx.GraphModule, node: fx.Node, keep: torch.Tensor, member: Member) -> None:
    rows = features(keep, member.per_channel)
    _replace(gm, node.args[1], lambda weight: weight[rows])
    if len(node.args) > 2 and isinstance(node.args[2], fx.Node):
        _replace(gm, node.args[2], lambda bias: bias[rows])


def _slice_in(gm: fx.GraphModule, node: fx.Node, keep: torch.Tensor, member: Member) -> None:
    columns = features(keep, member.per_channel)
    _replace(gm, node.args[1], lambda weight: weight[:, columns])


def _rewrite_shape(node: fx.Node, position: int, size: int) -> None:
    """Set the literal at ``position`` of a reshape's shape argument to ``size``."""
    shape = list(node.args[1])
    if not isinstance(shape[position], int) or shape[position] <= 0:
        raise PassError(f"reshape {node.name!r} in module {ir.module_path(node) or '<root>'!r} has no literal size "
                        f"at position {position} of {shape}")
    shape[position] = size
    node.args = (node.args[0], shape, *node.args[2:])


def _slice_split(gm: fx.GraphModule, node: fx.Node, keep: torch.Tensor, member: Member) -> None:
    _rewrite_shape(node, -2, len(keep))


def _slice_merge(gm: fx.GraphModule, node: fx.Node, keep: torch.Tensor, member: Member) -> None:
    _rewrite_shape(node, -1, len(keep) * member.per_channel)


def _follows_inputs(gm: fx.GraphModule, node: fx.Node, keep: torch.Tensor, member: Member) -> None:
    """An attention core: its shapes follow from its (cut) inputs."""


def _slice_depthwise(gm: fx.GraphModule, node: fx.Node, keep: torch.Tensor, member: Member) -> None:
    _slice_out(gm, node, keep, member)
    arguments = list(node.args)
    arguments[_GROUPS_ARGUMENT] = len(keep)
    node.args = tuple(arguments)


def _replace(gm: fx.GraphModule, attribute: object, cut) -> None:
    if not isinstance(attribute, fx.Node) or attribute.op != "get_attr":
        raise PassError(f"{attribute} is not a constant weight; channels can only be cut from parameters")
    tensor = ir.get_attribute(gm, attribute.target)
    ir.set_attribute(gm, attribute.target, cut(tensor).detach().clone().contiguous())


def _slice_norm(gm: fx.GraphModule, node: fx.Node, keep: torch.Tensor, member: Member) -> None:
    for argument in node.args[1:5]:  # weight, bias, running_mean, running_var (None when not affine)
        if argument is not None:
            _replace(gm, argument, lambda tensor: tensor[keep])


_SLICERS = {"out": _slice_out, "in": _slice_in, "depthwise": _slice_depthwise, "norm": _slice_norm,
            "attention": _follows_inputs, "split": _slice_split, "merge": _slice_merge}
