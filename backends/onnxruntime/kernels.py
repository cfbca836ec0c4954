"""ONNX Runtime's CPU kernel arithmetic (MLAS, x86-64), re-computed in PyTorch bit for bit.

Read from MLAS's source and checked element by element against real sessions (see
``tests/backends/onnxruntime/test_emulation.py``). The integer kernels:

* QuantizeLinear / DequantizeLinear: ``clamp(RNE(x / s)) + zp`` (a true float32 division) and
  ``fl32((q - zp) * s)``.
* Requantisation (``MlasRequantizeOutput`` and the ConvSym kernels' epilogue, shared by QLinearConv
  and QGemm): ``RNE(clamp(fl32(fl32(acc) * m), qmin - zp, qmax - zp)) + zp``; QLinearConv's
  ``m = fl32(fl32(x_s * w_s) / y_s)``, QGemm's ``fl32(fl32(alpha * a_s) * b_s) [/ y_s]``.
* QLinearAdd: float, not fixed point, on x86. AVX2 (``qladd_avx2.cpp``): ``r = fl32(s_in / s_out)``,
  ``k = fl32(zp_c - fma(r_a, zp_a, fl32(r_b * zp_b)))`` (the compiler contracts that expression into an
  FMA), ``c = sat(RNE(fma(a, r_a, fma(b, r_b, k))))`` with single-rounding FMAs; SSE2 adds unfused.

The float kernels that layers kept in float run in: MLAS's NCHWc convolutions and SGEMM. Their
partial sums are sequential FMA chains whose blocking decides every rounding:

* NCHWc conv (input channels a multiple of the block, 8 with AVX2, 16 with AVX-512): one chain over
  (kernel row, kernel column, channel) per block of input channels; block sums added in order; bias last.
* pointwise (1x1, no padding): one chain per 128 input channels; chunk sums added; bias last.
* NCHW input (fewer input channels than a block): one chain over the kernel per input channel.
* depthwise: one chain over the kernel.
* SGEMM (Gemm): the output starts as the bias; one chain per 256 of K, each added to it.
* ReduceMean over trailing axes: Eigen's vectorised sum (see :func:`eigen_mean`), divided by the count.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_FLOAT32 = torch.float32
_LOW29 = (1 << 29) - 1  # float64 bits below float32 precision
_HALF29 = 1 << 28  # a float64 that lies exactly halfway between two float32 values
POINTWISE_CHUNK = 128  # input channels per pointwise kernel call (MLAS's ICSTRIDE)
SGEMM_STRIDE_K = 256  # K per SGEMM pass
EIGEN_PACKET = 4  # floats per Eigen packet: ONNX Runtime's x86-64 builds compile Eigen for SSE


@dataclass(frozen=True)
class QParams:
    """One activation quantiser's grid ``(q - zero_point) * scale`` with ``q`` in ``[qmin, qmax]``."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    @property
    def scale32(self) -> torch.Tensor:
        """The scale as the runtime stores it (float32)."""
        return torch.tensor(self.scale, dtype=_FLOAT32)


# --------------------------------------------------------------------------------------------
# Integer kernels


def quantize(x: torch.Tensor, grid: QParams) -> torch.Tensor:
    """QuantizeLinear, as float32 integers: ``clamp(RNE(x / scale)) + zero_point``."""
    quotient = x.to(_FLOAT32) / grid.scale32
    return torch.round(quotient.clamp(grid.qmin - grid.zero_point, grid.qmax - grid.zero_point)) + grid.zero_point


def dequantize(q: torch.Tensor, grid: QParams) -> torch.Tensor:
    """DequantizeLinear: ``fl32((q - zero_point) * scale)``."""
    return (q - grid.zero_point).to(_FLOAT32) * grid.scale32


def requantize(accumulator: torch.Tensor, multiplier: torch.Tensor, grid: QParams) -> torch.Tensor:
    """MlasRequantizeOutput: ``RNE(clamp(fl32(fl32(acc) * multiplier))) + zero_point``, as float32 integers."""
    value = accumulator.to(_FLOAT32) * multiplier
    value = value.clamp(grid.qmin - grid.zero_point, grid.qmax - grid.zero_point)
    return torch.round(value) + grid.zero_point


