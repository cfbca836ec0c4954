"""Low-rank factorisation: a linear or conv becomes a chain of thinner layers that keeps its output on real data.

Each factorisable layer (:mod:`passes.low_rank.layers`: a constant, unshared weight; convs with
one group) becomes

* a linear: ``linear(x, B)`` then ``linear(., A, b')``, ``B`` ``r x in`` and ``A`` ``out x r``;
* a 1x1 conv: two 1x1 convs (the first takes the stride and padding);
* a k x k conv (Tucker-2): a 1x1 conv to ``r_in`` channels, the k x k core to ``r_out`` channels
  (stride, padding and dilation as before), a 1x1 conv to the output channels.

The last layer of each chain keeps the original node's name, output and bias, so what follows
(fusion marks, quantisation, recovery's feature points) sees the same tensor.

How the factors are found (``method``):

* ``"activation"`` (default): the truncation that minimises the error of the layer's *output* on the
  calibration data (:mod:`passes.low_rank.factors`), and, with ``refit`` (default), sequentially: the
  factorised model and the original run in lockstep on the calibration samples
  (:func:`passes.prune.reconstruct.reconstruct`), and each layer's rank-limited weight is the
  reduced-rank regression from the inputs it sees in the factorised model to the output it gave
  in the original, so it also absorbs the error of the layers factorised before it;
* ``"svd"``: plain truncated SVD of each weight (HOSVD for Tucker-2), no data: the baseline users try.

Ranks (``{"macs": f}`` or ``{"params": f}``: the share of the conv and linear layers' MACs or
weights to remove; ``{"energy": e}``: per layer, the share of its output energy to keep) are
multiples of the backend's kernel block (``round_to``). With a budget they are allocated by
``allocation="sensitivity"`` (default for ``activation``): each layer is factorised alone at about
half its cost and the model output's error measured on ``probe_samples`` samples, which scales that
layer's own error curve; or ``"uniform"`` (default for ``svd``): the same share of every layer's cost.
Measured on MiniLM's FFN layers at -20% of its Linear MACs, no recovery, 500 held-out sentences
(``python -m bench.low_rank_peers``): plain SVD left cosine 0.711 to the original embeddings, this
pass 0.970 (0.969 with the earlier ``samples=128, probe_samples=32``). On all Linear layers at -30%
before recovery, an eager prototype of the truncation (512 calibration sentences, no weighting, no
re-fit) measured 0.893 at uniform ranks and 0.944 with the sensitivity allocation; in the pass (1024
sentences) the re-fit brought it to 0.955 and the gradient weighting to 0.963.

Padded token data is read at its real tokens only (:func:`compiler.sequences.calibration_samples`).
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree

from compiler import ir, meta, probe
from compiler.errors import PassError
from compiler.pass_base import Pass, PassContext, PassResult
from compiler.sequences import calibration_samples
from passes.low_rank import factors
from passes.low_rank.layers import Layer, by_budget, by_energy, describe, factorisable, rank_options
from passes.prune.importance import ROWS_PER_WEIGHT, input_rows, real_tokens
from passes.prune.reconstruct import least_squares, reconstruct

logger = logging.getLogger(__name__)

_WEIGHTED = ("aten.linear", "aten.conv2d")
_UNITS = {"macs": "MACs", "params": "weights"}
_ROWS_PER_CHUNK = 1 << 16
_IMPORTANCE_FLOOR = 1e-3  # of the mean: a feature the gradient never reached still counts a little
_CHUNK = 32
_COPIED_META = (meta.NN_MODULE_STACK, meta.STACK_TRACE, meta.MODULE_PATH, meta.MODULE_TYPE)


class LowRank(Pass):
    """Factorise convs and linears to a MAC, parameter or energy budget."""

    name = "low_rank"
    exact = False
    default_options = {"macs": 0.0, "params": 0.0, "energy": 0.0, "method": "activation", "allocation": "auto",
                       "round_to": "auto", "protect": [], "refit": True, "samples": 512, "probe_samples": 128,
                       "savings_only": True, "weighting": "gradient"}

    def __init__(self, **options):
        super().__init__(**options)
        self.needs_calibration = self.options["method"] == "activation" or self.options["allocation"] == "sensitivity"

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """One budget in range, a known method and allocation, a positive rounding and sample counts."""
        super().requires(gm, ctx)
        budgets = [key for key in ("macs", "params", "energy") if self.options[key]]
        if len(budgets) != 1:
            raise PassError(f"pass {self.name!r}: give one budget: macs or params (the share to remove, e.g. 0.3) "
                            f"or energy (the share of each layer's output energy to keep, e.g. 0.95); got "
                            f"{budgets or 'none'}")
        for key in ("macs", "params"):
            value = self.options[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise PassError(f"pass {self.name!r}: {key} is the share of the conv and linear layers' "
                                f"{_UNITS[key]} to remove, in [0, 1); got {value!r}")
        energy = self.options["energy"]
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 <= energy <= 1:
            raise PassError(f"pass {self.name!r}: energy is the share of each layer's output energy to keep, in "
                            f"(0, 1]; got {energy!r}")
        if self.options["method"] not in ("activation", "svd"):
            raise PassError(f"pass {self.name!r}: method must be 'activation' (output error on calibration data) "
                            f"or 'svd' (the weight's own singular values), got {self.options['method']!r}")
        if self.options["allocation"] not in ("auto", "sensitivity", "uniform"):
            raise PassError(f"pass {self.name!r}: allocation must be 'auto', 'sensitivity' or 'uniform', "
                            f"got {self.options['allocation']!r}")
        round_to = self.options["round_to"]
        if round_to != "auto" and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise PassError(f"pass {self.name!r}: round_to must be 'auto' or a positive integer, got {round_to!r}")
        if self.options["weighting"] not in ("gradient", "none"):
            raise PassError(f"pass {self.name!r}: weighting must be 'gradient' (each output feature weighted by "
                            "how much the model output moves with it) or 'none', "
                            f"got {self.options['weighting']!r}")
        for key in ("samples", "probe_samples"):
            value = self.options[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PassError(f"pass {self.name!r}: {key} must be a positive integer, got {value!r}")
        if self.needs_calibration and ctx.calibration_data is None:
            raise PassError(f"pass {self.name!r} with method {self.options['method']!r} measures layers on "
                            "calibration data: pass calibration_data (or train_data) to compile(), or use "
                            "method='svd' with allocation='uniform'")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Describe the layers, measure them, choose ranks, fit the factors, rewrite the graph."""
        with torch.no_grad():
            return self._factorise(gm, ctx)

    def _factorise(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        probe.run_annotated(gm, ctx.probe_inputs)
        round_to = ctx.channel_multiple if self.options["round_to"] == "auto" else self.options["round_to"]
        self.activation = self.options["method"] == "activation"
        allocation = self.options["allocation"]
        if allocation == "auto":
            allocation = "sensitivity" if self.activation else "uniform"
        layers, skipped = self._layers(gm, round_to)
        stats: dict = {"method": self.options["method"], "round_to": round_to, "skipped": dict(Counter(skipped)),
                       "layers_factorised": 0, "layers": {}}
        if not layers:
            return PassResult(gm, modified=False, stats=stats)
        samples, valid = self._data(gm, ctx.calibration_data, stats)
        moments = _input_moments(gm, layers, samples, valid) if self.activation else {}
        weighted = self.activation and self.options["weighting"] == "gradient"
        self.importance = _output_importance(gm, layers, samples, valid) if weighted else {}
        for layer in layers:
            _fill_tails(gm, layer, moments.get(layer.node), self.importance.get(layer.node))
        if allocation == "sensitivity" and not self.options["energy"]:
            self._sensitivities(gm, layers, moments, samples)
        chosen, budget = self._ranks(gm, layers, allocation)
        stats.update(budget=budget, allocation=allocation if not self.options["energy"] else "energy")
        if not chosen:
            return PassResult(gm, modified=False, stats=stats)
        plans = self._fit(gm, layers, chosen, moments, samples, valid, stats)
        self._rewrite(gm, plans, ctx.probe_inputs)
        stats.update(self._summary(gm, layers, chosen, budget))
        return PassResult(gm, modified=True, stats=stats)

    def _layers(self, gm: fx.GraphModule, round_to: int) -> tuple[list[Layer], list[str]]:
        layers, skipped = [], []
        for node in gm.graph.nodes:
            if node.op != "call_function" or ir.op_name(node) not in _WEIGHTED:
                continue
            reason = factorisable(gm, node, list(self.options["protect"]))
            if reason is None:
                layer = describe(gm, node)
                layer.options = rank_options(layer, round_to, self.options["savings_only"])
                if not layer.options:
                    reason = f"no rank in multiples of {round_to} saves MACs"
            if reason is None:
                layers.append(layer)
            else:
                skipped.append(reason)
        return layers, skipped

    def _data(self, gm, data, stats: dict) -> tuple[tuple[torch.Tensor, ...] | None, torch.Tensor | None]:
        if data is None:
            return None, None
        samples, valid, padding = calibration_samples(gm, data, self.options["samples"])
        if padding is not None:
            stats["padding"] = padding
        return samples, valid

    def _sensitivities(self, gm: fx.GraphModule, layers: list[Layer], moments: dict, samples) -> None:
        """Each layer's model-output error per unit of its own, factorised alone at about half its cost."""
        inputs = tuple(tensor[: self.options["probe_samples"]] for tensor in samples)
        reference = _outputs(gm, inputs)
        for layer in layers:
            option = min(layer.options, key=lambda o: abs(layer.cost(o, "macs") - layer.full_macs / 2))
            node = _node(gm, layer.node)
            plan = _direct_plan(gm, node, layer, option, moments.get(layer.node), self.importance.get(layer.node))
            with _swapped(gm, node, plan.dense(), plan.bias):
                drift = probe.drift(_outputs(gm, inputs), reference)
            error = 10 ** (-drift.sqnr_db / 10) if drift.sqnr_db is not None else 0.0
            lost = layer.tail[layer.options.index(option)]
            layer.sensitivity = error / lost if lost > 0 else 0.0

    def _ranks(self, gm: fx.GraphModule, layers: list[Layer], allocation: str) -> tuple[dict, dict]:
        if self.options["energy"]:
            return by_energy(layers, self.options["energy"]), {"energy": self.options["energy"]}
        unit = "macs" if self.options["macs"] else "params"
        total = _weighted_cost(gm, unit)
        candidates = sum(layer.cost(None, unit) for layer in layers)
        goal = (1 - self.options[unit]) * total
        chosen = by_budget(layers, goal, total - candidates, unit, allocation)
        after = total - candidates + sum(layer.cost(chosen.get(layer.node), unit) for layer in layers)
        met = after <= goal
        if not met:
            logger.warning("low_rank: %.0f%% of the %s asked, %.1f%% reachable at the smallest ranks",
                           100 * self.options[unit], _UNITS[unit], 100 * (1 - after / total))
        return chosen, {unit: self.options[unit], "removed": round(1 - after / total, 4), "met": met}

    def _fit(self, gm, layers: list[Layer], chosen: dict, moments: dict, samples, valid, stats: dict) -> dict:
        """The factors of every chosen layer: sequential reduced-rank regression, or direct truncation."""
        by_name = {layer.node: layer for layer in layers}
        if not (self.activation and self.options["refit"]):
            return {name: _direct_plan(gm, _node(gm, name), by_name[name], ranks, moments.get(name),
                                       self.importance.get(name)) for name, ranks in chosen.items()}
        plans: dict[str, _Plan] = {}

        def fitter(student, node, env, target, ridge, max_rows, generator, valid_rows):
            plan = _regression_plan(student, node, by_name[node.name], chosen[node.name], env[node.args[0].name],
                                    target, (ridge, max_rows), valid_rows, self.importance.get(node.name))
            plans[node.name] = plan
            _set_weights(student, node, plan.dense(), plan.bias)  # the lockstep run goes on with the factorised layer
            return plan.error_before, plan.error_after

        reference = copy.deepcopy(gm)
        stats["refit"] = reconstruct(gm, reference, samples, set(chosen), {}, valid=valid, fitter=fitter)
        if starved := sorted(name for name, plan in plans.items() if not plan.refitted):
            stats["refit"]["projected_only"] = {"layers": starved, "reason": f"fewer than {ROWS_PER_WEIGHT} "
                                                "calibration rows per input feature"}
            logger.warning("low_rank: %d layer(s) had fewer than %d calibration rows (real tokens or positions) "
                           "per input feature and were only projected, not re-fitted; pass more calibration data",
                           len(starved), ROWS_PER_WEIGHT)
        missing = sorted(set(chosen) - set(plans))
        for name in missing:  # not reached by the lockstep run (no calibration input): truncated directly
            plans[name] = _direct_plan(gm, _node(gm, name), by_name[name], chosen[name], moments.get(name),
                                       self.importance.get(name))
        return plans

    def _rewrite(self, gm: fx.GraphModule, plans: dict, inputs: tuple[torch.Tensor, ...]) -> None:
        """Split every planned node into its chain; check the chain computes what the dense weights did."""
        for name, plan in plans.items():
            _set_weights(gm, _node(gm, name), plan.dense(), plan.bias)
        expected = probe.run_annotated(gm, inputs)
        for name, plan in plans.items():
            _split(gm, _node(gm, name), plan)
        gm.graph.eliminate_dead_code()
        ir.drop_unused_attributes(gm)
        gm.recompile()
        found = probe.run_annotated(gm, inputs)
        if not probe.within_tolerance(found, expected, rtol=1e-3, atol=1e-4 * _scale(expected)):
            raise PassError(f"pass {self.name!r}: the factorised chains do not compute their dense equivalent "
                            f"(drift {probe.drift(found, expected).to_dict()}); this is a bug, please report it")

    def _summary(self, gm: fx.GraphModule, layers: list[Layer], chosen: dict, budget: dict) -> dict:
        rows = {}
        for layer in layers:
            if layer.node in chosen:
                ranks = chosen[layer.node]
                rows[layer.node] = {"module": layer.module, "kind": layer.kind,
                                    "shape": [layer.out_features, layer.in_features, *layer.kernel],
                                    "rank": list(ranks), "macs_kept": round(layer.cost(ranks, "macs")
                                                                            / layer.full_macs, 4),
                                    "energy_lost": round(layer.tail[layer.options.index(ranks)]
                                                         / max(layer.energy, 1e-30), 5),
                                    "sensitivity": float(f"{layer.sensitivity:.4g}")}
        unchanged = len(layers) - len(chosen)
        return {"layers_factorised": len(chosen), "layers": rows,
                "left_at_full_rank": unchanged, "weighted_macs_after": _weighted_cost(gm, "macs")}


class _Plan:
    """A layer's factors: ``first`` (``B``), optional Tucker ``core``, ``last`` (``A``), the bias, and fit errors."""

    def __init__(self, layer: Layer, first: torch.Tensor, last: torch.Tensor, bias: torch.Tensor | None,
                 core: torch.Tensor | None = None, errors: tuple[float, float] = (0.0, 0.0), refitted: bool = False):
        if core is None:  # each rank's row of B and column of A get equal norms: Adam (recovery) moves both alike
            balance = (first.norm(dim=1) / last.norm(dim=0).clamp(min=1e-30)).clamp(min=1e-30).sqrt()
            first, last = first / balance[:, None], last * balance
        self.layer, self.first, self.last = layer, first.float(), last.float()
        self.core = None if core is None else core.float()
        self.bias = None if bias is None else bias.float()
        self.error_before, self.error_after = errors
        self.refitted = refitted  # re-fitted by least squares (enough calibration rows per input feature)

    def dense(self) -> torch.Tensor:
        """The single weight the chain computes, shaped as the original layer's."""
        weight = factors.compose(self.first, self.last, self.core)
        if self.layer.kind == "pointwise":
            return weight.reshape(*weight.shape, 1, 1)
        return weight


def _direct_plan(gm, node: fx.Node, layer: Layer, ranks: tuple[int, ...], moment, importance) -> _Plan:
    """Factors from the original weight alone: activation-aware truncation on the moments, or plain SVD (none)."""
    weight = ir.get_attribute(gm, node.args[1].target).double()
    bias = _bias(gm, node)
    if layer.kind == "tucker":
        first, widen, _ = factors.input_factor(_rows_weighted(weight, importance), moment and moment[1], ranks[0])
        core = torch.einsum("oikl,ir->orkl", weight, widen)  # the conv from the r_in channels
        matrix = core.reshape(core.shape[0], -1)
        if moment is not None:
            mean, covariance = _core_moments(moment, first, layer.kernel)
            squeeze, last, bias = factors.project(matrix, bias, mean, covariance, ranks[1], importance)
        else:
            squeeze, last, bias = factors.weight_svd(matrix, bias, ranks[1])
        return _Plan(layer, first, last, bias, squeeze.reshape(ranks[1], ranks[0], *layer.kernel))
    matrix = weight.reshape(weight.shape[0], -1)
    if moment is not None:
        first, last, bias = factors.project(matrix, bias, moment[0], moment[1], ranks[0], importance)
    else:
        first, last, bias = factors.weight_svd(matrix, bias, ranks[0])
    return _Plan(layer, first, last, bias)


def _rows_weighted(weight: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """The weight's output rows scaled by the square root of their importance (unchanged without one)."""
    if importance is None:
        return weight
    return weight * importance.double().sqrt().reshape(-1, *[1] * (weight.dim() - 1))


def _core_moments(moment, first: torch.Tensor, kernel: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the core's input patches, from the input channels' (taps taken as independent).

    Patches are laid out as ``unfold`` gives them: channel-major, ``(channel, tap)``.
    """
    mean, covariance = moment
    taps = math.prod(kernel)
    inner = first @ covariance @ first.T
    return (first @ mean).repeat_interleave(taps), torch.kron(inner, torch.eye(taps, dtype=inner.dtype))


def _regression_plan(gm, node: fx.Node, layer: Layer, ranks: tuple[int, ...], source: torch.Tensor,
                     target: torch.Tensor, limits: tuple[float, int], valid, importance) -> _Plan:
    """Reduced-rank regression from the factorised model's input to the original output (sequential fit).

    ``limits`` are the least squares' ridge and the most rows it reads.
    """
    ridge, max_rows = limits
    weight = ir.get_attribute(gm, node.args[1].target).double()
    bias = _bias(gm, node)
    first = core_shape = None
    if ir.op_name(node) == "aten.linear":
        source, target = real_tokens(source, valid), real_tokens(target, valid)
        targets = target.reshape(-1, target.shape[-1])
    else:
        images = max(1, -(-2 * max_rows // (target.shape[2] * target.shape[3])))
        source, target = source[:images], target[:images]
        targets = target.permute(0, 2, 3, 1).reshape(-1, target.shape[1])
    if layer.kind == "tucker":
        pixels = source.permute(0, 2, 3, 1).reshape(-1, source.shape[1])
        covariance = factors.moments(_strided(pixels, max_rows))[1]
        first, widen, _ = factors.input_factor(_rows_weighted(weight, importance), covariance, ranks[0])
        weight = torch.einsum("oikl,ir->orkl", weight, widen)
        source = F.conv2d(source, first.float()[:, :, None, None])
        core_shape = (ranks[1], ranks[0], *layer.kernel)
    rows = input_rows(node, source, weight)
    pick = torch.arange(rows.shape[0])[:: max(1, math.ceil(rows.shape[0] / max_rows))]
    rows, targets = rows[pick].double(), targets[pick].double()
    matrix = weight.reshape(weight.shape[0], -1)
    before = _relative_error(rows, targets, matrix, bias)
    refitted = rows.shape[0] >= ROWS_PER_WEIGHT * rows.shape[1]
    if refitted:
        solution = least_squares(rows, targets, with_bias=bias is not None, ridge=ridge)
        matrix, bias = solution[: rows.shape[1]].T, (solution[rows.shape[1]] if bias is not None else None)
    mean, covariance = factors.moments(rows, centred=bias is not None)
    squeeze, last, bias = factors.project(matrix, bias, mean, covariance, ranks[-1], importance)
    after = _relative_error(rows, targets, last @ squeeze, bias)
    if layer.kind == "tucker":
        return _Plan(layer, first, last, bias, squeeze.reshape(core_shape), (before, after), refitted)
    return _Plan(layer, squeeze, last, bias, errors=(before, after), refitted=refitted)


def _relative_error(rows: torch.Tensor, targets: torch.Tensor, matrix: torch.Tensor,
                    bias: torch.Tensor | None) -> float:
    predicted = rows @ matrix.T + (bias if bias is not None else 0)
    return float((predicted - targets).pow(2).mean() / targets.pow(2).mean().clamp(min=1e-30))


def _strided(rows: torch.Tensor, limit: int) -> torch.Tensor:
    return rows[:: max(1, math.ceil(rows.shape[0] / limit))]


def _input_moments(gm: fx.GraphModule, layers: list[Layer], samples, valid) -> dict[str, tuple]:
    """Mean and covariance of every layer's input rows (a Tucker-2 layer's: of its input channels) on the samples."""
    wanted = {layer.node: layer for layer in layers}
    sums: dict[str, list] = {}

    class Watcher(fx.Interpreter):
        def run_node(self, node: fx.Node):
            if node.name in wanted:
                args, _ = self.fetch_args_kwargs_from_env(node)
                rows = _layer_rows(node, wanted[node.name], args[0], args[1], self.valid).double()
                total = sums.setdefault(node.name, [0.0, 0.0, 0])
                total[0], total[1], total[2] = total[0] + rows.sum(0), total[1] + rows.T @ rows, total[2] + len(rows)
            return super().run_node(node)

    watcher = Watcher(gm)
    with torch.no_grad():
        for start in range(0, samples[0].shape[0], _CHUNK):
            watcher.valid = valid[start:start + _CHUNK] if valid is not None else None
            watcher.run(*(tensor[start:start + _CHUNK] for tensor in samples))
    found = {}
    for name, (first, second, count) in sums.items():
        mean = first / max(1, count)
        centred = _bias(gm, _node(gm, name)) is not None
        found[name] = (mean if centred else torch.zeros_like(mean),
                       second / max(1, count) - (torch.outer(mean, mean) if centred else 0))
    return found


def _layer_rows(node: fx.Node, layer: Layer, source: torch.Tensor, weight: torch.Tensor, valid) -> torch.Tensor:
    if layer.kind == "tucker":
        rows = source.permute(0, 2, 3, 1).reshape(-1, source.shape[1])
    else:
        rows = input_rows(node, source, weight, valid=valid)
    return _strided(rows, _ROWS_PER_CHUNK)


def _fill_tails(gm: fx.GraphModule, layer: Layer, moment, importance) -> None:
    """Each option's lost output energy: from the (importance-weighted) output covariance, or the weight's spectrum."""
    weight = _rows_weighted(ir.get_attribute(gm, _node(gm, layer.node).args[1].target).double(), importance)
    if layer.kind != "tucker":
        matrix = weight.reshape(weight.shape[0], -1)
        values = factors.output_spectrum(matrix, moment[1])[0] if moment else factors.weight_spectrum(matrix)
        tail = factors.tail_energy(values)
        layer.tail = [float(tail[option[0]]) for option in layer.options]
        layer.energy = float(tail[0])
        return
    values_in = factors.input_factor(weight, moment[1] if moment else None, 1)[2]
    per_tap = weight.permute(2, 3, 0, 1).reshape(-1, weight.shape[0], weight.shape[1])
    covariance = factors.damped(moment[1]) if moment else torch.eye(weight.shape[1], dtype=weight.dtype)
    output = torch.einsum("toi,ij,tpj->op", per_tap, covariance, per_tap)
    values_out = torch.linalg.eigvalsh(output).flip(0).clamp(min=0)
    tail_in, tail_out = factors.tail_energy(values_in), factors.tail_energy(values_out)
    layer.tail = [float(tail_in[option[0]] + tail_out[option[1]]) for option in layer.options]
    layer.energy = float(tail_out[0])


def _output_importance(gm: fx.GraphModule, layers: list[Layer], samples, valid) -> dict[str, torch.Tensor]:
    """Per output feature of each layer, the mean squared gradient of a random projection of the model's output.

    ``E[g_j^2]`` with ``g = J^T v`` and ``v`` standard normal is the squared norm of column ``j`` of the
    Jacobian ``J`` of the model's first output with respect to the layer's output: how far the model
    output moves per unit of error in that feature. Each layer's output gets a zero tensor added that
    requires a gradient, so one backward pass per chunk measures every layer (real tokens only).
    """
    wanted = {layer.node for layer in layers}
    sums: dict[str, list] = {}
    generator = torch.Generator().manual_seed(0)

    class Tapped(fx.Interpreter):
        def run_node(self, node: fx.Node):
            value = super().run_node(node)
            if node.name in wanted and isinstance(value, torch.Tensor):
                self.taps[node.name] = torch.zeros_like(value, requires_grad=True)
                value = value + self.taps[node.name]
            return value

    for start in range(0, samples[0].shape[0], _CHUNK):
        tapped, mask = Tapped(gm), valid[start:start + _CHUNK] if valid is not None else None
        tapped.taps = {}
        with torch.enable_grad():
            output = _first_float(tapped.run(*(tensor[start:start + _CHUNK] for tensor in samples)))
            if output is None or not output.requires_grad:
                return {}
            direction = torch.randn(output.shape, generator=generator, dtype=output.dtype)
            names = list(tapped.taps)
            grads = torch.autograd.grad((output * direction).sum(), [tapped.taps[n] for n in names], allow_unused=True)
        for name, grad in zip(names, grads, strict=True):
            if grad is not None:
                rows = _feature_rows(grad, mask).double()
                total = sums.setdefault(name, [0.0, 0])
                total[0], total[1] = total[0] + rows.pow(2).sum(0), total[1] + rows.shape[0]
    found = {}
    for name, (squares, count) in sums.items():
        mean = squares / max(1, count)
        mean = mean / mean.mean().clamp(min=1e-30)  # only the ratios matter; mean 1 keeps the factors' scale
        found[name] = mean.clamp(min=_IMPORTANCE_FLOOR)
    return found


def _first_float(outputs: object) -> torch.Tensor | None:
    return next((leaf for leaf in pytree.tree_leaves(outputs)
                 if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()), None)


def _feature_rows(value: torch.Tensor, valid) -> torch.Tensor:
    """A layer output's features as rows: channels of a conv output, the last dimension of a linear's (real tokens)."""
    if value.dim() == 4:
        return value.permute(0, 2, 3, 1).reshape(-1, value.shape[1])
    return real_tokens(value, valid).reshape(-1, value.shape[-1])


def _bias(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    bias = node.args[2] if len(node.args) > 2 else None
    return ir.get_attribute(gm, bias.target).double() if isinstance(bias, fx.Node) else None


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(node for node in gm.graph.nodes if node.name == name)


def _set_weights(gm: fx.GraphModule, node: fx.Node, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    original = ir.get_attribute(gm, node.args[1].target)
    ir.set_attribute(gm, node.args[1].target, weight.to(original.dtype).contiguous())
    if bias is not None and len(node.args) > 2 and isinstance(node.args[2], fx.Node):
        ir.set_attribute(gm, node.args[2].target, bias.to(original.dtype).contiguous())


class _swapped:
    """Within the block, ``node`` computes with ``weight`` and ``bias``; restored after."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node, weight: torch.Tensor, bias: torch.Tensor | None):
        self.gm, self.node, self.weight, self.bias = gm, node, weight, bias

    def __enter__(self):
        self.saved = (ir.get_attribute(self.gm, self.node.args[1].target),
                      ir.get_attribute(self.gm, self.node.args[2].target)
                      if len(self.node.args) > 2 and isinstance(self.node.args[2], fx.Node) else None)
        _set_weights(self.gm, self.node, self.weight, self.bias)

    def __exit__(self, *exc):
        ir.set_attribute(self.gm, self.node.args[1].target, self.saved[0])
        if self.saved[1] is not None:
            ir.set_attribute(self.gm, self.node.args[2].target, self.saved[1])


def _split(gm: fx.GraphModule, node: fx.Node, plan: _Plan) -> None:
    """Rewrite ``node`` as its chain; the node itself becomes the last factor (same name, output and bias)."""
    weight_name = node.args[1].target
    source, bias = node.args[0], node.args[2] if len(node.args) > 2 else None
    if ir.op_name(node) == "aten.linear":
        entry = _attr(gm, weight_name, "in", plan.first, node)
        first = _insert(gm, node, torch.ops.aten.linear.default, (source, entry))
        node.args = (first, _attr(gm, weight_name, "out", plan.last, node), bias)
        return
    geometry = tuple(node.args[3:6]) if len(node.args) > 3 else ()
    plain = ([1, 1], [0, 0], [1, 1], 1)
    entry = plan.first[:, :, None, None]
    if plan.core is None:
        first = _insert(gm, node, torch.ops.aten.conv2d.default,
                        (source, _attr(gm, weight_name, "in", entry, node), None, *geometry))
    else:
        inner = _insert(gm, node, torch.ops.aten.conv2d.default,
                        (source, _attr(gm, weight_name, "in", entry, node), None))
        first = _insert(gm, node, torch.ops.aten.conv2d.default,
                        (inner, _attr(gm, weight_name, "core", plan.core, node), None, *geometry))
    node.args = (first, _attr(gm, weight_name, "out", plan.last[:, :, None, None], node), bias, *plain)


def _insert(gm: fx.GraphModule, before: fx.Node, target, args: tuple) -> fx.Node:
    with gm.graph.inserting_before(before):
        new = gm.graph.call_function(target, args)
    for key in _COPIED_META:
        if key in before.meta:
            new.meta[key] = before.meta[key]
    return new


def _attr(gm: fx.GraphModule, weight_name: str, part: str, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
    return ir.add_get_attr(gm, f"{weight_name}_low_rank_{part}".replace(".", "_"), tensor.contiguous(), before)


def _weighted_cost(gm: fx.GraphModule, unit: str) -> int:
    """MACs (on the probe batch) or weights of every conv and linear."""
    key = meta.MACS if unit == "macs" else meta.PARAMS
    return sum(int(node.meta.get(key, 0)) for node in gm.graph.nodes
               if node.op == "call_function" and ir.op_name(node) in _WEIGHTED)


def _outputs(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``gm``'s flat tensor outputs on ``inputs`` (without annotating: the probe batch's MACs stay in the meta)."""
    with torch.no_grad():
        return tuple(leaf for leaf in pytree.tree_leaves(gm(*inputs)) if isinstance(leaf, torch.Tensor))


def _scale(outputs: tuple[torch.Tensor, ...]) -> float:
    return max((float(t.abs().max()) for t in outputs if t.is_floating_point() and t.numel()), default=1.0)
