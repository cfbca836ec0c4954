"""The IR's quantisation ops: custom torch ops whose eager kernels are the int8 simulation.

Each op computes in torch exactly what ONNX Runtime's QuantizeLinear / DequantizeLinear compute
(division by the scale, round half to even, saturation), so a graph holding them is a faithful
fake-quantised simulation of the int8 model. ``backends`` lowers each to the matching ONNX ops
(:mod:`backends.onnx.quant_translations`). Registered on import of this module.
"""

from __future__ import annotations

import torch

NAMESPACE = "fxpress"


@torch.library.custom_op(f"{NAMESPACE}::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """Round ``x`` onto the affine grid ``(q - zero_point) * scale``, ``q`` in ``[qmin, qmax]``."""
    quantized = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return ((quantized - zero_point) * scale).to(x.dtype)


@quantize_dequantize.register_fake
def _(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op(f"{NAMESPACE}::dequantize_per_channel", mutates_args=())
def dequantize_per_channel(quantized: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """``quantized * scale`` with one scale per index along ``axis`` (zero point 0): int8 weights, int32 biases.

    The result has the scale's dtype (float32; float64 for a simulation run in double precision).
    """
    shape = [1] * quantized.dim()
    shape[axis] = -1
    return quantized.to(scale.dtype) * scale.reshape(shape)


@dequantize_per_channel.register_fake
def _(quantized: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.empty(quantized.shape, dtype=scale.dtype, device=quantized.device)


QUANTIZE_DEQUANTIZE = torch.ops.fxpress.quantize_dequantize.default
DEQUANTIZE_PER_CHANNEL = torch.ops.fxpress.dequantize_per_channel.default
