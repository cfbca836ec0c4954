"""``cross_layer_equalization``: balance per-channel weight ranges of consecutive layers (Nagel et al. 2019).

For two weighted layers ``y = W1 x + b1`` and ``z = W2 f(y) + b2`` where ``f`` commutes with a
positive per-channel scale (``f(y / s) = f(y) / s``), dividing output channel ``c`` of the first
layer (row ``c`` of ``W1`` and ``b1[c]``) by ``s_c`` and multiplying input channel ``c`` of the
second (its weights reading channel ``c``) by ``s_c`` leaves ``z`` unchanged. With
``s_c = sqrt(r1_c / r2_c)``, ``r`` the largest weight magnitude of the channel, both layers end
with range ``sqrt(r1_c * r2_c)`` on channel ``c``, so one quantisation grid fits all channels
better. A chain (1x1 expand -> depthwise -> 1x1 project) couples: a depthwise filter ``c`` is both
its output and its input channel ``c``; every pair is equalised in turn, ``iterations`` times.

What is equalised, each pair only when it is exact:

* conv -> conv (1d/2d/3d, any groups, depthwise included) and linear -> linear; the second layer
  reads the tensor as its activation input. For a grouped second layer, input channel ``c`` is
  index ``c % (in/groups)`` of the filters of group ``c // (in/groups)``.
* The tensor between them has exactly one reader at every step: at most one activation and
  any number of pads over spatial dimensions that insert zeros or copy values (constant 0,
  reflect, replicate, circular: each output value is an input value of the same channel, or 0).
* Activations: ReLU and LeakyReLU (positively homogeneous: any ``s > 0``); a clip with lower bound
  0 (or none) and a finite upper bound ``h`` (ReLU6, hardtanh(0, 6), clamp(0, 6)) only per channel
  and only within what is provably exact. ``s * clip(y / s, 0, h) = clip(y, 0, s * h)``, equal to
  ``clip(y, 0, h)`` for all reachable ``y`` iff ``y <= min(1, s) * h``. So with ``U_c`` an upper
  bound of ``y_c`` over every possible input, channel ``c`` may be scaled only if ``U_c <= h``,
  and then only by ``s_c >= U_c / h``; other channels keep ``s_c = 1``. ``U_c`` comes from
  interval arithmetic on the first layer's current weights and the range of its input, known
  only when that input comes (through such pads) from a clip with finite bounds, widened to
  contain 0 for padding: ``U_c = b1_c + sum(max(W1_c, 0)) * high + sum(min(W1_c, 0)) * low``.
  ``s_c >= 1`` alone is not exact (where ``y`` exceeds ``h`` the clip is active). A per-channel
  clip at ``h / s_c`` would be exact for every channel, but the runtime could no longer fold it
  into the quantiser after the conv, so it is not done. Clips with another lower bound
  (hardtanh(-1, 1)) and other activations are refused.

Refused, each layer with its reason in ``stats["left_alone"]`` (and counted in
``stats["refused"]``): a tensor with several readers (residual adds), shared or non-constant
weights, transposed or unbatched convolutions, mismatched channel counts. ``min_scale`` and
``max_scale`` bound each channel's accumulated scale, except that a clip's exactness bound wins.
Arithmetic is float64, cast back to the weights' dtype. Run it before
``calibrate``: it changes weights and activation ranges.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from compiler import ir, meta
from compiler.errors import PassError
from compiler.pass_base import Pass, PassContext, PassResult

logger = logging.getLogger(__name__)
aten = torch.ops.aten

_CONVS = frozenset({aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default})
_LINEARS = frozenset({aten.linear.default})
_HOMOGENEOUS = frozenset({aten.relu.default, aten.relu_.default, aten.leaky_relu.default, aten.leaky_relu_.default})
_CLIPS = frozenset({
    aten.hardtanh.default, aten.hardtanh_.default, aten.clamp.default, aten.clamp_.default, aten.relu6.default,
})
_PADS = frozenset({aten.pad.default, aten.constant_pad_nd.default})


@dataclass
class Layer:
    """A weighted op with constant weights of its own."""

    node: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    groups: int
    kind: str  # "conv" or "linear"


@dataclass
class Pair:
    """Two layers to equalise, the clip's upper bound between them and the first layer's input range."""

    first: Layer
    second: Layer
    activation: fx.Node | None
    upper: float  # inf when the activation is positively homogeneous
    input_range: tuple[float, float] | None  # (low, high) of the first layer's input, 0 included
    total: torch.Tensor | None = None  # accumulated per-channel scale
    before: tuple[float, float] = (0.0, 0.0)  # imbalance and precision before equalisation


class CrossLayerEqualization(Pass):
    """Rescale channels between consecutive layers so their per-channel weight ranges match."""

    name = "cross_layer_equalization"
    exact = True
    default_options: dict[str, Any] = {"iterations": 10, "min_scale": 1e-3, "max_scale": 1e3}

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Options must be sane."""
        super().requires(gm, ctx)
        options = self.options
        if not isinstance(options["iterations"], int) or options["iterations"] < 1:
            raise PassError(f"pass {self.name!r}: iterations must be a positive int, got {options['iterations']!r}")
        if not 0 < options["min_scale"] <= 1 <= options["max_scale"]:
            raise PassError(f"pass {self.name!r}: need 0 < min_scale <= 1 <= max_scale, got "
                            f"{options['min_scale']!r}, {options['max_scale']!r}")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Find every exact pair, equalise them in turn, report one row per changed pair."""
        pairs, refusals = find_pairs(gm)
        for pair in pairs:
            pair.total = torch.ones(_channels(gm, pair.first), dtype=torch.float64)
            pair.before = (pair_imbalance(gm, pair), pair_precision(gm, pair))
        for _ in range(self.options["iterations"]):
            for pair in pairs:
                _equalize(gm, pair, self.options)
        rows = []
        for pair in pairs:
            if torch.all(pair.total == 1):
                refusals.append((pair.first.node, _unchanged_reason(pair)))
            else:
                rows.append(_row(gm, pair))
        logger.debug("cross_layer_equalization: %d of %d pairs changed", len(rows), len(pairs))
        return PassResult(gm, modified=bool(rows), stats={
            "equalized": len(rows), "candidates": len(pairs),
            "refused": dict(Counter(reason for _, reason in refusals)), "layers": rows,
            "left_alone": [{"first": ir.module_path(node) or node.name, "reason": reason} for node, reason in refusals],
        })


def find_pairs(gm: fx.GraphModule) -> tuple[list[Pair], list[tuple[fx.Node, str]]]:
    """Every exact pair in graph order, and (layer, reason) for the other weighted ops."""
    pairs, refusals = [], []
    for node in ir.call_nodes(gm):
        if node.target in _CONVS or node.target in _LINEARS:
            pair, reason = match_pair(gm, node)
            if pair is None:
                refusals.append((node, reason))
            else:
                pairs.append(pair)
    return pairs, refusals


def match_pair(gm: fx.GraphModule, node: fx.Node) -> tuple[Pair | None, str]:
    """The pair starting at ``node``, or (None, why not)."""
    first = as_layer(gm, node)
    if isinstance(first, str):
        return None, first
    current, activation = node, None
    while True:
        reader = ir.single_user(current)
        if reader is None:
            return None, f"output has {len(current.users)} readers"
        if reader.target in _CONVS or reader.target in _LINEARS:
            break
        if reader.target in _PADS:
            if first.kind != "conv" or not _is_channelwise_pad(reader):
                return None, "pad with a non-zero value or over the channels"
            current = reader
        elif activation is None and (reader.target in _HOMOGENEOUS or reader.target in _CLIPS):
            current = activation = reader
        else:
            return None, f"output read by {ir.op_name(reader)}"
    return _pair(gm, first, reader, current, activation)


def _pair(gm, first: Layer, reader: fx.Node, current: fx.Node, activation: fx.Node | None) -> tuple[Pair | None, str]:
    second = as_layer(gm, reader)
    if isinstance(second, str):
        return None, f"next layer: {second}"
    if reader.args[0] is not current:
        return None, "next layer reads the tensor as a weight"
    if second.kind != first.kind:
        return None, f"{first.kind} followed by {second.kind}"
    weight = ir.tensor_of(gm, second.weight)
    if weight.shape[1] * second.groups != _channels(gm, first):
        return None, "channel counts of the two layers differ"
    upper = activation_upper_bound(activation)
    if isinstance(upper, str):
        return None, upper
    return Pair(first, second, activation, upper, input_range(first.node)), ""


def as_layer(gm: fx.GraphModule, node: fx.Node) -> Layer | str:
    """``node`` as a Layer, or the reason it cannot be rescaled."""
    args = node.args
    weight = args[1] if len(args) > 1 else None
    bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
    if ir.tensor_of(gm, weight) is None or ir.is_shared(weight):
        return "weight is not a constant of its own"
    if bias is not None and (ir.tensor_of(gm, bias) is None or ir.is_shared(bias)):
        return "bias is not a constant of its own"
    if node.target in _LINEARS:
        return Layer(node, weight, bias, 1, "linear")
    if node.target == aten.convolution.default and args[6]:
        return "transposed convolution"
    output = node.meta.get(meta.VAL)
    if not isinstance(output, torch.Tensor) or output.dim() != ir.tensor_of(gm, weight).dim():
        return "unbatched convolution or unknown output rank"
    groups_index = 8 if node.target == aten.convolution.default else 6
    groups = args[groups_index] if len(args) > groups_index else node.kwargs.get("groups", 1)
    return Layer(node, weight, bias, int(groups), "conv")


def _is_channelwise_pad(node: fx.Node) -> bool:
    """A pad over spatial dimensions only that inserts zeros or copies values (reflect, replicate, circular)."""
    pad = node.args[1]
    if node.target == aten.pad.default:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
    else:
        mode, value = "constant", node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
    rank = node.meta[meta.VAL].dim() if isinstance(node.meta.get(meta.VAL), torch.Tensor) else 0
    copies = mode in ("reflect", "replicate", "circular") or (mode == "constant" and (value is None or value == 0))
    return copies and len(pad) <= 2 * (rank - 2)


def clip_bounds(node: fx.Node) -> tuple[float, float]:
    """(lower, upper) of a clip, ``-inf``/``inf`` for a missing bound (hardtanh's defaults are -1, 1)."""
    if node.target == aten.relu6.default:
        return 0.0, 6.0
    defaults = (-1.0, 1.0) if node.target in (aten.hardtanh.default, aten.hardtanh_.default) else (None, None)
    names = ("min_val", "max_val") if defaults[0] is not None else ("min", "max")
    values = [node.args[index] if len(node.args) > index else node.kwargs.get(name, default)
              for index, name, default in zip((1, 2), names, defaults, strict=True)]
    low, high = (value if value is not None else sign * math.inf for value, sign in zip(values, (-1, 1), strict=True))
    return float(low), float(high)


def activation_upper_bound(activation: fx.Node | None) -> float | str:
    """``inf`` when the activation commutes with every positive scale, the clip's upper bound, or a refusal."""
    if activation is None or activation.target in _HOMOGENEOUS:
        return math.inf
    low, high = clip_bounds(activation)
    if low not in (0.0, -math.inf):
        return f"clip with lower bound {low:g} does not commute with scaling"
    if not high > 0:
        return f"clip with upper bound {high:g}"
    return high


def input_range(node: fx.Node) -> tuple[float, float] | None:
    """Provable (low, high) of ``node``'s input, 0 included, when a clip with finite bounds produces it."""
    value = node.args[0]
    while isinstance(value, fx.Node) and value.target in _PADS and _is_channelwise_pad(value):
        value = value.args[0]
    if not isinstance(value, fx.Node) or value.target not in _CLIPS:
        return None
    low, high = clip_bounds(value)
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    return min(low, 0.0), max(high, 0.0)


def output_ranges(weight: torch.Tensor) -> torch.Tensor:
    """Largest magnitude of every output channel (row) of a weight."""
    return weight.detach().double().abs().reshape(weight.shape[0], -1).amax(dim=1)


def _input_channel_index(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """For each (output, per-group input) weight slice, the input channel it reads."""
    outputs, per_group = weight.shape[0], weight.shape[1]
    group = torch.arange(outputs) // (outputs // groups)
    return group[:, None] * per_group + torch.arange(per_group)[None, :]


def input_ranges(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Largest magnitude of the weights reading each input channel."""
    index = _input_channel_index(weight, groups)
    magnitudes = weight.detach().double().abs().reshape(*index.shape, -1).amax(dim=2)
    ranges = torch.zeros(weight.shape[1] * groups, dtype=torch.float64)
    return ranges.scatter_reduce(0, index.reshape(-1), magnitudes.reshape(-1), reduce="amax")


def imbalance(ranges: torch.Tensor) -> float:
    """Largest over smallest non-zero channel range (1 for a balanced layer)."""
    positive = ranges[ranges > 0]
    return float(positive.max() / positive.min()) if positive.numel() else 1.0


def _pair_ranges(gm: fx.GraphModule, pair: Pair) -> tuple[torch.Tensor, torch.Tensor]:
    first = output_ranges(ir.tensor_of(gm, pair.first.weight))
    return first, input_ranges(ir.tensor_of(gm, pair.second.weight), pair.second.groups)


def pair_imbalance(gm: fx.GraphModule, pair: Pair) -> float:
    """The worse of the two layers' imbalances over the channels between them.

    For a lone pair, equalisation never raises it: both layers end with ranges ``sqrt(r1 r2)``,
    whose largest/smallest ratio is at most the geometric mean of the two ratios.
    """
    first, second = _pair_ranges(gm, pair)
    return max(imbalance(first), imbalance(second))


def pair_precision(gm: fx.GraphModule, pair: Pair) -> float:
    """Nagel et al.'s objective: mean over channels of ``(r1_c / max r1) * (r2_c / max r2)``, in (0, 1].

    ``s = sqrt(r1 / r2)`` maximises it (their eq. 9 to 11); unlike the imbalance, near-dead
    channels (ranges of 1e-9 in EfficientNet-Lite0's depthwise layers) do not swamp it.
    """
    first, second = _pair_ranges(gm, pair)
    if not (first.max() > 0 and second.max() > 0):
        return 0.0
    return float((first / first.max() * second / second.max()).mean())


def _channels(gm: fx.GraphModule, layer: Layer) -> int:
    return ir.tensor_of(gm, layer.weight).shape[0]


def upper_bounds(weight: torch.Tensor, bias: torch.Tensor | None, low: float, high: float) -> torch.Tensor:
    """Largest value each output channel can take for inputs in [low, high] (``low <= 0 <= high``)."""
    rows = weight.detach().double().reshape(weight.shape[0], -1)
    bound = rows.clamp(min=0).sum(dim=1) * high + rows.clamp(max=0).sum(dim=1) * low
    return bound + (bias.detach().double() if bias is not None else 0.0)


def _scales(gm: fx.GraphModule, pair: Pair, options: dict[str, Any]) -> torch.Tensor:
    """This step's per-channel scale: balancing, clamped, then limited to what keeps the clip exact."""
    first = ir.tensor_of(gm, pair.first.weight)
    ranges1 = output_ranges(first)
    ranges2 = input_ranges(ir.tensor_of(gm, pair.second.weight), pair.second.groups)
    usable = (ranges1 > 0) & (ranges2 > 0)
    scale = torch.where(usable, torch.sqrt(ranges1 / ranges2.clamp(min=1e-300)), torch.ones_like(ranges1))
    scale = (pair.total * scale).clamp(options["min_scale"], options["max_scale"]) / pair.total
    if math.isinf(pair.upper):
        return scale
    if pair.input_range is None:
        return torch.ones_like(scale)
    bias = ir.tensor_of(gm, pair.first.bias) if pair.first.bias is not None else None
    bound = upper_bounds(first, bias, *pair.input_range)
    return torch.where(bound <= pair.upper, torch.maximum(scale, bound / pair.upper), torch.ones_like(scale))


def _equalize(gm: fx.GraphModule, pair: Pair, options: dict[str, Any]) -> None:
    """One step: divide the first layer's output channels by ``s`` and multiply the second's inputs by it."""
    scale = _scales(gm, pair, options)
    if torch.all(scale == 1):
        return
    pair.total = pair.total * scale
    first = ir.tensor_of(gm, pair.first.weight)
    shape = (-1,) + (1,) * (first.dim() - 1)
    ir.set_attribute(gm, pair.first.weight.target, (first.double() / scale.reshape(shape)).to(first.dtype))
    if pair.first.bias is not None:
        bias = ir.tensor_of(gm, pair.first.bias)
        ir.set_attribute(gm, pair.first.bias.target, (bias.double() / scale).to(bias.dtype))
    second = ir.tensor_of(gm, pair.second.weight)
    index = _input_channel_index(second, pair.second.groups)
    factor = scale[index].reshape(*index.shape, *(1,) * (second.dim() - 2))
    ir.set_attribute(gm, pair.second.weight.target, (second.double() * factor).to(second.dtype))


def _unchanged_reason(pair: Pair) -> str:
    if not math.isinf(pair.upper) and pair.input_range is None:
        return f"clip at {pair.upper:g} and no provable bound on the first layer's input"
    if not math.isinf(pair.upper):
        return f"clip at {pair.upper:g} may be active on every channel"
    return "already balanced"


def _activation_name(pair: Pair) -> str:
    if pair.activation is None:
        return "none"
    if math.isinf(pair.upper):
        return ir.op_name(pair.activation)
    low, high = clip_bounds(pair.activation)
    return f"{ir.op_name(pair.activation)}({low:g}, {high:g})"


def _row(gm: fx.GraphModule, pair: Pair) -> dict[str, Any]:
    return {
        "first": ir.module_path(pair.first.node), "second": ir.module_path(pair.second.node),
        "activation": _activation_name(pair), "channels": int(pair.total.numel()),
        "scaled_channels": int((pair.total != 1).sum()),
        "max_scale": float(pair.total.max()), "min_scale": float(pair.total.min()),
        "imbalance_before": pair.before[0], "imbalance_after": pair_imbalance(gm, pair),
        "precision_before": pair.before[1], "precision_after": pair_precision(gm, pair),
    }