def qlinear_add(a: torch.Tensor, a_grid: QParams, b: torch.Tensor, b_grid: QParams, grid: QParams,
                fused: bool = True) -> torch.Tensor:
    """QLinearAdd of the integers ``a`` and ``b``: MLAS's AVX2 kernel (``fused``) or its SSE2 kernel."""
    ratio_a, ratio_b = a_grid.scale32 / grid.scale32, b_grid.scale32 / grid.scale32
    zero_a, zero_b, offset = (torch.tensor(float(value), dtype=_FLOAT32)
                              for value in (a_grid.zero_point, b_grid.zero_point, grid.zero_point))
    if not fused:
        return _saturate(offset - (ratio_a * zero_a + ratio_b * zero_b) + a * ratio_a + b * ratio_b, grid)
    offset = offset - fma32(ratio_a, zero_a, ratio_b * zero_b)
    if a.numel() == 1 or b.numel() == 1:  # the scalar input is folded into the offset, unfused
        (scalar, scalar_ratio), (other, ratio) = sorted(((a, ratio_a), (b, ratio_b)), key=lambda pair: pair[0].numel())
        return _saturate(fma32(other, ratio, offset + scalar.reshape(()) * scalar_ratio), grid)
    a, b = torch.broadcast_tensors(a, b)
    return _saturate(fma32(a, ratio_a, fma32(b, ratio_b, offset)), grid)


def _saturate(value: torch.Tensor, grid: QParams) -> torch.Tensor:
    """``cvtps2dq`` (RNE; out of int32 range gives INT_MIN) then the saturating packs to 8 bits."""
    rounded = torch.round(value).clamp(grid.qmin, grid.qmax)
    return torch.where(value.abs() >= 2.0**31, torch.tensor(float(grid.qmin)), rounded)


# --------------------------------------------------------------------------------------------
# Single-rounding float32 arithmetic


