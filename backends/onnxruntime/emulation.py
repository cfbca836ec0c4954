"""Run the quantised IR as ONNX Runtime's CPU execution provider computes it, bit for bit.

The IR's fake-quant ops run in float32 are the *float* simulation of an int8 model. ONNX Runtime
computes something else. Its QDQ selectors fuse groups into integer kernels (QLinearConv, QGemm,
QLinearAdd: :mod:`backends.onnxruntime.qdq_fusion`) whose exact accumulation and float32 requantisation break
rounding ties differently from a float32 convolution followed by a division, and layers left in
float run in MLAS's NCHWc convolutions, SGEMM and Eigen's reductions, whose summation orders
differ from PyTorch's. Each tie broken differently is amplified by the layers after it: on
efficientnet-lite0 the float simulation agrees with the runtime within one output step on only
about 93% of the logits.

:class:`IntegerEmulator` runs each group with its kernel's arithmetic (:mod:`backends.onnxruntime.kernels`)
and the float convs, linears and global means with MLAS's and Eigen's summation orders, where
the runtime picks those kernels; everything else (reshapes, ReLU, max-pooling, float adds) is
exact in float32 and runs as in the float simulation. On efficientnet-lite0 and resnet18 the
result equals the runtime's bit for bit. The arithmetic is that of ONNX Runtime's x86-64 builds
(AVX2 or AVX-512); elsewhere the float layers run as PyTorch runs them.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from backends.onnxruntime.kernels import (
    QParams,
    dequantize,
    eigen_mean,
    mlas_conv2d,
    nchwc_block_size,
    nchwc_conv2d,
    qlinear_add,
    qlinear_add_fused,
    quantize,
    requantize,
    sgemm_linear,
)
from backends.onnxruntime.qdq_fusion import Group, bias_of, find_groups, grid_of
from backends.onnxruntime.transformer_kernels import mlas_matmul, mlas_softmax, onnx_gelu, ort_layer_norm
from compiler import ir
from compiler.errors import EmulationError
from compiler.quant_ops import DEQUANTIZE_PER_CHANNEL, QUANTIZE_DEQUANTIZE

logger = logging.getLogger(__name__)

_FLOAT32_EXACT = float(2**24)  # integers, and sums of them, up to this magnitude are exact in float32


def grid_integers(x: torch.Tensor, grid: QParams, where: fx.Node) -> torch.Tensor:
    """The integers ``q`` (as float32) with ``dequantize(q) == x``: the runtime's uint8/int8 tensor.

    ``x / scale`` in float32 is within ``255 * 2**-23`` of ``q - zero_point``, so rounding recovers it exactly.
    """
    x = x.to(torch.float32)
    q = torch.round(x / grid.scale32) + grid.zero_point
    if not torch.equal(dequantize(q, grid), x):
        raise EmulationError(
            f"the input of {where.name} ({ir.module_path(where) or 'no module'}) is not on its quantisation grid "
            f"(scale {grid.scale:g}, zero point {grid.zero_point}); an op between its quantiser and it changes values"
        )
    return q


# --------------------------------------------------------------------------------------------
# The interpreter.


class IntegerEmulator(fx.Interpreter):
    """Runs the quantised IR as ONNX Runtime's CPU kernels compute it (see the module docstring).

    A group's anchor computes the whole group and yields what its output quantiser yields (the
    dequantised integers; for a float-output QGemm, the float result); the absorbed activation
    and quantiser pass that value on. Other quantisers quantise and dequantise with the runtime's
    arithmetic, float convs and linears run as MLAS's FMA chains where the runtime would use
    them, and every other node runs as in the float simulation.
    """

    def __init__(self, gm: fx.GraphModule, *, fused_add: bool | None = None, float_kernels: bool = True):
        super().__init__(gm)
        self.groups = {group.anchor: group for group in find_groups(gm)}
        self._absorbed = {node: group for group in self.groups.values() for node in group.absorbed}
        self._unfused: set[fx.Node] = set()  # anchors whose input turned out not to fit the fused kernel
        self._fused_add = qlinear_add_fused() if fused_add is None else fused_add
        self._block = nchwc_block_size() if float_kernels else 0
        self._dtypes: dict[fx.Node, torch.dtype] = {}

    def run_node(self, node: fx.Node) -> object:
        """One node: a whole group at its anchor, a pass-through for absorbed nodes, else as the runtime runs it."""
        if node in self.groups and self._fits(self.groups[node]):
            return self._run_group(self.groups[node])
        if node in self._absorbed and self._absorbed[node].anchor not in self._unfused:
            return self.env[node.args[0]]
        if node.target is QUANTIZE_DEQUANTIZE:
            x, grid = self.env[node.args[0]], grid_of(node)
            return dequantize(quantize(x, grid), grid)
        result = self._float_kernel(node) if self._block else None
        return super().run_node(node) if result is None else result

    def _fits(self, group: Group) -> bool:
        """A linear reading a tensor of rank above 2 is exported as MatMul + Add, which is not a QGemm."""
        if group.kind == "gemm" and self.env[group.anchor.args[0]].dim() != 2:
            self._unfused.add(group.anchor)
            return False
        return True

    def _run_group(self, group: Group) -> torch.Tensor:
        anchor = group.anchor
        sources = [grid_integers(self.env[arg], grid, anchor)
                   for arg, grid in zip(anchor.args[:len(group.inputs)], group.inputs, strict=True)]
        if group.kind == "add":
            return dequantize(qlinear_add(sources[0], group.inputs[0], sources[1], group.inputs[1], group.output,
                                          self._fused_add), group.output)
        accumulator = self._accumulate(group, sources[0] - group.inputs[0].zero_point)
        multiplier = self._multiplier(group)
        if group.kind == "conv":
            multiplier = multiplier.reshape((-1,) + (1,) * (accumulator.dim() - 2))
        if group.output is None:
            return accumulator.to(torch.float32) * multiplier
        return dequantize(requantize(accumulator, multiplier, group.output), group.output)

    def _accumulate(self, group: Group, centered: torch.Tensor) -> torch.Tensor:
        """``sum((x_q - x_zp) * w_q) + b_q``, exactly, as float64."""
        anchor, grid = group.anchor, group.inputs[0]
        weight = self.fetch_attr(anchor.args[1].args[0].target)
        if anchor not in self._dtypes:
            self._dtypes[anchor] = _exact_dtype(max(grid.zero_point - grid.qmin, grid.qmax - grid.zero_point), weight)
        dtype = self._dtypes[anchor]
        if group.kind == "conv":
            options = {key: value for key, value in anchor.kwargs.items() if key != "bias"}
            products = anchor.target(centered.to(dtype), weight.to(dtype), None, *anchor.args[3:], **options)
        else:
            products = centered.to(dtype) @ weight.to(dtype).T
        accumulator = products.double()
        bias = bias_of(anchor)
        if bias is not None:
            shape = (-1,) + (1,) * (accumulator.dim() - 2) if group.kind == "conv" else (-1,)
            accumulator = accumulator + self.fetch_attr(bias.args[0].target).double().reshape(shape)
        return accumulator

    def _multiplier(self, group: Group) -> torch.Tensor:
        """Per output channel: QLinearConv's ``x_s * w_s / y_s``; QGemm's ``(alpha * a_s) * b_s [/ y_s]``, alpha 1."""
        weight_scale = self.fetch_attr(group.anchor.args[1].args[1].target).to(torch.float32)
        multiplier = group.inputs[0].scale32 * weight_scale
        return multiplier if group.output is None else multiplier / group.output.scale32

    def _float_kernel(self, node: fx.Node) -> torch.Tensor | None:
        """A float conv, 2-D linear or global mean as MLAS and Eigen compute it; None: run it as PyTorch does."""
        kernel = _FLOAT_KERNELS.get(ir.op_name(node))
        if kernel is None:
            return None
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        return kernel(node, args, kwargs, self._block)


def _conv_kernel(node: fx.Node, args: tuple, kwargs: dict, block: int) -> torch.Tensor | None:
    stride, padding, dilation, groups = _conv_options(args)
    if not (_constant(node.args[1]) and _constant(bias_of(node))) or isinstance(padding, str) or args[0].dim() != 4:
        return None  # NCHWc needs initializer weights: a DQ'd weight runs in the generic Conv
    if any(key != "bias" for key in kwargs):
        return None
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return nchwc_conv2d(args[0], args[1], bias, stride, padding, dilation, groups, block)


def _linear_kernel(node: fx.Node, args: tuple, kwargs: dict, block: int) -> torch.Tensor | None:
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return sgemm_linear(args[0], args[1], bias) if args[0].dim() == 2 else None  # else MatMul + Add


def _pool_kernel(node: fx.Node, args: tuple, kwargs: dict, block: int) -> torch.Tensor | None:
    x, size = args[0], args[1]
    if x.dim() != 4 or tuple(size if isinstance(size, list | tuple) else [size]) not in ((1,), (1, 1)):
        return None
    return eigen_mean(x, 2).reshape(*x.shape[:2], 1, 1)


def _mean_kernel(node: fx.Node, args: tuple, kwargs: dict, block: int) -> torch.Tensor | None:
    x = args[0]
    dims = sorted(dim % x.dim() for dim in (args[1] if len(args) > 1 else kwargs.get("dim") or ()))
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if not dims or dims != list(range(x.dim() - len(dims), x.dim())) or kwargs.get("dtype") is not None:
        return None
    mean = eigen_mean(x, len(dims))
    return mean.reshape(*mean.shape, *([1] * len(dims))) if keepdim else mean


_FLOAT_KERNELS = {
    "aten.conv2d": _conv_kernel, "aten.linear": _linear_kernel, "aten.adaptive_avg_pool2d": _pool_kernel,
    "aten.mean": _mean_kernel,
}


def _constant(node: object) -> bool:
    """Whether a weight is an initializer once exported (NCHWc needs one), or an absent bias.

    A tensor computed from attributes alone is folded by the exporter; a dequantised weight is
    not (its conv runs in the generic kernel, which is not emulated).
    """
    if node is None or isinstance(node, fx.Node) and node.op == "get_attr":
        return True
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is not DEQUANTIZE_PER_CHANNEL
            and bool(node.all_input_nodes) and all(_constant(source) for source in node.all_input_nodes))


def _conv_options(args: tuple) -> tuple:
    def pair(value, default):
        value = default if value is None else value
        return tuple(value) * (2 if len(tuple(value)) == 1 else 1) if isinstance(value, list | tuple) else (value,) * 2

    stride, padding, dilation = (pair(args[index] if len(args) > index else None, 1 if index != 4 else 0)
                                 for index in (3, 4, 5))
    if len(args) > 4 and isinstance(args[4], str):
        padding = args[4]
    return stride, padding, dilation, args[6] if len(args) > 6 else 1


def _exact_dtype(inputs_bound: float, weight: torch.Tensor) -> torch.dtype:
    """float32 where every partial sum of ``|x| <= inputs_bound`` times a weight row stays below 2**24, else float64."""
    row_sums = weight.abs().double().reshape(weight.shape[0], -1).sum(dim=1)
    return torch.float32 if inputs_bound * float(row_sums.max()) < _FLOAT32_EXACT else torch.float64


def emulate(gm: fx.GraphModule, *inputs: torch.Tensor, fused_add: bool | None = None,
            float_kernels: bool = True) -> tuple[torch.Tensor, ...]:
    """Run ``gm`` as ONNX Runtime's CPU execution provider would; return the flat outputs.

    Args:
        gm: the optimised IR (with ``fxpress`` quantisation ops; a float IR runs as MLAS runs it).
        *inputs: the model's inputs.
        fused_add: emulate MLAS's AVX2 (FMA) QLinearAdd kernel, else its SSE2 one; default: this CPU's
            (ARM's fixed-point kernel is not emulated: within a step there, not bit for bit).
        float_kernels: run float convs, 2-D linears and global means in MLAS's and Eigen's summation
            orders (on x86-64; the slower part of the emulation); False runs them as PyTorch does.

    Raises:
        EmulationError: a quantised op's input is not on its grid (an op the emulation does not know
            sits between a quantiser and an integer kernel).
    """
    emulator = IntegerEmulator(gm, fused_add=fused_add, float_kernels=float_kernels)
    logger.debug("emulating %s: %d integer kernels, float kernels %s", type(gm).__name__, len(emulator.groups),
                 "MLAS" if emulator._block else "PyTorch")
    with torch.no_grad(), _ieee_float32():
        outputs = emulator.run(*inputs)
    return tuple(pytree.tree_leaves(outputs))


class UnoptimizedEmulator(fx.Interpreter):
    """Runs the quantised IR as an ONNX Runtime CPU session with graph optimisations disabled computes it.

    Every QuantizeLinear, DequantizeLinear and float op then runs on its own: quantisers with the
    runtime's arithmetic, convs as MLAS's im2col + SGEMM (:func:`~backends.onnxruntime.kernels.mlas_conv2d`),
    global means as Eigen's; the rest as in the float simulation. This is the ONNX reference semantics
    of a Q/DQ model (what TensorRT-style artifacts are checked against on a CPU).
    """

    def run_node(self, node: fx.Node) -> object:
        """One node, with the unoptimised session's arithmetic where it has its own."""
        if node.target is QUANTIZE_DEQUANTIZE:
            x, grid = self.env[node.args[0]], grid_of(node)
            return dequantize(quantize(x, grid), grid)
        name = ir.op_name(node)
        if name == "aten.conv2d":
            args, _ = self.fetch_args_kwargs_from_env(node)
            stride, padding, dilation, groups = _conv_options(args)
            if not isinstance(padding, str) and args[0].dim() == 4:
                bias = args[2] if len(args) > 2 else None
                return mlas_conv2d(args[0], args[1], bias, stride, padding * 2, dilation, groups)
        kernel = _FLOAT_KERNELS.get(name) if name in ("aten.adaptive_avg_pool2d", "aten.mean") else None
        kernel = kernel or _TRANSFORMER_KERNELS.get(name)
        if kernel is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            result = kernel(node, args, kwargs, 0)
            if result is not None:
                return result
        return super().run_node(node)


