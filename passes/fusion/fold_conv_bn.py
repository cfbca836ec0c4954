"""Conv1d/Conv2d/Conv3d + BatchNorm folding: ``w' = w * g / s``, ``b' = (b - m) * g / s + beta``
with ``s = sqrt(var + eps)``, per output channel (see ``passes.fusion.batch_norm``)."""

from __future__ import annotations

import torch
import torch.fx as fx

from passes.fusion.batch_norm import BatchNormMatch, FoldBatchNormPass

aten = torch.ops.aten


class FoldConvBatchNorm(FoldBatchNormPass):
    """Fold an inference BatchNorm into the preceding (non-transposed) convolution."""

    name = "fold_conv_bn"
    anchor_targets = frozenset({
        aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
        aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default,
    })

    def check_anchor(self, gm: fx.GraphModule, anchor: fx.Node, match: BatchNormMatch) -> str | None:
        """Refuse transposed convolutions, whose weight keeps output channels on axis 1."""
        if anchor.target == aten.convolution.default and anchor.args[6]:
            return "transposed convolution"
        return None
