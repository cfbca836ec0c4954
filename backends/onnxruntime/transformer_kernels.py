"""The float kernels a transformer runs in an unoptimised ONNX Runtime CPU session, re-computed bit for bit.

Each was read from ONNX Runtime's source where its source is public and checked element by
element against ONNX Runtime 1.32's CPU provider on x86-64 with AVX-512F (``tests/backends/
onnxruntime/test_transformer_kernels.py``); where the source and the runtime disagreed, the
runtime's behaviour was measured:

* MatMul (MLAS SGEMM, B not pre-packed): per output element, one FMA chain from zero over each K
  slice of :func:`~backends.onnxruntime.kernels.sgemm_chunk_k` (set by N and K), the slice sums
  added in order. Threads split M or N but never K, so the thread count changes no bit.
* Softmax (MLAS ``MlasComputeSoftmax`` with the AVX-512F sum-exp kernel): ``x - max`` clamped at
  -103.97 (measured; the public source clamps at -88.38), ``exp`` as a degree-6 polynomial on the
  Cody-Waite reduced argument scaled by ``vscalefps`` (subnormal results kept); the exponentials
  summed in 16 lanes, the lanes folded 16 -> 8 by halves, then adjacent pairs; each exponential
  times ``1 / sum``.
* Erf (MLAS's FMA3 kernel): an odd polynomial below 0.921875, ``1 - exp(-q(|x|))`` above, with
  |x| clamped at 3.925 (the 3.725 of the public source does not reproduce the runtime).
* LayerNormalization (measured): the mean is the float64 sum over the row divided by its length,
  rounded to float32; the variance is an FMA chain of squared deviations from that float32 mean in
  8 lanes, folded by halves, any tail squared and added after, divided by the length; then
  ``1 / sqrt(var + eps)`` in float32 and ``y = fma((x - mean) * inv_std, scale, bias)``.

Each kernel returns None where the runtime takes a path not emulated here (an M=1 SGEMM, a
row shorter than 8, a CPU without AVX-512F); the caller then runs PyTorch's op.
"""

from __future__ import annotations

import functools
import logging

import torch

from backends.onnxruntime.kernels import _chains, fma32, sgemm_chunk_k

logger = logging.getLogger(__name__)

_FLOAT32 = torch.float32
_ROW_BLOCK = 1024  # rows per MatMul pass: keeps a pass's float64 partial sums in cache

# MLAS's MlasExpConstants (compute.cpp): the sum-exp kernel's range, rounding bias and polynomial.
_EXP_LOWER = -88.3762626647949
_SOFTMAX_LOWER = -103.9720840454  # measured: the runtime's softmax keeps exp(-100), so not -88.38 as in the source
_ROUNDING_BIAS = 12582912.0  # 1.5 * 2**23: adding it rounds to an integer
_LOG2_RECIPROCAL = 1.44269504088896341
_LOG2_HIGH = -6.93145752e-1
_LOG2_LOW = -1.42860677e-6
_EXP_POLY = (float.fromhex("0x1.694000p-10"), float.fromhex("0x1.125edcp-7"), float.fromhex("0x1.555b5ap-5"),
             float.fromhex("0x1.555450p-3"), float.fromhex("0x1.fffff6p-2"), 1.0, 1.0)

# MLAS's MlasErfConstants (erf.cpp), with the upper clamp the runtime applies.
_ERF_UPPER = 3.925
_ERF_SPLIT = 0.921875
_ERF_SMALL = (-5.99104969e-4, 4.99339588e-3, -2.67667342e-2, 1.12818025e-1, -3.76124859e-1, 1.28379151e-1)
_ERF_BIG = (1.72948930e-5, -3.83208680e-4, 3.88393435e-3, -2.42545605e-2, 1.06777847e-1, 6.34846687e-1,
            1.28717512e-1)
_ERF_EXP = (1.38319808e-3, 8.37550033e-3, 4.16689515e-2, 1.66664466e-1, 4.99999851e-1, 1.0, 1.0)

_LAYER_NORM_LANES = 8
_SOFTMAX_LANES = 16


