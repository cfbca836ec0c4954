"""``insert_qdq``: quantise the planned tensors and weights with the IR's quantisation ops.

Activations are quantised per tensor (asymmetric, unsigned or signed as the policy says) from the
ranges ``calibrate`` recorded, with ``fxpress::quantize_dequantize``. Weights become int8 tensors,
per output channel and symmetric with 8 or 7 bits, read through ``fxpress::dequantize_per_channel``;
biases become int32 on the grid ``scale_input * scale_weight`` the runtime uses. The result is
both the torch simulation of the int8 model and, once exported, QuantizeLinear/DequantizeLinear
pairs around integer weights (:mod:`backends.onnx.quant_translations`).

Weighted ops left in float (by the policy or the sensitivity analysis) keep their weights in
float16 and widen them to float32 in the graph (``float_weights="float16"``, the default): the
file stores half the bytes, the runtime folds the widening Cast once when it loads the model and
computes in float32, and the simulation computes exactly that. Rounding a weight to float16 moves
it by at most 2**-11 of its size (about 66 dB below it), far under the int8 layers' error.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from compiler import ir, meta
from compiler.errors import PassError
from compiler.pass_base import Pass, PassContext, PassResult
from compiler.quant_ops import DEQUANTIZE_PER_CHANNEL, QUANTIZE_DEQUANTIZE
from compiler.quant_policy import WEIGHTED, QuantPolicy
from passes.quant.plan import ActivationPoint, WeightPoint, plan_quantization

logger = logging.getLogger(__name__)
aten = torch.ops.aten

FAKE_QUANT_TENSOR = QUANTIZE_DEQUANTIZE
_SMALLEST_SCALE = 1e-12


def activation_qparams(low: float, high: float, policy: QuantPolicy) -> tuple[float, int]:
    """(scale, zero point) of the grid over ``[low, high]`` (which holds zero) in the policy's range.

    Affine by default; for a symmetric policy ``max(|low|, |high|) / 127`` around the middle zero
    point (0 for int8, 128 for uint8). The scale is rounded to float32, the precision the runtime
    stores it in.
    """
    qmin, qmax = policy.activation_range
    if policy.activation_symmetric:
        scale = _float32(max(abs(low), abs(high)) / 127)
        return scale, (qmin + qmax + 1) // 2
    scale = _float32((high - low) / (qmax - qmin))
    zero_point = int(min(max(round(qmin - low / scale), qmin), qmax))
    return scale, zero_point


def _float32(scale: float) -> float:
    return float(torch.tensor(max(scale, _SMALLEST_SCALE), dtype=torch.float32))


def weight_scales(weight: torch.Tensor, axis: int, largest: int) -> torch.Tensor:
    """Per-channel symmetric scales: the channel's largest magnitude over ``largest`` integer steps."""
    dims = [dim for dim in range(weight.dim()) if dim != axis % weight.dim()]
    amax = weight.detach().abs().amax(dim=dims) if dims else weight.detach().abs()
    return (amax.double() / largest).clamp(min=_SMALLEST_SCALE).float()


def sum_preserving_round(weight: torch.Tensor, scales: torch.Tensor, axis: int, largest: int) -> torch.Tensor:
    """Round ``weight / scale`` to integers so that each channel's sum (its DC gain) stays within half a step.

    Plain rounding can move a channel's sum by many steps: an edge filter whose weights cancel
    (sum near 0, large magnitudes) then gains a DC response that the next layers amplify. Here
    each channel first rounds to nearest, then moves the ``k`` entries whose rounding residuals
    lie closest to the other side by one step, ``k`` being the rounded sum error: the smallest
    change of the entries that restores the sum (each entry stays within one step of its value).
    """
    rows = (weight.detach().double().movedim(axis, 0).reshape(weight.shape[axis], -1)
            / scales.double().reshape(-1, 1))
    integers = torch.round(rows).clamp(-largest, largest)
    missing = torch.round(rows.sum(dim=1) - integers.sum(dim=1)).long()
    residual = rows - integers  # > 0: rounded down
    order = torch.argsort(residual, dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(rows.shape[1]).expand_as(order))
    up = (rank < missing.clamp(min=0).unsqueeze(1)) & (integers < largest)
    down = (rank >= rows.shape[1] + missing.clamp(max=0).unsqueeze(1)) & (integers > -largest)
    integers = integers + up.double() - down.double()
    shape = list(weight.movedim(axis, 0).shape)
    return integers.reshape(shape).movedim(0, axis).to(torch.int8)


