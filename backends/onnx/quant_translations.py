"""ONNX translations of the IR's quantisation ops (:mod:`compiler.quant_ops`) for ``torch.onnx.export``.

``quantize_dequantize`` becomes a QuantizeLinear/DequantizeLinear pair with a uint8 or int8 zero
point (the pattern ONNX Runtime fuses into integer kernels); ``dequantize_per_channel`` becomes a
DequantizeLinear of an int8 weight or int32 bias initializer, so weights are stored as integers.
"""

from __future__ import annotations

import numpy as np
from onnxscript import ir
from onnxscript import opset18 as op

from compiler.quant_ops import DEQUANTIZE_PER_CHANNEL, QUANTIZE_DEQUANTIZE


def _quantize_dequantize(x, scale: float, zero_point: int, qmin: int, qmax: int):
    if (qmin, qmax) not in ((0, 255), (-128, 127)):
        raise ValueError(f"ONNX QuantizeLinear saturates to the full 8-bit range; got [{qmin}, {qmax}]")
    integer = np.uint8 if qmin == 0 else np.int8
    scale_value = op.Constant(value=ir.tensor(np.array(scale, dtype=np.float32)))
    zero_value = op.Constant(value=ir.tensor(np.array(zero_point, dtype=integer)))
    return op.DequantizeLinear(op.QuantizeLinear(x, scale_value, zero_value), scale_value, zero_value)


def _dequantize_per_channel(quantized, scale, axis: int):
    # An explicit all-zero zero point: ONNX Runtime's QDQ Gemm fusion (QGemm) needs one, though
    # Conv fuses without. The exporter folds it to an initializer of the quantized tensor's type.
    zero_point = op.CastLike(op.ConstantOfShape(op.Shape(scale)), quantized)
    return op.DequantizeLinear(quantized, scale, zero_point, axis=axis)


TRANSLATIONS = {
    QUANTIZE_DEQUANTIZE: _quantize_dequantize,
    DEQUANTIZE_PER_CHANNEL: _dequantize_per_channel,
}
