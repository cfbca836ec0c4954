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
    # Conv fuses without; TensorRT needs it to be a constant. Where the exporter knows the shapes
    # it is one; otherwise a ConstantOfShape of the scale's shape, cast to the quantized type.
    zero_point = _zeros(scale, quantized)
    return op.DequantizeLinear(quantized, scale, zero_point, axis=axis)


def _zeros(scale, quantized):
    """A constant of zeros shaped like ``scale`` with ``quantized``'s element type, where both are known."""
    shape, dtype = getattr(scale, "shape", None), getattr(quantized, "dtype", None)
    if shape is None or dtype is None or not shape.is_static():
        return op.CastLike(op.ConstantOfShape(op.Shape(scale)), quantized)
    zeros = np.zeros(tuple(shape.numpy()), dtype=dtype.numpy())
    return op.Constant(value=ir.tensor(zeros))


TRANSLATIONS = {
    QUANTIZE_DEQUANTIZE: _quantize_dequantize,
    DEQUANTIZE_PER_CHANNEL: _dequantize_per_channel,
}
