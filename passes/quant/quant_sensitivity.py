"""``quant_sensitivity``: per-layer sensitivity, and float fallback for the most harmful layers.

For every op the plan runs on integers, the calibration samples run through a simulation in which
only that op is quantised (its activation inputs, its weight and bias, its output); the SQNR of
the model's output against float ranks the ops. Then, with everything quantised, the most harmful
ops move back to float one by one until the budget holds: the model output's SQNR is at least
``min_sqnr_db`` and its drop against float is at most ``max_drop`` (top-1 disagreement for
``metric="top1"``, ``1 - mean cosine`` for ``metric="cosine"``), or ``max_float`` ops are float.
Ops whose multiply-accumulates would take the float share past ``max_float_macs`` are skipped, so
at least ``1 - max_float_macs`` of the work stays in integer kernels. The share is counted against
the model as captured: after pruning has removed 30% of the MACs, the stem that was 2.8% of the
model is 4% of what is left but costs the same time in float, and a budget read against the pruned
model would quantise it where the unpruned model keeps it float (on EfficientNet-Lite0, a slower
int8 stem and first depthwise conv: 5.2 + 5.5 ms against 3.8 + 2.6 ms float at batch 16).

Quantisation noise from different layers roughly adds up at the output (on EfficientNet-Lite0 the
sum of the single-layer noise powers gives 21.1 dB where the all-int8 model measures 22.9 dB; the
single-layer runs count each activation quantiser twice, as one op's output and the next one's
input). So an op whose noise alone, ``10 ** (-sqnr_alone / 10)``, is under ``min_noise_share`` of
the current output noise cannot buy much by going float, while a float layer between integer ones
costs layout changes around it: the fallback stops there. Before this rule, a depthwise conv at
42 dB was kept float on EfficientNet-Lite0 for no change of output SQNR and 5% of batch-16 latency.

Decisions go into ``node.meta[QUANT_DECISION]`` (the policy keeps those ops in float); the graph
itself is untouched, so the pass reports ``modified=False``. The ledger lists every op with its
module path, SQNR and decision.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from compiler import ir, meta, probe
from compiler.errors import PassError, TargetError
from compiler.pass_base import Pass, PassContext, PassResult
from compiler.quant_ops import quantize_dequantize
from compiler.quant_policy import WEIGHTED, QuantPolicy
from passes.quant.insert_qdq import activation_qparams, weight_integers, weight_largest, weight_scales
from passes.quant.plan import QuantPlan, plan_quantization

logger = logging.getLogger(__name__)


class _QuantSimulation(fx.Interpreter):
    """Runs the graph with only ``enabled`` integer ops quantised (weights, inputs, outputs)."""

    def __init__(self, gm: fx.GraphModule, plan: QuantPlan, policy: QuantPolicy):
        super().__init__(gm)
        self.policy, self.enabled = policy, set()
        self.qparams = {node: activation_qparams(node.meta[meta.QUANT_RANGE]["low"],
                                                 node.meta[meta.QUANT_RANGE]["high"], policy)
                        for node in plan.activations}
        self.output_of = {}  # tensor node -> integer op writing it
        self.inputs_of: dict[fx.Node, list[fx.Node]] = {}  # integer op -> its quantised input sources
        self.edges_of: dict[fx.Node, list[tuple[fx.Node, fx.Node]]] = {}  # reader -> [(source, integer op)]
        for source, point in plan.activations.items():
            for user, _, _ in point.edges:
                consumer = _consumer(user, plan)
                self.inputs_of.setdefault(consumer, []).append(source)
                self.edges_of.setdefault(user, []).append((source, consumer))
            if point.all_users:
                self.output_of[source] = _producer(source, plan)
        self.weights = {point.op: point for point in plan.weights}
        self._dequantized: dict[fx.Node, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def run_node(self, node: fx.Node) -> Any:
        """Run ``node`` with quantised inputs and weights if it is enabled; quantise enabled outputs."""
        if node in self.enabled and node in self.weights:
            return self._run_weighted(node)
        value = super().run_node(node)
        if self.output_of.get(node) in self.enabled:
            value = self._quantize(node, value)
        return value

    def _quantize(self, source: fx.Node, value: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.qparams[source]
        qmin, qmax = self.policy.activation_range
        return quantize_dequantize(value, scale, zero_point, qmin, qmax)

    def fetch_args_kwargs_from_env(self, node: fx.Node):
        """Arguments of ``node``; an edge leading to an enabled op reads its source quantised."""
        args, kwargs = super().fetch_args_kwargs_from_env(node)
        sources = [source for source, consumer in self.edges_of.get(node, []) if consumer in self.enabled]
        if not sources:
            return args, kwargs
        quantized = {id(self.env[source]): self._quantize(source, self.env[source]) for source in sources}
        args = pytree.tree_map(lambda value: quantized.get(id(value), value), args)
        return args, kwargs

    def _run_weighted(self, node: fx.Node) -> torch.Tensor:
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        weight, bias = self._weights(node, args)
        args = list(args)
        args[WEIGHTED[ir.op_name(node)][1]] = weight
        if bias is not None:
            args[2] = bias
        value = node.target(*args, **kwargs)
        if self.output_of.get(node) in self.enabled:
            value = self._quantize(node, value)
        return value

    def _weights(self, node: fx.Node, args) -> tuple[torch.Tensor, torch.Tensor | None]:
        if node not in self._dequantized:
            point = self.weights[node]
            weight = args[WEIGHTED[ir.op_name(node)][1]]
            largest = weight_largest(node, weight, self.policy)
            scales = weight_scales(weight, point.axis, largest)
            shape = [-1] + [1] * (weight.dim() - 1)
            integers = weight_integers(point.weight, weight, scales, point.axis, largest)
            dequantized = integers.float() * scales.reshape(shape)
            bias = args[2] if len(args) > 2 and isinstance(args[2], torch.Tensor) else None
            sources = self.inputs_of.get(node, [])
            if bias is not None and sources:
                step = scales.double() * self.qparams[sources[0]][0]
                bias = (torch.round(bias.double() / step) * step).float()
            self._dequantized[node] = (dequantized, bias)
        return self._dequantized[node]


def _consumer(user: fx.Node, plan: QuantPlan) -> fx.Node:
    """The integer op an edge leads to (through pass-through ops)."""
    integer = set(plan.integer_ops)
    while user not in integer and len(user.users) == 1:
        user = next(iter(user.users))
    return user


def _producer(source: fx.Node, plan: QuantPlan) -> fx.Node:
    """The integer op whose output (possibly after a fused activation) ``source`` is."""
    integer = set(plan.integer_ops)
    if source in integer:
        return source
    argument = source.args[0] if source.args else None
    return argument if argument in integer else source


class QuantSensitivity(Pass):
    """Rank integer ops by output SQNR when quantised alone; keep the worst in float until the budget holds."""

    name = "quant_sensitivity"
    exact = True
    default_options = {"samples": 8, "metric": "cosine", "max_drop": None, "min_sqnr_db": None,
                       "max_float": 16, "max_float_macs": 0.1, "min_noise_share": 0.05}

    def __init__(self, **options: Any):
        super().__init__(**options)
        if self.options["metric"] not in ("cosine", "top1"):
            raise TargetError(f"pass {self.name!r}: metric must be 'cosine' or 'top1', got {self.options['metric']!r}")
        share = self.options["min_noise_share"]
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share < 1:
            raise TargetError(f"pass {self.name!r}: min_noise_share is a fraction in [0, 1), got {share!r}")

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Needs calibrated ranges (run after ``calibrate``) and calibration data."""
        super().requires(gm, ctx)
        if ctx.quant_policy is None or ctx.calibration_data is None:
            raise PassError(f"pass {self.name!r} needs the quantisation policy and calibration data")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Measure, decide, and record."""
        policy = ctx.quant_policy
        plan = plan_quantization(gm, policy)
        batch = _first_samples(ctx.calibration_data, self.options["samples"])
        simulation = _QuantSimulation(gm, plan, policy)
        with torch.no_grad():
            reference = _flat(simulation.run(*batch))
            rows = [self._alone(simulation, op, batch, reference) for op in plan.integer_ops]
            chosen, quality = self._fallback(simulation, plan, rows, batch, reference, _macs_scale(gm, ctx))
        by_name = {op.name: op for op in plan.integer_ops}
        for row in rows:
            row["decision"] = "float" if row["op"] in chosen else "int8"
            by_name[row["op"]].meta[meta.QUANT_SENSITIVITY] = {"sqnr_db": row["sqnr_db"], "decision": row["decision"]}
            if row["op"] in chosen:
                chosen[row["op"]].meta[meta.QUANT_DECISION] = (
                    f"float: output SQNR {row['sqnr_db']:.1f} dB when quantised alone (quant_sensitivity)")
        return PassResult(gm, modified=False, stats={
            "samples": int(batch[0].shape[0]), "metric": self.options["metric"], "float_ops": len(chosen),
            "quality": quality, "layers": rows,
        })

    def _alone(self, simulation: _QuantSimulation, op: fx.Node, batch, reference) -> dict[str, Any]:
        simulation.enabled = {op}
        output = _flat(simulation.run(*batch))
        return {"op": op.name, "module_path": ir.module_path(op), "kind": ir.op_name(op),
                "sqnr_db": _sqnr(output, reference)}

    def _fallback(self, simulation, plan, rows, batch, reference, scale: float = 1.0
                  ) -> tuple[dict[str, fx.Node], dict[str, Any]]:
        """Move the most harmful ops to float until the budget holds, within the float MAC share allowed.

        ``scale`` is the captured model's MACs over this one's (above 1 after pruning), so the share
        is of the integer work the captured model had.
        """
        by_name = {op.name: op for op in plan.integer_ops}
        total_macs = sum(op.meta.get(meta.MACS, 0) for op in plan.integer_ops) * scale or 1
        candidates = iter(sorted(rows, key=lambda row: row["sqnr_db"]))
        chosen: dict[str, fx.Node] = {}
        float_macs = 0
        while True:
            simulation.enabled = set(plan.integer_ops) - set(chosen.values())
            quality = self._quality(_flat(simulation.run(*batch)), reference)
            quality["float_macs_share"] = float_macs / total_macs
            if self._holds(quality) or len(chosen) >= self.options["max_float"]:
                return chosen, quality
            row = next((row for row in candidates if _affordable(
                by_name[row["op"]], float_macs, total_macs, self.options["max_float_macs"])), None)
            if row is None:
                return chosen, quality
            share = _noise_share(row["sqnr_db"], quality["sqnr_db"])
            if share < self.options["min_noise_share"]:
                quality["stopped"] = (f"{row['module_path'] or row['op']} holds {share:.1%} of the output noise, "
                                      f"under min_noise_share {self.options['min_noise_share']:g}")
                return chosen, quality
            op = by_name[row["op"]]
            chosen[op.name] = op
            float_macs += op.meta.get(meta.MACS, 0)

    def _quality(self, output: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, float]:
        first, expected = output[0].flatten(1).double(), reference[0].flatten(1).double()
        if self.options["metric"] == "top1":
            drop = float((first.argmax(1) != expected.argmax(1)).double().mean())
        else:
            drop = 1.0 - float(torch.nn.functional.cosine_similarity(first, expected, dim=1).mean())
        return {"sqnr_db": _sqnr(output, reference), "drop": drop}

    def _holds(self, quality: dict[str, float]) -> bool:
        max_drop, min_sqnr = self.options["max_drop"], self.options["min_sqnr_db"]
        if max_drop is None and min_sqnr is None:
            return True
        return (max_drop is None or quality["drop"] <= max_drop) and (
            min_sqnr is None or quality["sqnr_db"] >= min_sqnr)


def _macs_scale(gm: fx.GraphModule, ctx: PassContext) -> float:
    """The captured model's MACs over ``gm``'s (1 when the graph has not shrunk, or is unknown)."""
    current = probe.total_macs(gm)
    return max(1.0, ctx.captured_macs / current) if current and ctx.captured_macs else 1.0


def _noise_share(alone_db: float, current_db: float) -> float:
    """The share of the current output noise that an op's own noise (its SQNR when quantised alone) makes up."""
    if math.isinf(alone_db):
        return 0.0 if alone_db > 0 else 1.0
    if math.isinf(current_db):
        return 0.0 if current_db > 0 else 1.0
    return min(1.0, 10 ** ((current_db - alone_db) / 10))


def _affordable(op: fx.Node, float_macs: int, total_macs: int, share: float) -> bool:
    """A weighted op whose MACs keep the float share within ``share``.

    Ops without MACs (residual adds, pooling) stay on integers: in float they would cost a
    dequantise, a float op and a quantise (and layout changes) for no accuracy the convs lack.
    """
    macs = op.meta.get(meta.MACS, 0)
    return macs > 0 and (float_macs + macs) / total_macs <= share


def _first_samples(batches, count: int) -> tuple[torch.Tensor, ...]:
    taken, total = [], 0
    for batch in batches:
        taken.append(batch)
        total += batch[0].shape[0]
        if total >= count:
            break
    return tuple(torch.cat([batch[index] for batch in taken])[:count] for index in range(len(taken[0])))


def _flat(outputs: object) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(outputs) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]


def _sqnr(output: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    signal = sum(float(ref.double().pow(2).sum()) for ref in reference)
    noise = sum(float((out.double() - ref.double()).pow(2).sum()) for out, ref in zip(output, reference, strict=True))
    return math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf
