"""Which layers can be factorised, what each rank costs, and which ranks meet a budget.

A :class:`Layer` is one conv or linear of the IR with its rank options: multiples of the backend's
kernel block (``round_to``) that save MACs, ``r (in + out) < in x out`` for a linear or 1x1 conv
(per output position), ``in r_in`` at the input's positions plus ``r_in r_out k^2 + r_out out`` at the
output's for a k x k conv's Tucker-2 chain. A layer no option saves MACs on is left alone with
that reason. Ranks are then chosen by

* ``energy``: per layer, the smallest option keeping that share of its output energy;
* a MAC or parameter budget with ``allocation="sensitivity"``: one Lagrange multiplier over all
  layers, each taking the option that minimises (predicted model error) + multiplier x (cost),
  the multiplier bisected until the budget holds. A layer's predicted model error is its own
  output error at that rank (the energy its truncation loses) times its *sensitivity*: the model
  output's error when that layer alone is factorised, over its own error then (measured by the pass);
* ``allocation="uniform"``: every layer keeps the same share of its cost, bisected likewise.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch.fx as fx

from compiler import ir, meta
from passes.prune.prune_channels import rounded_width

_BISECTION_STEPS = 60
_TUCKER_STEPS = 16  # Tucker-2 options: the rank fraction in sixteenths of each side


@dataclass
class Layer:
    """One factorisable conv or linear: its shape, cost on the probe batch, and rank options."""

    node: str
    kind: str  # "linear", "pointwise" (1x1 conv: two 1x1 convs) or "tucker" (1x1, k x k core, 1x1)
    out_features: int
    in_features: int
    kernel: tuple[int, int]
    in_positions: int  # positions the first factor runs at (the input's, for Tucker-2)
    out_positions: int
    module: str = ""
    options: list[tuple[int, ...]] = field(default_factory=list)
    tail: list[float] = field(default_factory=list)  # output energy each option loses
    energy: float = 0.0  # the layer's whole output energy (what rank 0 would lose)
    sensitivity: float = 1.0  # model output error per unit of this layer's error

    @property
    def full_macs(self) -> int:
        """MACs of the layer as it is."""
        return self.out_positions * self.out_features * self.in_features * math.prod(self.kernel)

    @property
    def full_params(self) -> int:
        """Weights of the layer as it is."""
        return self.out_features * self.in_features * math.prod(self.kernel)

    def cost(self, ranks: tuple[int, ...] | None, unit: str) -> int:
        """MACs (``unit="macs"``) or weights (``"params"``) at ``ranks`` (None: as it is)."""
        if ranks is None:
            return self.full_macs if unit == "macs" else self.full_params
        if self.kind != "tucker":
            (rank,) = ranks
            per_position = rank * (self.in_features + self.out_features)
            return per_position * self.out_positions if unit == "macs" else per_position
        rank_in, rank_out = ranks
        first, last = self.in_features * rank_in, rank_out * self.out_features
        core = rank_in * rank_out * math.prod(self.kernel)
        if unit == "params":
            return first + core + last
        return self.in_positions * first + self.out_positions * (core + last)


def factorisable(gm: fx.GraphModule, node: fx.Node, protect: list[str]) -> str | None:
    """Why ``node`` (a conv or linear) cannot be factorised, or None when it can."""
    weight = node.args[1] if len(node.args) > 1 else None
    bias = node.args[2] if len(node.args) > 2 else None
    path = ir.module_path(node)
    if any(fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(node.name, pattern) for pattern in protect):
        return "protected"
    if node.kwargs:
        return "keyword arguments"
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return "weight is not a constant"
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return "bias is not a constant"
    if ir.is_shared(weight):
        return "weight shared with another layer"
    tensor = ir.get_attribute(gm, weight.target)
    if not tensor.is_floating_point():
        return "weight is not floating point"
    if ir.op_name(node) == "aten.conv2d":
        groups = node.args[6] if len(node.args) > 6 else 1
        if groups != 1:
            return "grouped or depthwise conv (nothing to factor across channels)"
        if isinstance(node.args[4] if len(node.args) > 4 else 0, str):
            return "conv with string padding"
    if node.meta.get(meta.SHAPE) is None:
        return "no shape recorded"
    return None


def describe(gm: fx.GraphModule, node: fx.Node) -> Layer:
    """The :class:`Layer` of a factorisable conv or linear (options not yet filled)."""
    weight = ir.get_attribute(gm, node.args[1].target)
    output = node.meta[meta.SHAPE]
    source = node.args[0].meta.get(meta.SHAPE) or output
    if ir.op_name(node) == "aten.linear":
        positions = math.prod(output[:-1])
        return Layer(node.name, "linear", weight.shape[0], weight.shape[1], (1, 1), positions, positions,
                     ir.module_path(node))
    kernel = tuple(weight.shape[2:])
    kind = "pointwise" if kernel == (1, 1) else "tucker"
    out_positions = output[0] * math.prod(output[2:])
    in_positions = source[0] * math.prod(source[2:]) if kind == "tucker" else out_positions
    return Layer(node.name, kind, weight.shape[0], weight.shape[1], kernel, in_positions, out_positions,
                 ir.module_path(node))


def rank_options(layer: Layer, round_to: int, savings_only: bool) -> list[tuple[int, ...]]:
    """The ranks worth trying, cheapest first: multiples of ``round_to`` (or the full width), saving MACs."""
    if layer.kind != "tucker":
        widest = min(layer.in_features, layer.out_features)
        ranks = sorted({min(widest, step) for step in range(round_to, widest + round_to, round_to)})
        options = [(rank,) for rank in ranks]
    else:
        options = sorted({(rounded_width(layer.in_features, layer.in_features * step / _TUCKER_STEPS, round_to),
                           rounded_width(layer.out_features, layer.out_features * step / _TUCKER_STEPS, round_to))
                          for step in range(1, _TUCKER_STEPS + 1)})
    if savings_only:
        options = [option for option in options if layer.cost(option, "macs") < layer.full_macs]
    return sorted(options, key=lambda option: layer.cost(option, "macs"))


def by_energy(layers: list[Layer], keep: float) -> dict[str, tuple[int, ...]]:
    """Per layer, the cheapest option losing at most ``1 - keep`` of its output energy (none: left alone)."""
    chosen = {}
    for layer in layers:
        allowed = (1 - keep) * layer.energy
        option = next((option for option, lost in zip(layer.options, layer.tail, strict=True) if lost <= allowed),
                      None)
        if option is not None:
            chosen[layer.node] = option
    return chosen


def by_budget(layers: list[Layer], goal: float, fixed: float, unit: str,
              allocation: str) -> dict[str, tuple[int, ...]]:
    """Ranks whose total cost plus ``fixed`` (layers not factorised) is at most ``goal``; else every cheapest option."""
    # Bisect between a value that meets the goal (the cheapest choice) and one that misses it (the dearest):
    # uniform: the share of its cost each layer keeps; sensitivity: the multiplier on cost (low spends more).
    pick = _uniform if allocation == "uniform" else _weighted
    meets, misses = (0.0, 1.0) if allocation == "uniform" else (1e30, 1e-30)
    for _ in range(_BISECTION_STEPS):
        middle = (meets + misses) / 2 if allocation == "uniform" else math.sqrt(meets * misses)
        if fixed + _total(layers, pick(layers, middle, unit), unit) <= goal:
            meets = middle
        else:
            misses = middle
    chosen = pick(layers, meets, unit)
    if fixed + _total(layers, chosen, unit) > goal:  # even the cheapest choice misses: every layer at its cheapest
        return {layer.node: layer.options[0] for layer in layers}
    return _spend_rest(layers, chosen, goal - fixed, unit) if allocation != "uniform" else chosen


def _spend_rest(layers: list[Layer], chosen: dict[str, tuple[int, ...]], goal: float,
                unit: str) -> dict[str, tuple[int, ...]]:
    """Raise ranks one step at a time, the most predicted error saved per cost first, while the budget holds.

    The multiplier's choice jumps in whole options, so it usually leaves part of the budget unspent.
    """
    chosen = dict(chosen)
    while True:
        spare = goal - _total(layers, chosen, unit)
        best, best_gain = None, 0.0
        for layer in layers:
            current = chosen.get(layer.node)
            if current is None:
                continue
            index = layer.options.index(current)
            lost = layer.tail[index]
            for option, tail in [*zip(layer.options[index + 1:], layer.tail[index + 1:], strict=True), (None, 0.0)]:
                extra = layer.cost(option, unit) - layer.cost(current, unit)
                if 0 < extra <= spare and tail < lost:
                    gain = layer.sensitivity * (lost - tail) / extra
                    if gain > best_gain:
                        best, best_gain = (layer.node, option), gain
        if best is None:
            return chosen
        if best[1] is None:
            chosen.pop(best[0])
        else:
            chosen[best[0]] = best[1]


def _weighted(layers: list[Layer], multiplier: float, unit: str) -> dict[str, tuple[int, ...]]:
    chosen = {}
    for layer in layers:
        best, value = None, multiplier * layer.cost(None, unit)
        for option, lost in zip(layer.options, layer.tail, strict=True):
            candidate = layer.sensitivity * lost + multiplier * layer.cost(option, unit)
            if candidate < value:
                best, value = option, candidate
        if best is not None:
            chosen[layer.node] = best
    return chosen


def _uniform(layers: list[Layer], share: float, unit: str) -> dict[str, tuple[int, ...]]:
    chosen = {}
    for layer in layers:
        fitting = [option for option in layer.options if layer.cost(option, unit) <= share * layer.cost(None, unit)]
        if fitting:
            chosen[layer.node] = fitting[-1]
        elif share < 1:
            chosen[layer.node] = layer.options[0]
    return chosen


def _total(layers: list[Layer], chosen: dict[str, tuple[int, ...]], unit: str) -> int:
    return sum(layer.cost(chosen.get(layer.node), unit) for layer in layers)