def weight_integers(weight_node: fx.Node | None, weight: torch.Tensor, scales: torch.Tensor, axis: int,
                    largest: int) -> torch.Tensor:
    """The int8 integers of ``weight`` on ``scales``: those ``gptq`` chose, else sum-preserving rounding.

    A channel keeps the chosen integers only where its scale is the one they were chosen for
    (``insert_qdq`` raises the scale of near-empty channels so that their bias fits int32).
    """
    rounded = sum_preserving_round(weight, scales, axis, largest)
    chosen = weight_node.meta.get(meta.WEIGHT_INTEGERS) if weight_node is not None else None
    if chosen is None or chosen["largest"] != largest or tuple(chosen["integers"].shape) != tuple(weight.shape):
        return rounded
    shape = [1] * weight.dim()
    shape[axis % weight.dim()] = -1
    same = (chosen["scales"].float() == scales.float()).reshape(shape)
    return torch.where(same, chosen["integers"], rounded)


class InsertQDQ(Pass):
    """Insert fake-quantise ops for every planned activation, weight and bias."""

    name = "insert_qdq"
    exact = False
    default_options: dict[str, Any] = {"float_weights": "float16"}

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Needs the policy, and a calibrated range on every tensor the plan quantises."""
        super().requires(gm, ctx)
        if ctx.quant_policy is None:
            raise PassError(f"pass {self.name!r} needs the target's quantisation policy")
        missing = [node.name for node in plan_quantization(gm, ctx.quant_policy).activations
                   if meta.QUANT_RANGE not in node.meta]
        if missing:
            raise PassError(
                f"{len(missing)} tensor(s) to quantise have no calibrated range ({', '.join(missing[:5])}); "
                "run 'calibrate' with the same policy before 'insert_qdq'"
            )

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Rewrite the graph; one ledger row per quantised tensor."""
        policy = ctx.quant_policy
        plan = plan_quantization(gm, policy)
        layers = [_activation_row(point, _quantize_activation(gm, point, policy))
                  for point in plan.activations.values()]
        quantized_weights: dict[fx.Node, fx.Node] = {}
        for point in plan.weights:
            layers.append(_quantize_weight(gm, point, policy, quantized_weights, _input_scale(point, policy)))
        layers.extend(self._store_float_weights(gm, {point.op for point in plan.weights}, policy))
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return PassResult(gm, modified=bool(layers), stats={
            "activations": len(plan.activations), "weights": len(plan.weights),
            "integer_ops": len(plan.integer_ops), "residual_adds": len(plan.residual_adds),
            "policy": policy.to_dict(), "layers": layers,
        })


    def _store_float_weights(self, gm: fx.GraphModule, quantized: set[fx.Node], policy: QuantPolicy) -> list[dict]:
        """One row per weighted op kept in float; its float32 weight stored as float16 if so chosen."""
        choice = self.options["float_weights"]
        if choice not in ("float16", "float32"):
            raise PassError(f"pass {self.name!r}: float_weights must be 'float16' or 'float32', got {choice!r}")
        rows = []
        for node in list(ir.call_nodes(gm)):
            if node in quantized or ir.op_name(node) not in policy.weighted_ops:
                continue
            weight = node.args[WEIGHTED[ir.op_name(node)][1]]
            if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
                continue
            value = ir.get_attribute(gm, weight.target).detach()
            stored = "float32"
            if choice == "float16" and value.dtype == torch.float32:
                node.replace_input_with(weight, _widened_half(gm, weight, value, node))
                stored = "float16 (float32 compute)"
            rows.append({"tensor": weight.target, "module_path": ir.module_path(node), "kind": "weight",
                         "dtype": stored, "decision": "float",
                         "why": policy.float_reason(node) or "kept in float by the policy",
                         **_sensitivity(node)})
        return rows


def _sensitivity(op: fx.Node) -> dict[str, Any]:
    """The op's output SQNR when quantised alone, if ``quant_sensitivity`` measured it."""
    found = op.meta.get(meta.QUANT_SENSITIVITY)
    return {"sqnr_db": found["sqnr_db"]} if found else {}


