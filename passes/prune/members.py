"""What a coupled channel group is made of: its members (where its channels live) and the group itself.

Shared by :mod:`passes.prune.groups` (which finds the groups) and :mod:`passes.prune.attention_heads`
(which recognises the groups whose channels are whole attention heads).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from compiler import meta

#: Ops that read only a tensor's shape, never its channels.
SHAPE_READERS = frozenset({"aten.sym_size", "aten.size"})


@dataclass(frozen=True)
class Member:
    """One place a group's channels live: ``role`` of the op at ``module_path`` (node ``node``)."""

    node: str
    module_path: str
    role: str  # "out", "in", "depthwise", "norm"; for heads also "attention", "split", "merge"
    per_channel: int = 1  # weight rows ("out") or columns ("in") per channel: a flatten's positions, a head's width


@dataclass
class ChannelGroup:
    """Channels that go together, their members, and whether (and why not) they can be pruned."""

    channels: int
    members: list[Member] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    unit: int = 1  # features per channel: 1 for conv channels and neurons, head_dim for attention heads

    @property
    def prunable(self) -> bool:
        """True when every op on the group is understood and something writes the channels."""
        return not self.refusals

    def to_dict(self) -> dict:
        """JSON-able form for the ledger."""
        return {"channels": self.channels, **({"unit": self.unit} if self.unit != 1 else {}),
                "prunable": self.prunable, "refusals": list(self.refusals),
                "members": [{"module_path": m.module_path or "<root>", "role": m.role, "node": m.node,
                             **({"per_channel": m.per_channel} if m.per_channel != 1 else {})}
                            for m in self.members]}


def node_shape(node: object) -> tuple[int, ...] | None:
    """A node's concrete output shape, from the probe's annotation or the traced value; None if unknown."""
    if not isinstance(node, fx.Node):
        return None
    shape = node.meta.get(meta.SHAPE)
    if shape is None and isinstance(node.meta.get(meta.VAL), torch.Tensor):
        shape = tuple(node.meta[meta.VAL].shape)
    return tuple(shape) if shape is not None else None