def fma32(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A float32 fused multiply-add ``x * y + z`` with one rounding, as ``vfmadd`` computes it."""
    return multiply_add(z.to(_FLOAT32), x.double(), y.double(), exact=True)


def multiply_add(total: torch.Tensor, left: torch.Tensor, right: torch.Tensor, *, exact: bool) -> torch.Tensor:
    """``fl32(total + left * right)`` for float32 ``total`` and float64 factors holding float32 values.

    The product is exact in float64 and the float64 sum is within half a float64 step of the exact
    sum, so rounding it to float32 is the fused result unless it lands exactly on a float32
    midpoint. With ``exact`` such sums are nudged one float64 step toward the exact value
    (rounding to odd, with TwoSum's error term); without, they are left: a double rounding, with
    probability about 2**-29 per multiply-add, for a quarter of the cost.
    """
    result = torch.addcmul(total, left, right)
    if exact:
        midpoint = (result.view(torch.int64) & _LOW29) == _HALF29
        if bool(midpoint.any()):
            result = _round_to_odd(result, left * right, total.double(), midpoint)
    return result.to(_FLOAT32)


def _round_to_odd(total: torch.Tensor, product: torch.Tensor, addend: torch.Tensor,
                  where: torch.Tensor) -> torch.Tensor:
    virtual = total - product
    error = (product - (total - virtual)) + (addend - virtual)
    toward = torch.where(error > 0, torch.inf, -torch.inf).to(torch.float64)
    return torch.where(where & (error != 0), torch.nextafter(total, toward), total)


#: Whether the float kernels' FMA chains correct double roundings too (see :func:`multiply_add`): about four
#: times slower, for an event of probability about 2**-29 per multiply-add that has never changed an output.
EXACT_CHAINS = False


def _chains(blocks: list[list[tuple[int, int]]], factors: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
            start: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of FMA chains: each block is one chain from zero over its ``factors(c, k)``; blocks add in order."""
    total = start
    for block in blocks:
        partial = _chain(block, factors)
        total = partial if total is None else total + partial
    return total


def _chain(block: list[tuple[int, int]], factors: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
           ) -> torch.Tensor:
    left, right = factors(*block[0])
    partial = (left * right).to(_FLOAT32)
    wide = torch.empty(partial.shape, dtype=torch.float64)
    for channel, tap in block[1:]:
        left, right = factors(channel, tap)
        if EXACT_CHAINS:
            partial = multiply_add(partial, left, right, exact=True)
        else:  # in place: the chain is memory bound
            torch.addcmul(partial, left, right, out=wide)
            partial.copy_(wide)
    return partial


# --------------------------------------------------------------------------------------------
# Float kernels


@functools.cache
def nchwc_block_size() -> int:
    """MLAS's NCHWc channel block on this CPU: 16 with AVX-512F, 8 with AVX2, 0 where NCHWc is not used."""
    from backends.onnxruntime.isa import detect_isa

    isa = detect_isa()
    if isa.machine not in ("x86_64", "amd64"):
        return 0
    return 16 if "avx512f" in isa.flags else 8 if "avx2" in isa.flags else 0


@functools.cache
def qlinear_add_fused() -> bool:
    """Whether this CPU runs MLAS's AVX2 (FMA) QLinearAdd kernel rather than the SSE2 one (older x86)."""
    from backends.onnxruntime.isa import detect_isa

    isa = detect_isa()
    return isa.machine not in ("x86_64", "amd64", "i686", "x86") or "avx2" in isa.flags


def nchwc_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
                 groups: int, block: int) -> torch.Tensor | None:
    """A float conv as MLAS's NCHWc kernels compute it; None where ONNX Runtime does not use them."""
    channels, kernel = x.shape[1], tuple(weight.shape[2:])
    depthwise = groups > 1 and weight.shape[1] == 1 and weight.shape[0] == groups
    schedule = _conv_schedule(channels, weight.shape[0], kernel, padding, groups, depthwise, block)
    if schedule is None:
        return None
    columns = F.unfold(x.to(_FLOAT32), kernel, dilation=dilation, padding=padding, stride=stride)
    columns = columns.double().reshape(x.shape[0], channels, -1, columns.shape[-1])
    taps = weight.double().reshape(weight.shape[0], weight.shape[1], -1)
    if depthwise:
        def factors(channel, tap):
            return columns[:, :, tap], taps[:, 0, tap].reshape(1, -1, 1)
    else:
        def factors(channel, tap):
            return columns[:, channel, tap].unsqueeze(1), taps[:, channel, tap].reshape(1, -1, 1)
    result = _chains(schedule, factors)
    if bias is not None:
        result = result + bias.to(_FLOAT32).reshape(1, -1, 1)
    height = (x.shape[2] + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    return result.reshape(x.shape[0], weight.shape[0], height, -1)


def _conv_schedule(channels: int, outputs: int, kernel: tuple[int, int], padding, groups: int, depthwise: bool,
                   block: int) -> list[list[tuple[int, int]]] | None:
    """The FMA chains of ONNX Runtime's NCHWc transformer's choice of kernel (its conditions, in order)."""
    taps = range(kernel[0] * kernel[1])
    if block == 0 or (groups > 1 and (outputs % block or not depthwise)):
        return None  # not NCHWc (grouped non-depthwise NCHWc convs are not emulated either)
    if depthwise:
        return [[(0, tap) for tap in taps]]
    if channels < block:
        return [[(channel, tap) for tap in taps] for channel in range(channels)]
    if channels % block:
        return None
    if kernel == (1, 1) and not any(padding):
        return [[(channel, 0) for channel in range(start, min(start + POINTWISE_CHUNK, channels))]
                for start in range(0, channels, POINTWISE_CHUNK)]
    return [[(channel, tap) for tap in taps for channel in range(start, start + block)]
            for start in range(0, channels, block)]


def sgemm_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """ONNX Gemm (``x @ weight.T + bias``, 2-D) as MLAS's SGEMM computes it."""
    inputs, weights = x.double(), weight.double()
    depth = x.shape[1]
    blocks = [[(0, k) for k in range(start, min(start + SGEMM_STRIDE_K, depth))]
              for start in range(0, depth, SGEMM_STRIDE_K)]
    start = None if bias is None else bias.to(_FLOAT32).expand(x.shape[0], weight.shape[0])
    return _chains(blocks, lambda _, k: (inputs[:, k:k + 1], weights[:, k].reshape(1, -1)), start)


def eigen_mean(x: torch.Tensor, dims: int) -> torch.Tensor:
    """ReduceMean over the last ``dims`` axes as ONNX Runtime computes it: an Eigen sum per row, divided by its length.

    Eigen (SSE packets of 4 in ONNX Runtime's x86-64 builds) adds the elements before the first
    16-byte-aligned one and after the last whole packet one by one, the packets in two interleaved
    accumulators, then reduces the packet pairwise; a row's alignment follows from its offset in a
    buffer that is itself aligned.
    """
    length = math.prod(x.shape[x.dim() - dims:])
    rows = x.to(_FLOAT32).reshape(-1, length)
    sums = torch.empty(rows.shape[0], dtype=_FLOAT32)
    offsets = (torch.arange(rows.shape[0]) * length) % EIGEN_PACKET
    for offset in offsets.unique().tolist():
        selected = offsets == offset
        sums[selected] = _eigen_sum(rows[selected], (EIGEN_PACKET - offset) % EIGEN_PACKET)
    return (sums / length).reshape(x.shape[:x.dim() - dims])


def _eigen_sum(rows: torch.Tensor, start: int) -> torch.Tensor:
    """Eigen's vectorised sum of each row whose first ``start`` elements precede the first aligned packet."""
    size, packet = rows.shape[1], EIGEN_PACKET
    start = min(start, size)
    whole = (size - start) // packet * packet
    if whole == 0:
        return functools.reduce(lambda total, column: total + column, rows.unbind(1))
    pairs_end = start + (size - start) // (2 * packet) * (2 * packet)
    accumulator = rows[:, start:start + packet]
    if whole > packet:
        second = rows[:, start + packet:start + 2 * packet]
        for index in range(start + 2 * packet, pairs_end, 2 * packet):
            accumulator = accumulator + rows[:, index:index + packet]
            second = second + rows[:, index + packet:index + 2 * packet]
        accumulator = accumulator + second
        if start + whole > pairs_end:
            accumulator = accumulator + rows[:, pairs_end:pairs_end + packet]
    total = (accumulator[:, 0] + accumulator[:, 2]) + (accumulator[:, 1] + accumulator[:, 3])
    for index in [*range(start), *range(start + whole, size)]:
        total = total + rows[:, index]
    return total


# --------------------------------------------------------------------------------------------
# Float kernels of an unoptimised session (graph optimisations disabled: no NCHWc, no pre-packing)

SGEMM_STRIDE_N = 128  # MLAS_SGEMM_STRIDEN
SGEMM_UNPACKED_STRIDE_K = 128  # MLAS_SGEMM_STRIDEK (the packed-B path takes 256, SGEMM_STRIDE_K)


def sgemm_chunk_k(count_n: int, depth: int) -> int:
    """The K slice MLAS's SGEMM (and MlasConvOperation) take for ``count_n`` columns and depth ``depth``."""
    stride_n, stride_k = SGEMM_STRIDE_N, SGEMM_UNPACKED_STRIDE_K
    if count_n >= depth:
        while stride_k // 2 >= depth:
            stride_k //= 2
    else:
        while stride_n > 16 and stride_n // 2 >= count_n:
            stride_k, stride_n = stride_k * 2, stride_n // 2
    return stride_k


def mlas_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
                groups: int) -> torch.Tensor:
    """A float conv as ONNX Runtime's unoptimised Conv computes it: im2col, then an SGEMM per group.

    The SGEMM sums each K slice (:func:`sgemm_chunk_k`) as one FMA chain and adds the slices in
    order; a group with one filter (a depthwise conv) takes MLAS's M=1 kernel instead, which sums
    four products at a time with separate multiplies and adds. The bias is added last. ``padding``
    is (top, left, bottom, right).
    """
    top, left, bottom, right = padding
    x = F.pad(x.to(_FLOAT32), (left, right, top, bottom))
    kernel = tuple(weight.shape[2:])
    columns = F.unfold(x, kernel, dilation=dilation, stride=stride)  # [batch, C * taps, positions]
    batch, positions = x.shape[0], columns.shape[-1]
    outputs, depth = weight.shape[0], weight.shape[1] * kernel[0] * kernel[1]
    columns = columns.reshape(batch, groups, depth, positions)
    filters = weight.to(_FLOAT32).reshape(groups, outputs // groups, depth)
    if outputs // groups == 1:
        result = _sgemm_m1(filters[:, 0, :], columns, sgemm_chunk_k(positions, depth))
    else:
        chunk = sgemm_chunk_k(positions, depth)
        blocks = [[(0, k) for k in range(start, min(start + chunk, depth))] for start in range(0, depth, chunk)]
        wide_columns, wide_filters = columns.double(), filters.double()
        result = _chains(blocks, lambda _, k: (wide_filters[None, :, :, k:k + 1], wide_columns[:, :, k:k + 1, :]))
    result = result.reshape(batch, outputs, positions)
    if bias is not None:
        result = result + bias.to(_FLOAT32).reshape(1, -1, 1)
    height = (x.shape[2] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    return result.reshape(batch, outputs, height, -1)


def _sgemm_m1(filters: torch.Tensor, columns: torch.Tensor, chunk: int) -> torch.Tensor:
    """MlasSgemmKernelM1Avx per K slice: groups of four products summed left to right, then a pair, then one."""
    depth = filters.shape[-1]
    total = None
    for start in range(0, depth, chunk):
        stop = min(start + chunk, depth)
        for first, size in _m1_steps(start, stop):
            terms = [filters[None, :, k, None] * columns[:, :, k, :] for k in range(first, first + size)]
            partial = functools.reduce(lambda left, right: left + right, terms)
            total = partial if total is None else partial + total
    return total.unsqueeze(2)


def _m1_steps(start: int, stop: int) -> list[tuple[int, int]]:
    """(first k, count) of the M=1 kernel's row groups over ``[start, stop)``: fours, then a two, then a one."""
    steps, k = [], start
    while stop - k >= 4:
        steps.append((k, 4))
        k += 4
    if stop - k >= 2:
        steps.append((k, 2))
        k += 2
    if stop - k == 1:
        steps.append((k, 1))
    return steps