def _widened_half(gm: fx.GraphModule, weight: fx.Node, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """``value`` stored as float16 and widened back to float32 before ``before`` reads it."""
    half = ir.add_get_attr(gm, f"{weight.target}_float16", value.half(), before=before)
    with gm.graph.inserting_before(before):
        widened = gm.graph.call_function(aten._to_copy.default, (half,), {"dtype": torch.float32})
    _inherit_meta(widened, before)
    widened.meta[meta.VAL] = weight.meta.get(meta.VAL, value)
    return widened


def _quantize_activation(gm: fx.GraphModule, point: ActivationPoint, policy: QuantPolicy) -> fx.Node:
    source = point.source
    record = source.meta[meta.QUANT_RANGE]
    scale, zero_point = activation_qparams(record["low"], record["high"], policy)
    qmin, qmax = policy.activation_range
    with gm.graph.inserting_after(source):
        fake_quant = gm.graph.call_function(FAKE_QUANT_TENSOR, (source, scale, zero_point, qmin, qmax))
    _inherit_meta(fake_quant, source)
    fake_quant.meta[meta.QUANT_PARAMS] = {
        "scale": scale, "zero_point": zero_point, "dtype": policy.activation_dtype, "kind": "activation",
    }
    if point.all_users:
        source.replace_all_uses_with(fake_quant, delete_user_cb=lambda user: user is not fake_quant)
    else:
        for user, index, position in point.edges:
            _rewire(user, index, position, fake_quant)
    return fake_quant


def _rewire(user: fx.Node, index: int, position: int | None, value: fx.Node) -> None:
    args = list(user.args)
    if position is None:
        args[index] = value
    else:
        items = list(args[index])
        items[position] = value
        args[index] = items
    user.args = tuple(args)


def _input_scale(point: WeightPoint, policy: QuantPolicy) -> float | None:
    """The scale of the fake-quantiser feeding the op's activation input, through pass-through ops."""
    value = point.op.args[WEIGHTED[ir.op_name(point.op)][0]]
    while isinstance(value, fx.Node) and value.target is not FAKE_QUANT_TENSOR and policy.role(value) == "passthrough":
        value = value.args[0]
    if isinstance(value, fx.Node) and value.target is FAKE_QUANT_TENSOR:
        return value.meta[meta.QUANT_PARAMS]["scale"]
    return None


def _quantize_weight(gm: fx.GraphModule, point: WeightPoint, policy: QuantPolicy,
                     done: dict[fx.Node, fx.Node], input_scale: float | None) -> dict[str, Any]:
    weight = ir.get_attribute(gm, point.weight.target).detach()
    largest = weight_largest(point.op, weight, policy)
    scales = weight_scales(weight, point.axis, largest)
    if policy.quantize_bias:
        scales = _fit_bias(gm, point, scales, input_scale)
    if point.weight not in done:
        integers = weight_integers(point.weight, weight, scales, point.axis, largest)
        done[point.weight] = _dequantized(gm, point.weight, integers, scales, point.axis, point.op)
        done[point.weight].meta[meta.QUANT_PARAMS] = {"kind": "weight", "axis": point.axis,
                                                      "largest": largest, "dtype": "int8"}
    point.op.replace_input_with(point.weight, done[point.weight])
    return {
        "tensor": point.weight.target, "module_path": ir.module_path(point.op), "kind": "weight",
        "scale": [float(scales.min()), float(scales.max())], "bits": 8 if largest == 127 else 7,
        "range": [float(weight.min()), float(weight.max())], "calibrator": "minmax_per_channel",
        "rounding": _rounding(point.weight, scales),
        "bias": _quantize_bias(gm, point, scales, input_scale) if policy.quantize_bias else _float_bias(point),
        "decision": "int8", **_sensitivity(point.op),
    }


def _rounding(weight_node: fx.Node, scales: torch.Tensor) -> str:
    """How a weight's integers were chosen, as :func:`weight_integers` chose them, for the ledger."""
    chosen = weight_node.meta.get(meta.WEIGHT_INTEGERS)
    if chosen is None:
        return "nearest, sum-preserving"
    kept = int((chosen["scales"].float() == scales.float()).sum())
    return chosen["method"] if kept == scales.numel() else f"{chosen['method']} on {kept} of {scales.numel()} channels"


def weight_largest(op: fx.Node, weight: torch.Tensor, policy: QuantPolicy) -> int:
    """127 for depthwise convolutions (the runtime's depthwise kernels accumulate in int32), else the policy's."""
    groups = op.args[6] if ir.op_name(op).startswith("aten.conv") and len(op.args) > 6 else 1
    depthwise = groups > 1 and weight.shape[1] == 1
    return 2 ** (policy.depthwise_weight_bits - 1) - 1 if depthwise else policy.weight_max


def _fit_bias(gm: fx.GraphModule, point: WeightPoint, scales: torch.Tensor, input_scale: float | None) -> torch.Tensor:
    """Raise the scale of near-empty channels so that their bias still fits int32 (``|b| / step < 2**30``).

    A channel whose weights are all (nearly) zero gets a tiny scale, and its bias, divided by
    ``input_scale * scale``, would overflow int32; a larger scale costs it nothing.
    """
    bias = _bias_node(point)
    if bias is None or input_scale is None:
        return scales
    needed = ir.get_attribute(gm, bias.target).detach().abs().double() / (input_scale * 2.0**30)
    return torch.maximum(scales.double(), needed).float()


def _bias_node(point: WeightPoint) -> fx.Node | None:
    bias = point.op.args[2] if len(point.op.args) > 2 else point.op.kwargs.get("bias")
    return bias if isinstance(bias, fx.Node) and bias.op == "get_attr" else None


def _dequantized(gm: fx.GraphModule, original: fx.Node, integers: torch.Tensor, scales: torch.Tensor, axis: int,
                 before: fx.Node) -> fx.Node:
    """``dequantize_per_channel(integers, scales)`` standing for ``original``, placed before ``before``."""
    base = original.target
    integer_node = ir.add_get_attr(gm, f"{base}_quantized", integers, before=before)
    scale_node = ir.add_get_attr(gm, f"{base}_scale", scales, before=before)
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(DEQUANTIZE_PER_CHANNEL, (integer_node, scale_node, axis))
    _inherit_meta(node, before)
    if meta.VAL in original.meta:
        node.meta[meta.VAL] = original.meta[meta.VAL]
    node.meta[meta.FLOAT_SOURCE] = original.meta.get(meta.FLOAT_SOURCE, original.target)
    return node


def _float_bias(point: WeightPoint) -> str:
    return "none" if _bias_node(point) is None else "float (the policy keeps biases float)"


def _quantize_bias(gm: fx.GraphModule, point: WeightPoint, scales: torch.Tensor, input_scale: float | None) -> str:
    """An int32 bias on the runtime's grid (step ``input_scale * weight_scale``), as QLinearConv reads it."""
    bias = _bias_node(point)
    if bias is None:
        return "none"
    if input_scale is None:
        return "float (input not quantised)"
    value = ir.get_attribute(gm, bias.target).detach()
    step = (scales.double() * input_scale).float()
    integers = torch.round(value.double() / step.double())
    if integers.abs().max() >= 2**31:
        return "float (int32 overflow)"
    node = _dequantized(gm, bias, integers.to(torch.int32), step, 0, point.op)
    node.meta[meta.QUANT_PARAMS] = {"kind": "bias", "dtype": "int32"}
    point.op.replace_input_with(bias, node)
    return "int32"


def _inherit_meta(node: fx.Node, source: fx.Node) -> None:
    for key in (meta.VAL, meta.NN_MODULE_STACK, meta.MODULE_PATH, meta.MODULE_TYPE):
        if key in source.meta:
            node.meta[key] = source.meta[key]


def _activation_row(point: ActivationPoint, fake_quant: fx.Node) -> dict[str, Any]:
    record, params = point.source.meta[meta.QUANT_RANGE], fake_quant.meta[meta.QUANT_PARAMS]
    return {
        "tensor": point.source.name, "module_path": ir.module_path(point.source), "kind": "activation",
        "scale": params["scale"], "zero_point": params["zero_point"], "dtype": params["dtype"],
        "range": [record["low"], record["high"]], "observed": [record["min"], record["max"]],
        "calibrator": record["observer"], "why": point.reasons,
    }