@functools.cache
def avx512f() -> bool:
    """Whether ONNX Runtime picks its AVX-512F kernels on this CPU (the softmax emulated here is that one)."""
    from backends.onnxruntime.isa import detect_isa

    isa = detect_isa()
    return isa.machine in ("x86_64", "amd64") and "avx512f" in isa.flags


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=_FLOAT32)


def _horner(coefficients: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    """``((c0 * x + c1) * x + c2) ...`` with one rounding per step (an FMA chain)."""
    result = torch.full_like(x, coefficients[0])
    for coefficient in coefficients[1:]:
        result = fma32(result, x, _f32(coefficient).expand_as(x))
    return result


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """``2 ** e`` for integral float32 ``e`` in [-126, 127], exactly, from its bits (as ``vpslld`` builds it)."""
    return ((exponent.to(torch.int32) + 127) << 23).view(_FLOAT32)


def _scale(mantissa: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """``vscalefps``: ``mantissa * 2 ** exponent`` with one rounding, into the subnormal range too."""
    return (mantissa.double() * torch.exp2(exponent.double())).to(_FLOAT32)


# --------------------------------------------------------------------------------------------
# MatMul


def mlas_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """ONNX MatMul of float32 tensors (rank >= 2, NumPy broadcasting) as MLAS's SGEMM computes it."""
    if a.dim() < 2 or b.dim() < 2 or a.shape[-2] == 1:
        return None  # vectors and single rows take other kernels
    a, b = a.to(_FLOAT32), b.to(_FLOAT32)
    depth, columns = a.shape[-1], b.shape[-1]
    chunk = sgemm_chunk_k(columns, depth)
    blocks = [[(0, k) for k in range(start, min(start + chunk, depth))] for start in range(0, depth, chunk)]
    if b.dim() == 2:
        rows = a.reshape(-1, depth)
        wide_b = b.double()
        parts = [_chains(blocks, lambda _, k, part=part: (part[:, k:k + 1], wide_b[k:k + 1]))
                 for part in rows.double().split(_ROW_BLOCK)]
        return torch.cat(parts).reshape(*a.shape[:-1], columns)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    wide_a = a.expand(*batch, *a.shape[-2:]).double()
    wide_b = b.expand(*batch, *b.shape[-2:]).double()
    return _chains(blocks, lambda _, k: (wide_a[..., k:k + 1], wide_b[..., k:k + 1, :]))


# --------------------------------------------------------------------------------------------
# Softmax


def mlas_softmax(x: torch.Tensor, dim: int) -> torch.Tensor | None:
    """ONNX Softmax (opset 13) over ``dim`` as MLAS's AVX-512F kernels compute it."""
    if not avx512f() or x.numel() == 0:
        return None
    moved = x.to(_FLOAT32).movedim(dim, -1)
    exponentials = _sum_exp_terms(moved - moved.amax(dim=-1, keepdim=True))
    total = _lane_sum(exponentials)
    return (exponentials * (1.0 / total).unsqueeze(-1)).movedim(-1, dim)


def _sum_exp_terms(shifted: torch.Tensor) -> torch.Tensor:
    """MlasComputeSumExpF32KernelAvx512F's exponential of ``x - max`` (already subtracted)."""
    v = torch.clamp_min(shifted, _SOFTMAX_LOWER)
    biased = fma32(v, _f32(_LOG2_RECIPROCAL).expand_as(v), _f32(_ROUNDING_BIAS).expand_as(v))
    m = biased - _ROUNDING_BIAS
    v = fma32(m, _f32(_LOG2_HIGH).expand_as(v), v)
    v = fma32(m, _f32(_LOG2_LOW).expand_as(v), v)
    return _scale(_horner(_EXP_POLY, v), m)


def _lane_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of the last axis in 16 lanes (zero-padded), folded 16 -> 8 by halves, then adjacent pairs."""
    pad = (-values.shape[-1]) % _SOFTMAX_LANES
    padded = torch.nn.functional.pad(values, (0, pad))
    lanes = functools.reduce(torch.add, padded.split(_SOFTMAX_LANES, dim=-1))
    folded = lanes[..., :8] + lanes[..., 8:]
    pairs = folded[..., 0::2] + folded[..., 1::2]
    return (pairs[..., 0] + pairs[..., 1]) + (pairs[..., 2] + pairs[..., 3])


# --------------------------------------------------------------------------------------------
# Erf and GELU


def mlas_erf(x: torch.Tensor) -> torch.Tensor | None:
    """ONNX Erf as MLAS's FMA3 kernel computes it (AVX2 and AVX-512 machines)."""
    if not avx512f():
        return None
    x = x.to(_FLOAT32)
    a = torch.clamp_max(x.abs(), _ERF_UPPER)
    small = fma32(_horner(_ERF_SMALL, a * a), a, a)
    big_input = torch.where(a >= _ERF_SPLIT, a, torch.zeros((), dtype=_FLOAT32))
    q = fma32(_horner(_ERF_BIG, big_input), big_input, big_input)
    exponent = torch.clamp_min(-q, _EXP_LOWER)
    rounding = _f32(_ROUNDING_BIAS).expand_as(exponent)
    r = fma32(_f32(_LOG2_RECIPROCAL).expand_as(exponent), exponent, rounding) - _ROUNDING_BIAS
    reduced = fma32(r, _f32(_LOG2_HIGH).expand_as(r), exponent)
    reduced = fma32(r, _f32(_LOG2_LOW).expand_as(r), reduced)
    big = 1.0 - _horner(_ERF_EXP, reduced) * _pow2(r.trunc())
    magnitude = torch.where(a >= _ERF_SPLIT, big, small)
    return torch.where(torch.signbit(x), -magnitude, magnitude)


def onnx_gelu(x: torch.Tensor) -> torch.Tensor | None:
    """GELU as exported to ONNX and run: ``x * (0.5 * (Erf(x / sqrt(2)) + 1))``, each op rounded to float32."""
    erf = mlas_erf(x.to(_FLOAT32) / _f32(2.0**0.5))
    return None if erf is None else x.to(_FLOAT32) * (0.5 * (erf + 1.0))


# --------------------------------------------------------------------------------------------
# LayerNormalization


def ort_layer_norm(x: torch.Tensor, length: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor | None:
    """ONNX LayerNormalization over the last ``length`` elements of each row, as ONNX Runtime 1.32 computes it."""
    if length < _LAYER_NORM_LANES or not avx512f():
        return None
    rows = x.to(_FLOAT32).reshape(-1, length)
    mean = (rows.double().sum(dim=1) / length).to(_FLOAT32).unsqueeze(1)
    centered = rows - mean
    inv_std = 1.0 / _sqrt(_variance(centered, length) + _f32(eps))
    normalized = centered * inv_std.unsqueeze(1)
    scale = torch.ones(length, dtype=_FLOAT32) if weight is None else weight.to(_FLOAT32).reshape(length)
    shift = torch.zeros(length, dtype=_FLOAT32) if bias is None else bias.to(_FLOAT32).reshape(length)
    result = fma32(normalized, scale.expand_as(normalized), shift.expand_as(normalized))
    return result.reshape(x.shape)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded float32 square root (``sqrtss``): PyTorch's vectorised float32 sqrt is not, always."""
    return torch.sqrt(x.double()).to(_FLOAT32)


def _variance(centered: torch.Tensor, length: int) -> torch.Tensor:
    body = length // _LAYER_NORM_LANES * _LAYER_NORM_LANES
    lanes = torch.zeros(centered.shape[0], _LAYER_NORM_LANES, dtype=_FLOAT32)
    for start in range(0, body, _LAYER_NORM_LANES):
        block = centered[:, start:start + _LAYER_NORM_LANES]
        lanes = fma32(block, block, lanes)
    while lanes.shape[1] > 1:
        half = lanes.shape[1] // 2
        lanes = lanes[:, :half] + lanes[:, half:]
    total = lanes[:, 0]
    for index in range(body, length):
        total = total + centered[:, index] * centered[:, index]
    return total / length
