"""Structured channel pruning to a MAC or parameter budget: whole channels leave every weight that touches them.

For every prunable coupled group (:mod:`passes.prune.groups`) the channels are scored
(:mod:`passes.prune.importance`: ``l1``/``l2`` weight norms, ``bn_scale`` (folded BatchNorm gammas),
``taylor``, or ``reconstruction``, the measured error their removal leaves in the layers that read
them). The kept channels are chosen by

* ``allocation="uniform"`` (the default for a MAC or parameter budget): the same share of every group;
* ``allocation="sensitivity"`` (the default for a latency budget): one threshold on score per unit
  of cost over all groups, each group's scores first rescaled to the model output's error: the
  group is cut alone to half its channels on calibration samples and the output's relative squared
  error divided by the scores of the channels cut. Measured on EfficientNet-Lite0 after 180 s of
  recovery (``bench/prune_peers.py --train 2048``, ``--latency-prune`` and ``--prune`` choosing the
  allocation): at ``latency=0.7`` it kept 79.6% top-1 agreement at 0.70x of the unpruned latency
  (batch 16), where ``global`` kept 74.4% at 0.69x and ``uniform`` 76.2% at 0.66x; at -30% MACs,
  though, it cut the late layers, cheap in time per MAC, and ran at 0.79x against uniform's
  0.72x, at 79.0% against 81.0%; or
* ``allocation="global"``: one threshold on raw score per MAC (parameter, or measured second)
  a channel costs, over all groups.

each group keeping at least ``1 - max_prune`` of its channels, its width rounded up to a multiple
of ``round_to`` (``"auto"``: the backend's kernel block, 16 for ONNX Runtime on AVX-512, 8 on AVX2;
measured, -30% MACs at widths like 13 or 26 ran 1.4-2.3x slower than unpruned). The share is
bisected until the pruned copy's measured MACs (or parameter count) meet the budget. Layers matching
a ``protect`` pattern keep their output width. The model's outputs always keep theirs (the last
layer is never cut); the first conv is not protected by default: measured on EfficientNet-Lite0 at
-30% MACs after 180 s of recovery, protecting it left 55.6% agreement against 66.0% unprotected,
as the budget then falls on costlier layers.

With a ``latency`` budget (the share of the unpruned latency to reach, e.g. 0.7) a channel costs
the seconds it takes in the backend's kernels instead of MACs: every conv and linear is timed alone
at its shape and at ``round_to`` fewer channels (``compiler.layer_shapes``; ONNX Runtime keeps the
table on disk, one per CPU, so each shape is measured once per machine), the share is bisected on
the table's predicted latency, and the pruned copy is then exported and timed side by side with the
unpruned model at ``latency_batch``; when it misses, or lands more than ``_LATENCY_SLACK`` under
the ratio asked, the aim moves by the miss, kept between the highest aim that met and the lowest
that missed (at most four tries), and the try keeping most channels
among those that met the ratio is cut. The ledger keeps each try's predicted and measured ratio.
A target that quantises times the layers in its integer kernels (the backend's
``layer_timer("int8")``), where the cost of a channel differs: on EfficientNet-Lite0 at batch 16
the stem and the first three blocks (10 layers, 22% of the MACs) take 50% of the int8 table's time,
against 43% of the float table's.

With ``reconstruct`` (default), every layer that read pruned channels is then re-fitted by least
squares on calibration activations (:mod:`passes.prune.reconstruct`). Pruning changes the outputs
(``exact = False``); recovery (distillation) is a separate pass. Groups left alone are listed
with the reason: refused by the group analysis, tied weights, protected, or too narrow to round.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
import math

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from compiler import ir, meta, probe
from compiler.errors import PassError
from compiler.layer_shapes import LayerShape, layer_shapes, predicted_seconds
from compiler.pass_base import Pass, PassContext, PassResult
from compiler.sequences import calibration_samples
from passes.prune import importance
from passes.prune.groups import ChannelGroup, Member, channel_groups
from passes.prune.reconstruct import reconstruct
from passes.prune.slicing import features, keep_channels, shared_weights

logger = logging.getLogger(__name__)

_BISECTION_STEPS = 12
_UNITS = {"macs": "MACs", "params": "parameters"}
_BUDGETS = ("macs", "params", "latency")
_LATENCY_ATTEMPTS = 4
_LATENCY_SLACK = 0.015  # a measured ratio this far under the one asked is close enough; further, cut less
_ALLOCATIONS = ("global", "sensitivity", "uniform")
_SENSITIVITY_SAMPLES = 32


class PruneChannels(Pass):
    """Remove the least important channels of every prunable group until the MAC budget holds."""

    name = "prune_channels"
    exact = False
    default_options = {"macs": 0.0, "params": 0.0, "latency": 0.0, "latency_batch": 0,
                       "importance": "reconstruction", "allocation": "auto",
                       "max_prune": 0.8, "round_to": "auto", "protect": [], "reconstruct": "readers",
                       "reconstruct_samples": 128}

    def __init__(self, **options):
        super().__init__(**options)
        budget = self.options["macs"] or self.options["params"] or self.options["latency"]
        self.needs_calibration = bool(budget) and self._data_aware()

    def _data_aware(self) -> bool:
        """Whether scoring, allocating or re-fitting reads calibration data."""
        return (bool(self.options["reconstruct"]) or self.options["importance"] in ("reconstruction", "taylor")
                or self._allocation() == "sensitivity")

    def _allocation(self) -> str:
        """The allocation asked, ``"auto"`` resolved: sensitivity for a latency budget, uniform otherwise."""
        if self.options["allocation"] != "auto":
            return self.options["allocation"]
        return "sensitivity" if self.options["latency"] else "uniform"

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Options in range: one budget in [0, 1), a known importance and allocation, a positive rounding."""
        super().requires(gm, ctx)
        for key in ("macs", "params"):
            value = self.options[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise PassError(f"pass {self.name!r}: {key} is the fraction of {_UNITS[key]} to remove, in [0, 1); "
                                f"got {value!r}")
        latency, batch = self.options["latency"], self.options["latency_batch"]
        if isinstance(latency, bool) or not isinstance(latency, (int, float)) or not 0 <= latency < 1:
            raise PassError(f"pass {self.name!r}: latency is the share of the unpruned model's measured latency to "
                            f"reach, in (0, 1) (0.7: run in 0.7x the time); got {latency!r}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
            raise PassError(f"pass {self.name!r}: latency_batch is the batch size latency is measured at (0: the "
                            f"example's), got {batch!r}")
        if sum(bool(self.options[key]) for key in _BUDGETS) > 1:
            raise PassError(f"pass {self.name!r}: give one budget, macs, params or latency, not several")
        if latency and ctx.layer_timer is None:
            raise PassError(f"pass {self.name!r}: target {ctx.target_name!r}'s backend cannot time layers, so it "
                            "cannot prune to a latency; give a MAC budget, e.g. macs=0.3")
        if self.options["importance"] not in importance.KINDS:
            raise PassError(f"pass {self.name!r}: importance {self.options['importance']!r} is not one of "
                            f"{', '.join(importance.KINDS)}")
        if self.options["reconstruct"] not in (True, False, "all", "readers"):
            raise PassError(f"pass {self.name!r}: reconstruct must be 'all' (every layer from the first cut on), "
                            "'readers' (the layers that read cut channels) or False, "
                            f"got {self.options['reconstruct']!r}")
        if self.options["allocation"] not in ("auto", *_ALLOCATIONS):
            raise PassError(f"pass {self.name!r}: allocation must be 'auto' (sensitivity for a latency budget, "
                            "uniform otherwise), 'global', 'sensitivity' or 'uniform', "
                            f"got {self.options['allocation']!r}")
        max_prune = self.options["max_prune"]
        if isinstance(max_prune, bool) or not isinstance(max_prune, (int, float)) or not 0 < max_prune <= 1:
            raise PassError(f"pass {self.name!r}: max_prune (the most of one group's channels removed) must be "
                            f"in (0, 1], got {max_prune!r}")
        round_to = self.options["round_to"]
        if round_to != "auto" and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise PassError(f"pass {self.name!r}: round_to must be 'auto' or a positive integer, got {round_to!r}")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Score channels, bisect the share kept on copies, cut ``gm`` itself, then re-fit its readers."""
        probe.run_annotated(gm, ctx.probe_inputs)
        self.round_to = ctx.channel_multiple if self.options["round_to"] == "auto" else self.options["round_to"]
        self.inputs = ctx.probe_inputs
        self.timer, self.batch = ctx.layer_timer, self.options["latency_batch"] or int(ctx.probe_inputs[0].shape[0])
        groups, skipped = self._candidates(gm)
        kind = next((key for key in _BUDGETS if self.options[key]), "macs")
        self.allocation = self._allocation()
        if self.options[kind] == 0 or not groups:
            return PassResult(gm, modified=False, stats={"groups_pruned": 0, "skipped": _counted(skipped)})
        stats: dict = {"budget": {kind: self.options[kind]}}
        samples, valid = self._data(gm, ctx.calibration_data, stats) if self._data_aware() else (None, None)
        scores = importance.scores(gm, groups, self.options["importance"], samples, valid=valid)
        if self.options["importance"] == "bn_scale" and (unscaled := importance.without_batch_norm(gm, groups)):
            stats["scored_by_l2"] = unscaled  # no folded BatchNorm to read a scale from
        if self.allocation == "sensitivity":
            scores = self._scaled_by_sensitivity(gm, groups, scores, samples, stats)
        self.shapes = layer_shapes(gm, self.batch) if kind == "latency" else {}  # the unpruned layers, read once
        costs = [self._channel_cost(gm, group, kind) for group in groups]
        if kind == "latency":
            share = self._latency_share(gm, groups, scores, costs, ctx.probe_inputs, stats)
            kept = self._kept(groups, scores, costs, share)
        else:
            full = self._measure(gm, kind)
            budget = (1 - self.options[kind]) * full
            share = self._share(gm, groups, scores, costs, ctx.probe_inputs, budget, kind)
            kept = self._give_back(gm, groups, scores, self._kept(groups, scores, costs, share), budget, kind)
            self._check_budget(gm, groups, scores, kept, ctx, kind, full, stats)
        reference = copy.deepcopy(gm) if self.options["reconstruct"] else None
        rows: dict[str, torch.Tensor] = {}
        widths = self._apply(gm, groups, scores, kept, rows)  # the pass manager re-annotates afterwards
        stats.update({"groups_pruned": len(widths), "allocation": self.allocation, "kept_share": round(share, 4),
                      "round_to": self.round_to,
                      "widths": widths, "skipped": _counted(skipped)})
        if reference is not None and widths:
            stats["reconstruction"] = reconstruct(gm, reference, samples, self._fitted(gm, groups, rows), rows,
                                                  valid=valid)
        return PassResult(gm, modified=bool(widths), stats=stats)

    def _data(self, gm: fx.GraphModule, data, stats: dict) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        """Calibration samples for scoring and re-fitting, and the mask of their real tokens (None: all real).

        Padded token data is read for as many real tokens as ``reconstruct_samples`` full-length
        samples hold (:func:`compiler.sequences.calibration_samples`; measured on MiniLM at -30% MACs
        before recovery: 128 padded sentences left cosine 0.864 to the unpruned embeddings, the real
        tokens of 1024 sentences 0.963).
        """
        if data is None:
            raise PassError("pass 'prune_channels' measures and re-fits channels on calibration data: pass "
                            "calibration_data, or prune with importance='l1' and reconstruct=False")
        samples, valid, padding = calibration_samples(gm, data, self.options["reconstruct_samples"])
        if padding is not None:
            stats["padding"] = padding
        return samples, valid

    def _latency_share(self, gm, groups, scores, costs, inputs, stats: dict) -> float:
        """The share whose pruned copy *measures* at the latency asked, aiming the layer table lower if needed.

        The table (each conv and linear timed alone) predicts the pruned latency; the pruned copy is
        then exported and timed side by side with the unpruned model at ``latency_batch``. When it
        misses, the prediction's aim is lowered by the miss and the share bisected again.
        """
        wanted, full = self.options["latency"], self._measure(gm, "latency")
        batched = _batched(inputs, self.batch)
        aim, attempts, bounds = wanted, [], [0.0, math.inf]  # the highest aim that met, the lowest that missed
        for _ in range(_LATENCY_ATTEMPTS):
            share = self._share(gm, groups, scores, costs, inputs, aim * full, "latency")
            trial = copy.deepcopy(gm)
            self._apply(trial, groups, scores, self._kept(groups, scores, costs, share))
            probe.run_annotated(trial, inputs)
            seconds = self.timer.compare({"unpruned": gm, "pruned": trial}, batched)
            measured = seconds["pruned"] / seconds["unpruned"]
            attempts.append({"aim": round(aim, 4), "kept_share": share,
                             "predicted": round(self._measure(trial, "latency") / full, 4),
                             "measured": round(measured, 4)})
            if wanted - _LATENCY_SLACK <= measured <= wanted or (share == 0 and measured > wanted):
                break  # met closely, or every group is at its floor already
            bounds = [max(bounds[0], aim), bounds[1]] if measured <= wanted else [bounds[0], min(bounds[1], aim)]
            aim = next_aim(aim, wanted / measured, bounds)
        self.timer.save()
        met = [attempt for attempt in attempts if attempt["measured"] <= wanted]
        chosen = max(met, key=lambda attempt: attempt["kept_share"]) if met else attempts[-1]
        share = chosen["kept_share"]
        for attempt in attempts:
            attempt["kept_share"] = round(attempt["kept_share"], 4)
        stats["latency"] = {"batch": self.batch, "precision": self.timer.precision,
                            "table_seconds_unpruned": round(full, 6), "attempts": attempts, "met": bool(met),
                            "chosen": attempts.index(chosen)}
        if not met:
            logger.warning("prune_channels: latency %.2fx of the unpruned model asked, %.2fx measured at batch %d "
                           "(max_prune %.2f and round_to %d bound the cut)", wanted, chosen["measured"],
                           self.batch, self.options["max_prune"], self.round_to)
        return share

    def _scaled_by_sensitivity(self, gm, groups, scores, samples, stats: dict) -> list[torch.Tensor]:
        """Scores rescaled to the model output's error: each group cut alone to half, measured.

        A group's sensitivity is the relative squared error of the model's outputs (on
        ``_SENSITIVITY_SAMPLES`` calibration samples) with that group alone cut to half its channels,
        over the summed scores of the channels cut. Scaled by it, a score predicts what the channel's
        removal costs at the output, so one threshold on score per cost weighs every group alike.
        """
        inputs = tuple(tensor[:_SENSITIVITY_SAMPLES] for tensor in samples)
        reference = _float_outputs(gm, inputs)
        signal = sum(float(value.double().square().sum()) for value in reference) or 1.0
        floor = 1 - self.options["max_prune"]
        scaled, errors = [], {}
        for index, group in enumerate(groups):
            half = rounded_width(group.channels, max(group.channels / 2, floor * group.channels), self._round(group))
            kept = [other.channels for other in groups]
            kept[index] = half
            trial = copy.deepcopy(gm)
            self._apply(trial, groups, scores, kept)
            noise = sum(float((out.double() - ref.double()).square().sum())
                        for out, ref in zip(_float_outputs(trial, inputs), reference, strict=True))
            removed = float(scores[index].sort(descending=True).values[half:].sum())
            scaled.append(scores[index] * (noise / signal / removed if removed > 0 else 0.0))
            path = group.members[0].module_path or "<root>"
            errors[path if path not in errors else f"{path}#{index}"] = round(noise / signal, 6)
        stats["sensitivity"] = {"samples": int(inputs[0].shape[0]), "output_error_at_half": errors}
        return scaled

    def _fitted(self, gm: fx.GraphModule, groups: list[ChannelGroup], rows: dict) -> set[str]:
        """Layers to re-fit: the readers of pruned channels, or every conv and linear from the first cut on."""
        cut = [group for group in groups if any(member.node in rows for member in group.members)]
        readers = {member.node for group in cut for member in group.members if member.role == "in"}
        if self.options["reconstruct"] == "readers":
            return readers
        weighted = [node.name for node in gm.graph.nodes
                    if node.op == "call_function" and ir.op_name(node) in ("aten.conv2d", "aten.linear")]
        touched = readers | set(rows)
        first = min((index for index, name in enumerate(weighted) if name in touched), default=len(weighted))
        return set(weighted[first:])

    def _candidates(self, gm: fx.GraphModule) -> tuple[list[ChannelGroup], list[str]]:
        groups, skipped = [], []
        patterns = list(self.options["protect"])
        for group in channel_groups(gm):
            reason = self._skip_reason(gm, group, patterns)
            if reason is None:
                groups.append(group)
            else:
                skipped.append(reason)
        return groups, skipped

    def _skip_reason(self, gm: fx.GraphModule, group: ChannelGroup, patterns: list[str]) -> str | None:
        if not group.prunable:
            return group.refusals[0]
        if shared := shared_weights(gm, group):
            return f"tied weight {shared[0]}"
        paths = [member.module_path for member in group.members if member.role != "in"]  # whose width it is
        if any(fnmatch.fnmatchcase(path, pattern) for path in paths for pattern in patterns):
            return "protected"
        if group.channels <= self._round(group):
            return f"{group.channels} channels, not above round_to {self.round_to}"
        return None

    def _measure(self, gm: fx.GraphModule, kind: str) -> float:
        """Total MACs (annotated by the last probe run), parameters, or table-predicted seconds of ``gm``."""
        if kind == "latency":
            return predicted_seconds(gm, self.timer, self.batch)
        return probe.total_macs(gm) if kind == "macs" else ir.parameter_count(gm)

    def _channel_cost(self, gm: fx.GraphModule, group: ChannelGroup, kind: str) -> float:
        """MACs (annotated), parameters or table seconds one channel of ``group`` costs, over all its members."""
        nodes = {node.name: node for node in gm.graph.nodes}
        if kind == "macs":
            total = sum(nodes[m.node].meta.get(meta.MACS, 0) for m in group.members)
        elif kind == "params":
            total = sum(ir.node_parameter_count(gm, nodes[m.node]) for m in group.members)
        else:
            return max(1e-9, self._seconds_saved(gm, group) / self._round(group))
        return max(1.0, total / group.channels)

    def _seconds_saved(self, gm: fx.GraphModule, group: ChannelGroup) -> float:
        """Table seconds saved by cutting ``round_to`` channels (in the group's units) from every member."""
        shapes, step = self.shapes, self._round(group)
        saved = 0.0
        for member in group.members:
            shape = shapes.get(member.node)
            if shape is not None and member.role != "norm":
                saved += self.timer.seconds(shape) - self.timer.seconds(narrower(shape, member, step))
        return saved

    def _share(self, gm, groups, scores, costs, inputs, budget: float, kind: str) -> float:
        """The largest share of channels kept whose pruned copy meets the budget (bisection)."""
        low, high = 0.0, 1.0
        for _ in range(_BISECTION_STEPS):
            middle = (low + high) / 2
            trial = copy.deepcopy(gm)
            self._apply(trial, groups, scores, self._kept(groups, scores, costs, middle))
            if kind != "params":
                probe.run_annotated(trial, inputs)
            low, high = (middle, high) if self._measure(trial, kind) <= budget else (low, middle)
        return low

    def _kept(self, groups, scores, costs, share: float) -> list[int]:
        """Channels kept per group: ``share`` of each (uniform) or above one pooled threshold (global)."""
        if self.allocation == "uniform":  # else global or sensitivity (the scores already rescaled)
            wanted = [max(1, math.ceil(group.channels * share)) for group in groups]
        else:
            per_cost = [score / cost for score, cost in zip(scores, costs, strict=True)]
            threshold = torch.quantile(torch.cat(per_cost).float(), 1 - share) if share > 0 else math.inf
            wanted = [int((score >= threshold).sum()) for score in per_cost]
        floor = 1 - self.options["max_prune"]
        return [rounded_width(group.channels, max(count, math.ceil(floor * group.channels)), self._round(group))
                for group, count in zip(groups, wanted, strict=True)]

    def _round(self, group: ChannelGroup) -> int:
        """``round_to`` in the group's channels: features of width ``unit`` (an attention head) count ``unit``."""
        return max(1, math.ceil(self.round_to / group.unit))

    def _give_back(self, gm, groups, scores, kept: list[int], budget: float, kind: str) -> list[int]:
        """Channels handed back, ``round_to`` at a time, to the groups that gain most per MAC, within budget.

        One share for all groups overshoots the budget where widths round coarsely (ResNet-18 lost
        42% of its MACs for 30% asked); the estimate scales each layer's cost by the kept shares of
        the groups it reads and writes, exact for convs and linears.
        """
        estimate = _WidthCost(gm, groups, kind)
        slack = budget - self._measure_kept(gm, groups, scores, kept, kind)
        kept = list(kept)
        while True:
            best = None
            for index, group in enumerate(groups):
                more = min(group.channels, kept[index] + self._round(group))
                if more == kept[index]:
                    continue
                trial = [*kept[:index], more, *kept[index + 1:]]
                added = estimate(trial) - estimate(kept)
                if added > slack:
                    continue
                gain = float(scores[index].sort(descending=True).values[kept[index]:more].sum())
                if best is None or gain / max(added, 1e-12) > best[0]:
                    best = (gain / max(added, 1e-12), index, more, added)
            if best is None:
                return kept
            kept[best[1]], slack = best[2], slack - best[3]

    def _check_budget(self, gm, groups, scores, kept, ctx: PassContext, kind: str, full: float, stats: dict) -> None:
        """Record the share really removed; a budget the floors and rounding cannot reach is a fallback."""
        removed = 1 - self._measure_kept(gm, groups, scores, kept, kind) / full
        stats["removed"] = round(removed, 4)
        if removed < self.options[kind] - 1e-6:
            message = (f"prune_channels: {removed:.1%} of the {_UNITS[kind]} removed, {self.options[kind]:.0%} asked: "
                       f"groups at max_prune {self.options['max_prune']} or too narrow for round_to {self.round_to} "
                       "(see skipped); a smaller round_to or a larger max_prune reaches further")
            logger.warning(message)
            ctx.fallbacks.append(message)

    def _measure_kept(self, gm, groups, scores, kept: list[int], kind: str) -> float:
        """MACs or parameters of a copy of ``gm`` cut to ``kept``."""
        trial = copy.deepcopy(gm)
        self._apply(trial, groups, scores, kept)
        if kind != "params":
            probe.run_annotated(trial, self.inputs)
        return self._measure(trial, kind)

    def _apply(self, gm, groups, scores, kept: list[int], rows: dict | None = None) -> dict[str, list[int]]:
        """Cut every group to its ``kept`` count; ``rows`` collects each writer's kept rows."""
        widths = {}
        for index, (group, count) in enumerate(zip(groups, kept, strict=True)):
            if count >= group.channels:
                continue
            keep = torch.sort(torch.topk(scores[index], count).indices).values
            keep_channels(gm, group, keep)
            _mark_kept(gm, group, keep)
            if rows is not None:
                rows.update({m.node: keep for m in group.members if m.role != "in"})
            widths[group.members[0].module_path or "<root>"] = [group.channels, count]
        gm.recompile()
        return widths


_FEATURE_DIM = {"aten.conv1d": 1, "aten.conv2d": 1, "aten.linear": -1, "aten.batch_norm": 1,
                "aten._native_batch_norm_legit_no_training": 1}


def _mark_kept(gm: fx.GraphModule, group: ChannelGroup, keep: torch.Tensor) -> None:
    """Record on each writer which features of its unpruned output it kept (for feature distillation)."""
    nodes = {node.name: node for node in gm.graph.nodes}
    for member in group.members:
        node = nodes[member.node]
        dim = _FEATURE_DIM.get(ir.op_name(node))
        if member.role in ("out", "depthwise", "norm") and dim is not None:
            node.meta[meta.KEPT_FEATURES] = {"dim": dim, "index": features(keep, member.per_channel)}
        if member.role in ("out", "depthwise") and meta.BN_GAMMA in node.meta:
            node.meta[meta.BN_GAMMA] = node.meta[meta.BN_GAMMA][features(keep, member.per_channel)]


class _WidthCost:
    """MACs or parameters of the grouped layers at given kept widths, from the unpruned layers' costs."""

    def __init__(self, gm: fx.GraphModule, groups: list[ChannelGroup], kind: str):
        nodes = {node.name: node for node in gm.graph.nodes}
        self.channels = [group.channels for group in groups]
        self.layers: dict[str, tuple[float, set[int]]] = {}
        for index, group in enumerate(groups):
            for member in group.members:
                node = nodes[member.node]
                cost = node.meta.get(meta.MACS, 0) if kind == "macs" else ir.node_parameter_count(gm, node)
                _, indices = self.layers.setdefault(member.node, (float(cost), set()))
                indices.add(index)

    def __call__(self, kept: list[int]) -> float:
        """Total cost of the grouped layers with ``kept`` channels per group."""
        return sum(cost * math.prod(kept[i] / self.channels[i] for i in indices)
                   for cost, indices in self.layers.values())


def narrower(shape: LayerShape, member: Member, channels: int) -> LayerShape:
    """``shape`` with ``channels`` fewer of the group's channels (``per_channel`` features each) in ``member``."""
    if member.role == "out":
        return dataclasses.replace(shape, out_channels=shape.out_channels - channels * member.per_channel)
    if member.role == "in":
        return dataclasses.replace(shape, in_channels=shape.in_channels - channels * member.per_channel)
    return dataclasses.replace(shape, in_channels=shape.in_channels - channels,
                               out_channels=shape.out_channels - channels, groups=shape.groups - channels)


def next_aim(aim: float, correction: float, bounds: list[float]) -> float:
    """The next latency aim: ``aim`` scaled by the miss, or halfway between the bounds outside them.

    Scaled lower when it missed, higher when it cut more than asked; halfway between the highest
    aim that met and the lowest that missed where the scaled aim falls outside them (timing noise
    makes the scaled one overshoot both ways).
    """
    met, missed = bounds
    proposal = aim * correction
    if missed < math.inf and met > 0 and not met < proposal < missed:
        return (met + missed) / 2
    return proposal


def _float_outputs(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """``gm``'s floating-point output tensors on ``inputs``, without gradients."""
    with torch.no_grad():
        leaves = pytree.tree_leaves(gm(*inputs))
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]


def _batched(inputs: tuple[torch.Tensor, ...], batch: int) -> tuple[torch.Tensor, ...]:
    """``inputs`` repeated along dimension 0 to ``batch`` rows."""
    return tuple(torch.cat([value] * math.ceil(batch / value.shape[0]))[:batch] for value in inputs)


def rounded_width(channels: int, wanted: float, round_to: int) -> int:
    """``wanted`` channels rounded up to a multiple of ``round_to``, at least ``round_to``, at most all."""
    return min(channels, max(round_to, math.ceil(wanted / round_to) * round_to))


def _counted(reasons: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in reasons:
        counts[reason] = counts.get(reason, 0) + 1
    return counts


