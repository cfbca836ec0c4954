"""Marking Conv/Linear + activation groups for the backends.

A convolution or linear layer whose only user is an activation (ReLU, ReLU6 or another hardtanh
clip, SiLU, GELU, hardswish) forms a group that integer and TensorRT-style backends fuse into one
kernel; quantisation must then not place a quantise/dequantise pair between the two. This pass
only writes ``FUSION_GROUP``, ``FUSION_ROLE`` and ``FUSED_ACTIVATION`` into ``node.meta``: the
graph and its outputs are unchanged, so it reports ``modified=False`` (as calibration does).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from compiler import meta
from compiler.errors import PassError
from compiler.pass_base import Pass, PassContext, PassResult

aten = torch.ops.aten

ANCHORS = frozenset({
    aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
    aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default, aten.linear.default,
    aten.addmm.default,
})

_ACTIVATIONS = {
    aten.relu.default: "relu", aten.relu_.default: "relu", aten.silu.default: "silu",
    # F.relu6 is captured as aten.relu6, nn.ReLU6 as hardtanh(x, 0, 6): both are relu6.
    aten.relu6.default: "relu6", aten.relu6_.default: "relu6",
    aten.silu_.default: "silu", aten.gelu.default: "gelu", aten.hardswish.default: "hardswish",
    aten.hardswish_.default: "hardswish", aten.hardtanh.default: "clip",
    aten.hardtanh_.default: "clip", aten.clamp.default: "clip",
}


def activation_kind(node: fx.Node) -> str | None:
    """``relu``, ``relu6``, ``clip``, ``silu``, ``gelu`` or ``hardswish``; None if not one."""
    kind = _ACTIVATIONS.get(node.target) if node.op == "call_function" else None
    if kind == "clip":
        return "relu6" if _clip_bounds(node) == (0, 6) else "clip"
    return kind


def _clip_bounds(node: fx.Node) -> tuple[object, object]:
    """(low, high) of a hardtanh or clamp, from positional or keyword arguments."""
    if node.target in (aten.hardtanh.default, aten.hardtanh_.default):
        names, defaults = ("min_val", "max_val"), (-1.0, 1.0)
    else:
        names, defaults = ("min", "max"), (None, None)
    positional = list(node.args[1:3])
    return tuple(
        positional[index] if index < len(positional) else node.kwargs.get(name, default)
        for index, (name, default) in enumerate(zip(names, defaults, strict=True))
    )


class MarkActivationFusion(Pass):
    """Annotate anchor + activation pairs as fusion groups (metadata only)."""

    name = "mark_activation_fusion"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Write the group annotations; count groups per activation and refusals per reason."""
        groups: Counter = Counter()
        refused: Counter = Counter()
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in ANCHORS:
                continue
            activation, reason = self.check(node)
            if activation is None:
                refused[reason] += 1
                continue
            kind = activation_kind(activation)
            node.meta.update({meta.FUSION_GROUP: node.name, meta.FUSION_ROLE: "anchor",
                              meta.FUSED_ACTIVATION: kind})
            activation.meta.update({meta.FUSION_GROUP: node.name, meta.FUSION_ROLE: "activation"})
            groups[kind] += 1
        stats = {"groups": sum(groups.values()), "by_activation": dict(sorted(groups.items())),
                 "refused": dict(refused)}
        return PassResult(gm, False, stats)

    def check(self, anchor: fx.Node) -> tuple[fx.Node | None, str]:
        """(the activation to group with ``anchor``, "") or (None, why not)."""
        if len(anchor.users) != 1:
            return None, "anchor output has several users" if anchor.users else "anchor unused"
        user = next(iter(anchor.users))
        if activation_kind(user) is None:
            return None, "no activation follows"
        return user, ""

    def ensures(self, gm: fx.GraphModule) -> None:
        """Every marked activation belongs to a marked anchor that feeds it directly."""
        for node in gm.graph.nodes:
            if node.meta.get(meta.FUSION_ROLE) != "activation":
                continue
            anchor = node.args[0]
            group = node.meta[meta.FUSION_GROUP]
            if not isinstance(anchor, fx.Node) or anchor.meta.get(meta.FUSION_GROUP) != group:
                raise PassError(
                    f"activation {node.name} is marked but its input is not its anchor {group}"
                )