def _matmul_kernel(node: fx.Node, args: tuple, kwargs: dict, block: int) -> torch.Tensor | None:
    return mlas_matmul(args[0], args[1]) if not kwargs else None


def _linear_matmul_kernel(node: fx.Node, args: tuple, kwargs: dict, block: int) -> torch.Tensor | None:
    """A linear on a tensor of rank above 2 is exported as MatMul, then Add of the bias."""
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if x.dim() <= 2:
        return None  # exported as Gemm
    product = mlas_matmul(x, weight.t())
    return product if product is None or bias is None else product + bias.to(torch.float32)


def _softmax_kernel(node: fx.Node, args: tuple, kwargs: dict, block: int) -> torch.Tensor | None:
    if len(args) > 2 and args[2] not in (None, False) or kwargs.get("dtype") is not None:
        return None
    return mlas_softmax(args[0], args[1])


def _gelu_kernel(node: fx.Node, args: tuple, kwargs: dict, block: int) -> torch.Tensor | None:
    approximate = args[1] if len(args) > 1 else kwargs.get("approximate", "none")
    return onnx_gelu(args[0]) if approximate == "none" else None


def _layer_norm_kernel(node: fx.Node, args: tuple, kwargs: dict, block: int) -> torch.Tensor | None:
    x, shape = args[0], args[1]
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    bias = args[3] if len(args) > 3 else kwargs.get("bias")
    eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
    return ort_layer_norm(x, math.prod(shape), weight, bias, eps)


_TRANSFORMER_KERNELS = {
    "aten.linear": _linear_matmul_kernel, "aten.matmul": _matmul_kernel, "aten.softmax": _softmax_kernel,
    "aten._softmax": _softmax_kernel, "aten.gelu": _gelu_kernel, "aten.layer_norm": _layer_norm_kernel,
}


def emulate_unoptimized(gm: fx.GraphModule, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run ``gm`` as an ONNX Runtime CPU session with graph optimisations disabled would; return the flat outputs."""
    with torch.no_grad(), _ieee_float32():
        outputs = UnoptimizedEmulator(gm).run(*inputs)
    return tuple(pytree.tree_leaves(outputs))


@contextlib.contextmanager
def _ieee_float32() -> Iterator[None]:
    """Integer-valued float32 convs and matmuls are exact only without reduced-precision (bf16/TF32) shortcuts."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
