"""Removing channels for real: each member of a group loses the same channels from its tensors.

``out`` members lose weight rows and bias entries, ``norm`` members (unfolded BatchNorm) their
per-channel scale, shift and statistics; ``in`` members lose weight columns (a block of
``per_channel`` columns each behind a flatten); ``depthwise`` members lose rows, bias entries and
as many groups. The tensors are replaced, not masked, so the model, its ONNX file and its MACs
shrink.
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


def _slice_out(gm: fx.GraphModule, node: fx.Node, keep: torch.Tensor, member: Member) -> None:
    _replace(gm, node.args[1], lambda weight: weight[keep])
    if len(node.args) > 2 and isinstance(node.args[2], fx.Node):
        _replace(gm, node.args[2], lambda bias: bias[keep])


def _slice_in(gm: fx.GraphModule, node: fx.Node, keep: torch.Tensor, member: Member) -> None:
    per = member.per_channel
    columns = (keep[:, None] * per + torch.arange(per)[None, :]).reshape(-1) if per > 1 else keep
    _replace(gm, node.args[1], lambda weight: weight[:, columns])


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


_SLICERS = {"out": _slice_out, "in": _slice_in, "depthwise": _slice_depthwise, "norm": _slice_norm}
