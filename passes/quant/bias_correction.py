"""``bias_correction``: cancel the mean output shift that rounding the weights causes.

Rounding a weight matrix ``W`` to ``W_q`` shifts the expected output of the layer by
``(W_q - W) E[x]``; for a channel whose weights mostly cancel (an edge filter) the relative shift
can be large, and later layers carry it on. With the per-channel input means that ``calibrate``
measured (``QUANT_RANGE["channel_mean"]``), this pass subtracts the shift from the bias
(empirical bias correction, Nagel et al. 2019). It computes ``W_q`` exactly as ``insert_qdq``
will (same scales, same sum-preserving rounding), so it must run after ``calibrate`` and
``quant_sensitivity`` and before ``insert_qdq``. The input mean ignores the zeros a padded
convolution adds at the border.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from compiler import ir, meta
from compiler.errors import PassError
from compiler.pass_base import Pass, PassContext, PassResult
from passes.quant.insert_qdq import weight_integers, weight_largest, weight_scales
from passes.quant.plan import QuantPlan, WeightPoint, plan_quantization


class BiasCorrection(Pass):
    """Subtract each quantised layer's expected output shift from its bias."""

    name = "bias_correction"
    exact = False
    default_options: dict[str, Any] = {}

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Needs the policy and calibrated channel means."""
        super().requires(gm, ctx)
        if ctx.quant_policy is None:
            raise PassError(f"pass {self.name!r} needs the target's quantisation policy; run it in a quantising target")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Correct every weighted op whose input mean was measured."""
        plan = plan_quantization(gm, ctx.quant_policy)
        sources = _input_sources(plan)
        layers = []
        for point in plan.weights:
            row = self._correct(gm, point, sources.get(point.op), ctx)
            if row is not None:
                layers.append(row)
        return PassResult(gm, modified=bool(layers), stats={"corrected": len(layers), "layers": layers})

    def _correct(self, gm: fx.GraphModule, point: WeightPoint, source: fx.Node | None, ctx) -> dict | None:
        bias = point.op.args[2] if len(point.op.args) > 2 else None
        means = (source.meta.get(meta.QUANT_RANGE, {}).get("channel_mean", {}) if source is not None else {})
        layout = "linear" if ir.op_name(point.op) == "aten.linear" else "conv"
        if not isinstance(bias, fx.Node) or bias.op != "get_attr" or layout not in means:
            return None
        weight = ir.get_attribute(gm, point.weight.target).detach()
        shift = _output_shift(point, weight, torch.tensor(means[layout], dtype=torch.float64), ctx.quant_policy)
        if shift is None:
            return None
        value = ir.get_attribute(gm, bias.target).detach()
        corrected = (value.double() - shift).to(value.dtype)
        replacement = ir.add_get_attr(gm, f"{bias.target}_corrected", corrected, before=point.op)
        replacement.meta[meta.FLOAT_SOURCE] = bias.meta.get(meta.FLOAT_SOURCE, bias.target)
        point.op.replace_input_with(bias, replacement)
        return {"module_path": ir.module_path(point.op), "max_shift": float(shift.abs().max()),
                "mean_shift": float(shift.abs().mean())}


def _input_sources(plan: QuantPlan) -> dict[fx.Node, fx.Node]:
    """Weighted op -> the tensor its activation input is quantised from."""
    found = {}
    weighted = {point.op for point in plan.weights}
    for source, point in plan.activations.items():
        for user, _, _ in point.edges:
            while user not in weighted and len(user.users) == 1:
                user = next(iter(user.users))
            if user in weighted:
                found[user] = source
    return found


def _output_shift(point: WeightPoint, weight: torch.Tensor, mean: torch.Tensor, policy) -> torch.Tensor | None:
    """``(W_q - W) E[x]`` per output channel, or None when the means do not fit the weight."""
    if point.axis != 0:  # a transposed convolution: its output channels are not the weight's first axis
        return None
    largest = weight_largest(point.op, weight, policy)
    scales = weight_scales(weight, point.axis, largest)
    integers = weight_integers(point.weight, weight, scales, point.axis, largest).double()
    shape = [-1] + [1] * (weight.dim() - 1)
    error = integers * scales.double().reshape(shape) - weight.double()
    if ir.op_name(point.op) == "aten.linear":
        return error @ mean if mean.numel() == weight.shape[1] else None
    groups = point.op.args[6] if len(point.op.args) > 6 else 1
    per_group = weight.shape[1]
    if mean.numel() != groups * per_group or weight.dim() < 3:
        return None
    summed = error.reshape(weight.shape[0], per_group, -1).sum(dim=2)
    group_of = torch.arange(weight.shape[0]) // (weight.shape[0] // groups)
    return (summed * mean.reshape(groups, per_group)[group_of]).sum(dim=1)

