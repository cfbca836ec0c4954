"""The passes, one per file in a family folder, and their registry: name (equal to the file name) -> class.

Passes import the core (``compiler``) and never a backend or the driver; the driver reaches them through ``REGISTRY``.
"""

from __future__ import annotations

from compiler.pass_base import Pass
from passes.cleanup.eliminate_dead_code import EliminateDeadCode
from passes.cleanup.fold_constants import FoldConstants
from passes.cleanup.remove_noops import RemoveNoops
from passes.fusion.fold_conv_bn import FoldConvBatchNorm
from passes.fusion.fold_linear_bn import FoldLinearBatchNorm
from passes.fusion.fold_pixel_normalization import FoldPixelNormalization
from passes.fusion.mark_activation_fusion import MarkActivationFusion
from passes.low_rank.low_rank import LowRank
from passes.prune.prune_channels import PruneChannels
from passes.prune.sparsify_weights import SparsifyWeights
from passes.quant.bias_correction import BiasCorrection
from passes.quant.calibrate import Calibrate
from passes.quant.cross_layer_equalization import CrossLayerEqualization
from passes.quant.gptq import GPTQ
from passes.quant.insert_qdq import InsertQDQ
from passes.quant.quant_sensitivity import QuantSensitivity
from passes.quant.reconstruct import Reconstruct
from passes.quant.smooth_quant import SmoothQuant
from passes.recovery.recover import Recover

REGISTRY: dict[str, type[Pass]] = {
    cls.name: cls
    for cls in (
        EliminateDeadCode,
        FoldConstants,
        RemoveNoops,
        FoldConvBatchNorm,
        FoldLinearBatchNorm,
        FoldPixelNormalization,
        MarkActivationFusion,
        PruneChannels,
        SparsifyWeights,
        LowRank,
        Recover,
        Calibrate,
        InsertQDQ,
        QuantSensitivity,
        BiasCorrection,
        CrossLayerEqualization,
        SmoothQuant,
        GPTQ,
        Reconstruct,
    )
}

__all__ = ["REGISTRY"]
