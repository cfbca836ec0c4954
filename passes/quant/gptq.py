"""``gptq``: round each layer's weights to minimise the error of its output, not of its weights.

Rounding every weight to its nearest integer step (what ``insert_qdq`` does alone) ignores that
a layer's inputs are correlated: neighbouring pixels of an image, channels that fire together.
GPTQ (Frantar et al. 2023, after Optimal Brain Quantization) quantises one input column at a time
and spreads each column's rounding error over the columns not yet quantised, weighted by the
inverse of the input's second moment ``H = E[x x^T]``, which the pass measures on the calibration
data. The scales stay those of ``insert_qdq`` (the channel's largest magnitude over the integer
range), so only the choice of integers changes, and every weight stays within the range.

The chosen integers go into ``meta.WEIGHT_INTEGERS`` on the weight; ``insert_qdq``,
``bias_correction`` and ``quant_sensitivity`` use them through :func:`weight_integers`. The graph
itself is untouched, so run the pass after ``calibrate`` and before those three. Memory holds one
``K x K`` matrix per group of each layer (``K`` = input channels x kernel size), never activations.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.fx as fx

from compiler import ir, meta
from compiler.errors import PassError
from compiler.pass_base import Pass, PassContext, PassResult
from compiler.quant_policy import WEIGHTED
from compiler.threads import fixed_threads
from passes.quant.calibration_data import CalibrationBatches
from passes.quant.insert_qdq import sum_preserving_round, weight_largest, weight_scales
from passes.quant.plan import WeightPoint, plan_quantization

logger = logging.getLogger(__name__)

#: Input patches summed per batch for a convolution that needs ``unfold``; beyond this the
#: positions are taken at a stride (an image's neighbouring patches are nearly the same).
_ROWS_PER_BATCH = 1 << 16


class _SecondMoments(fx.Interpreter):
    """Runs the graph and sums ``x x^T`` over the input patches of each watched op.

    Runs alternate between two halves, so that each layer's rounding can be fitted on one
    half and checked on the other.
    """

    def __init__(self, gm: fx.GraphModule, ops: set[fx.Node]):
        super().__init__(gm)
        self.ops, self.half = ops, 0
        self.sums: dict[fx.Node, list[torch.Tensor | float]] = {}
        self.counts: dict[fx.Node, list[int]] = {}

    def run(self, *args, **kwargs) -> Any:
        """Run the graph once, into the other half than the previous run."""
        self.half = 1 - self.half
        return super().run(*args, **kwargs)

    def run_node(self, node: fx.Node) -> Any:
        """Run one node; add its input's second moment when it is watched."""
        if node in self.ops:
            args, _ = self.fetch_args_kwargs_from_env(node)
            found = input_moment(node, args)
            if found is not None:
                sums, counts = self.sums.setdefault(node, [0.0, 0.0]), self.counts.setdefault(node, [0, 0])
                sums[self.half] = sums[self.half] + found[0]
                counts[self.half] += found[1]
        return super().run_node(node)

    def moments(self) -> dict[fx.Node, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Op -> (mean ``x x^T`` of the first half, of the second half, of both)."""
        found = {}
        for node, (first, second) in self.sums.items():
            count = self.counts[node]
            if min(count) and isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
                found[node] = (first / count[0], second / count[1], (first + second) / sum(count))
        return found


def input_moment(op: fx.Node, args: tuple) -> tuple[torch.Tensor, int] | None:
    """``(sum of x x^T per group, as (groups, K, K) float64; the number of rows x)`` of the op's input patches.

    A row ``x`` is what one output position reads: a feature vector for a linear layer, the
    ``in_channels / groups x kernel`` patch of one group for a 2-D convolution. None for inputs
    the pass does not handle (other convolutions, string padding).
    """
    x = args[WEIGHTED[ir.op_name(op)][0]]
    weight = args[WEIGHTED[ir.op_name(op)][1]]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    if ir.op_name(op) == "aten.linear":
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        return (rows.T @ rows).double().unsqueeze(0), rows.shape[0]
    stride, padding, dilation = pair_option(args, 3, 1), pair_option(args, 4, 0), pair_option(args, 5, 1)
    groups = args[6] if len(args) > 6 else 1
    if ir.op_name(op) != "aten.conv2d" or x.dim() != 4 or isinstance(padding, str):
        return None
    x = x.detach().float()
    if weight.shape[2:] == (1, 1) and groups == 1 and padding == (0, 0):
        rows = x[:, :, ::stride[0], ::stride[1]].permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        return (rows.T @ rows).double().unsqueeze(0), rows.shape[0]
    columns = torch.nn.functional.unfold(x, weight.shape[2:], dilation, padding, stride)
    batch, _, positions = columns.shape
    every = max(1, batch * positions // _ROWS_PER_BATCH)  # neighbouring positions tell the same story
    columns = columns[:, :, ::every]
    columns = columns.reshape(batch, groups, -1, columns.shape[2])
    return torch.einsum("ngkp,nglp->gkl", columns, columns).double(), batch * columns.shape[3]


def pair_option(args: tuple, index: int, default: int) -> tuple[int, int] | str:
    """A conv's stride, padding or dilation argument ``index`` as a pair (or padding's string form)."""
    value = args[index] if len(args) > index else default
    if isinstance(value, str):
        return value
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def gptq_round(weight: torch.Tensor, scales: torch.Tensor, moment: torch.Tensor, largest: int,
               damping: float = 0.01, block: int = 128, free: int = 0) -> torch.Tensor:
    """GPTQ integers for ``weight`` ``(groups, rows, K)``, per-row ``scales`` and input ``moment`` ``(groups, K, K)``.

    Columns are quantised in order of decreasing input energy (``diag(H)``), the "act order" of
    the GPTQ reference, each column's error spread over the rest through the Cholesky factor of
    ``H^-1``. ``damping`` adds that fraction of the mean diagonal to ``H``, as GPTQ does. The last
    ``free`` columns (a bias fitted with the weights) come last and are not rounded: they take the
    others' error and come back in units of the row's scale, like the integers.
    """
    groups, rows, width = weight.shape
    rounded_width = width - free
    hessian = moment.clone()
    diagonal = torch.diagonal(hessian, dim1=1, dim2=2)
    dead = diagonal == 0
    diagonal += damping * diagonal.mean(dim=1, keepdim=True).clamp(min=1e-12) + dead.double()
    order = torch.argsort(torch.diagonal(moment, dim1=1, dim2=2)[:, :rounded_width], dim=1, descending=True)
    order = torch.cat([order, torch.arange(rounded_width, width).expand(groups, -1)], dim=1)
    hessian = torch.gather(torch.gather(hessian, 1, order.unsqueeze(2).expand(-1, -1, width)), 2,
                           order.unsqueeze(1).expand(-1, width, -1))
    # float32 from here, as in the GPTQ reference: the damped moment is well conditioned, and the
    # three K^3 factorisations cost a third of their float64 time (ResNet-18's K = 4608 convs).
    hessian = hessian.float()
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    values = torch.gather(weight.float(), 2, order.unsqueeze(1).expand(-1, rows, -1))
    values = values.masked_fill(torch.gather(dead, 1, order).unsqueeze(1), 0.0)
    step = scales.float().reshape(groups, rows, 1)
    integers = torch.zeros_like(values)
    for start in range(0, width, block):
        end = min(start + block, width)
        chunk, errors = values[:, :, start:end].clone(), torch.zeros(groups, rows, end - start)
        local = inverse[:, start:end, start:end]
        for column in range(end - start):
            exact = chunk[:, :, column]
            rounded = torch.round(exact / step[:, :, 0]).clamp(-largest, largest) if start + column < rounded_width \
                else exact / step[:, :, 0]
            integers[:, :, start + column] = rounded
            error = (exact - rounded * step[:, :, 0]) / local[:, column, column].unsqueeze(1)
            chunk[:, :, column:] -= error.unsqueeze(2) * local[:, column, column:].unsqueeze(1)
            errors[:, :, column] = error
        values[:, :, end:] -= errors @ inverse[:, start:end, end:]
    unsorted = torch.empty_like(integers)
    unsorted.scatter_(2, order.unsqueeze(1).expand(-1, rows, -1), integers)
    return unsorted.double()


def output_error(weight: torch.Tensor, dequantized: torch.Tensor, moment: torch.Tensor) -> float:
    """``sum_g tr((W_q - W) H (W_q - W)^T)``: the summed squared output error over the calibration patches."""
    delta = dequantized.double() - weight.double()
    return float(torch.einsum("grk,gkl,grl->", delta, moment, delta))


class GPTQ(Pass):
    """Choose each quantised layer's integer weights with GPTQ on calibrated input moments."""

    name = "gptq"
    exact = True  # the graph is untouched; the choice takes effect in insert_qdq
    needs_calibration = True
    # Depthwise convolutions keep nearest rounding by default: their 8-bit weights gained under
    # 1.3 dB of held-out layer error on EfficientNet-Lite0, at most of the pass's cost.
    default_options: dict[str, Any] = {"samples": 32, "batch_size": 8, "damping": 0.01, "depthwise": False}

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Needs validated calibration data and the target's policy."""
        super().requires(gm, ctx)
        if not isinstance(ctx.calibration_data, CalibrationBatches):
            raise PassError(f"pass {self.name!r} needs calibration_data to measure each layer's inputs")
        if ctx.quant_policy is None:
            raise PassError(f"pass {self.name!r} needs the target's quantisation policy; run it in a quantising target")
        samples, damping = self.options["samples"], self.options["damping"]
        if isinstance(samples, bool) or not (isinstance(samples, int) and samples > 0):
            raise PassError(f"pass {self.name!r}: option samples must be a positive int, "
                            f"got {self.options['samples']!r}")
        if isinstance(damping, bool) or not (isinstance(damping, (int, float)) and 0 < damping < 1):
            raise PassError(f"pass {self.name!r}: option damping must lie in (0, 1), got {self.options['damping']!r}")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Measure the input moments of every quantised weighted op, then round its weights.

        On one thread: the moments' GEMMs and the Cholesky factors round differently on two, and
        GPTQ's rounding flips on such last bits (EfficientNet-Lite0's artifact differed in 9 layers
        between 1 and 2 threads), so a compile gives the same weights on any machine and any load.
        """
        with fixed_threads(1):
            return self._call(gm, ctx)

    def _call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        plan = plan_quantization(gm, ctx.quant_policy)
        points = {point.op: point for point in plan.weights if point.weight.op == "get_attr"
                  and (self.options["depthwise"] or not _depthwise(point.op))}
        moments, samples = self._moments(gm, set(points), ctx)
        layers, kept = [], {}
        for op, point in points.items():
            row = self._round(gm, point, moments[op], ctx) if op in moments else "input not measured"
            if isinstance(row, str):
                kept[ir.module_path(op) or op.name] = row
            else:
                layers.append(row)
        return PassResult(gm, modified=False, stats={"samples": samples, "rounded": len(layers),
                                                     "kept_nearest": kept, "layers": layers})

    def _moments(self, gm: fx.GraphModule, ops: set[fx.Node], ctx: PassContext) -> tuple[dict, int]:
        interpreter = _SecondMoments(gm, ops)
        samples, limit = 0, self.options["samples"]
        with torch.no_grad():
            for batch in ctx.calibration_data:
                for start in range(0, batch_samples(batch), self.options["batch_size"]):
                    size = min(self.options["batch_size"], limit - samples, batch_samples(batch) - start)
                    interpreter.run(*(t[start:start + size] if t.dim() else t for t in batch))
                    samples += size
                    if samples >= limit:
                        return interpreter.moments(), samples
        return interpreter.moments(), samples

    def _round(self, gm: fx.GraphModule, point: WeightPoint, moments: tuple[torch.Tensor, ...],
               ctx: PassContext) -> dict | str:
        """Round one layer with GPTQ when that beats nearest rounding on held-out inputs; else say why not."""
        weight = ir.get_attribute(gm, point.weight.target).detach()
        largest = weight_largest(point.op, weight, ctx.quant_policy)
        scales = weight_scales(weight, point.axis, largest)
        fit, check, both = moments
        groups = both.shape[0]
        if point.axis != 0 or weight.shape[0] % groups or weight[0].numel() != both.shape[1]:
            return "weight layout not handled"
        grouped = weight.reshape(groups, weight.shape[0] // groups, -1)
        step = scales.reshape(groups, -1)
        dequantize = step.double().unsqueeze(2)
        nearest = sum_preserving_round(weight, scales, 0, largest).double().reshape(grouped.shape) * dequantize
        try:
            trial = gptq_round(grouped, step, fit, largest, float(self.options["damping"])) * dequantize
            before, after = output_error(grouped, nearest, check), output_error(grouped, trial, check)
            if not after < before:
                return "nearest rounding did as well on held-out inputs"
            chosen = gptq_round(grouped, step, both, largest, float(self.options["damping"]))
        except torch.linalg.LinAlgError as error:
            return f"input moment not positive definite ({error})"
        point.weight.meta[meta.WEIGHT_INTEGERS] = {
            "integers": chosen.reshape(weight.shape).to(torch.int8), "scales": scales.clone(), "largest": largest,
            "method": "gptq"}
        return {"module_path": ir.module_path(point.op), "weight": point.weight.target, "columns": grouped.shape[2],
                "groups": groups,
                "held_out_gain_db": round(10 * math.log10(before / after), 2) if after > 0 else None}


def _depthwise(op: fx.Node) -> bool:
    groups = op.args[6] if ir.op_name(op) == "aten.conv2d" and len(op.args) > 6 else 1
    return groups > 1


def batch_samples(batch: tuple[torch.Tensor, ...]) -> int:
    """Samples in a batch, counted along dimension 0 of its first tensor (1 for a scalar)."""
    return batch[0].shape[0] if batch and batch[0].dim() else 1
