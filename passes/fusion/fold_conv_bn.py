"""Conv1d/Conv2d/Conv3d + BatchNorm folding, per output channel.

``w' = w * g / s`` and ``b' = (b - m) * g / s + beta`` with ``s = sqrt(var + eps)`` (see
``passes.fusion.batch_norm``).

Grouped and depthwise convolutions fold the same way: their weight keeps output channels on axis
0 whatever the groups. Transposed convolutions (output channels on axis 1) and unbatched ones
(where BatchNorm's axis 1 is a spatial axis, not the channels) are refused with their reason.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from compiler import meta
from passes.fusion.batch_norm import BatchNormMatch, FoldBatchNormPass

aten = torch.ops.aten

_TRANSPOSED = frozenset({
    aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input,
})


class FoldConvBatchNorm(FoldBatchNormPass):
    """Fold an inference BatchNorm into the preceding (non-transposed, batched) convolution."""

    name = "fold_conv_bn"
    # Transposed convolutions are anchors only so that their refusal shows in the stats.
    anchor_targets = frozenset({
        aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
        aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default,
    }) | _TRANSPOSED

    def check_anchor(
        self, gm: fx.GraphModule, anchor: fx.Node, match: BatchNormMatch
    ) -> str | None:
        """Refuse transposed and unbatched convolutions.

        A transposed convolution's weight keeps output channels on axis 1; an unbatched
        convolution's output has a spatial axis where BatchNorm expects the channels (axis 1).
        """
        if anchor.target in _TRANSPOSED or (
            anchor.target == aten.convolution.default and anchor.args[6]
        ):
            return "transposed convolution"
        output, weight = (node.meta.get(meta.VAL) for node in (anchor, anchor.args[1]))
        if not isinstance(output, torch.Tensor) or not isinstance(weight, torch.Tensor):
            return "convolution output or weight rank unknown"
        if output.dim() != weight.dim():  # a batched conv's output has the weight's rank
            return "unbatched convolution: BatchNorm normalises a dimension other than the channels"
        return None
