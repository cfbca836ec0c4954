"""Linear + BatchNorm1d folding: the same algebra as conv folding, per output feature.

Valid only when the BatchNorm normalises the linear's feature dimension (a rank-2 output).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from compiler import meta
from passes.fusion.batch_norm import BatchNormMatch, FoldBatchNormPass

aten = torch.ops.aten


class FoldLinearBatchNorm(FoldBatchNormPass):
    """Fold an inference BatchNorm1d into the preceding linear layer."""

    name = "fold_linear_bn"
    anchor_targets = frozenset({aten.linear.default})

    def check_anchor(
        self, gm: fx.GraphModule, anchor: fx.Node, match: BatchNormMatch
    ) -> str | None:
        """Refuse when BatchNorm's channel axis (1) is not the linear's feature axis (-1)."""
        value = anchor.meta.get(meta.VAL)
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            return "BatchNorm normalises a dimension other than the linear's features"
        return None
