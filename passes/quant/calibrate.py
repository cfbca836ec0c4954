"""``calibrate``: observe every tensor the placement plan will quantise, over the calibration data.

The graph runs batch by batch through an interpreter; each planned tensor feeds a streaming
observer (histograms, never stored activations), so memory does not grow with the number of
samples. The chosen range of each tensor goes into ``node.meta[QUANT_RANGE]``; the graph itself is
untouched, so the pass reports ``modified=False``.

Option ``ranges`` (``{module path pattern: [low, high]}``, ``fnmatch`` patterns) fixes the range of
the output an integer layer at that path writes (after its fused activation) instead of observing
it, for activations whose range is known, e.g. ``{"features.*.relu6": [0, 6]}``. The range must
hold zero, as every quantisation grid does. A pattern that names no module of the model is a
TargetError; one whose modules write no quantised output (layers kept in float) is logged and
counted under ``ranges_unused``.
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
import math
from collections import Counter
from typing import Any

import torch
import torch.fx as fx

from compiler import ir, meta, probe
from compiler.errors import CalibrationDataError, PassError, TargetError
from compiler.pass_base import Pass, PassContext, PassResult
from passes.quant.calibration_data import CalibrationBatches
from passes.quant.observers import OBSERVERS, Observer, make_observer
from passes.quant.plan import concat_groups, plan_quantization

logger = logging.getLogger(__name__)


class _ObservingInterpreter(fx.Interpreter):
    """Runs the graph and hands the outputs of the watched nodes to their observers."""

    def __init__(self, gm: fx.GraphModule, observers: dict[fx.Node, Observer], sample_limit: int | None):
        super().__init__(gm)
        self.observers, self.sample_limit = observers, sample_limit
        self.channel_sums: dict[fx.Node, dict[str, Any]] = {}  # per-channel sums, for bias correction

    def run_node(self, node: fx.Node) -> Any:
        """Run one node; observe its output when it is watched."""
        value = super().run_node(node)
        observer = self.observers.get(node)
        if observer is not None:
            observer.observe(value, self.sample_limit)
            self._add_channel_sums(node, value)
        return value

    def _add_channel_sums(self, node: fx.Node, value: torch.Tensor) -> None:
        """Sum each channel (dimension 1 of NCHW tensors; the last dimension of others) and count."""
        if value.dim() < 2 or not value.is_floating_point():
            return
        record = self.channel_sums.setdefault(node, {"conv": 0.0, "linear": 0.0, "conv_count": 0, "linear_count": 0})
        data = value.detach()
        # float32 sums per image (or per row block), float64 across them: a float64 reduction of the whole
        # tensor cost 3 s of EfficientNet-Lite0's 256-sample calibration, for means that need no more.
        if data.dim() == 4:  # NCHW, read by convolutions
            record["conv"] = record["conv"] + data.float().sum(dim=(2, 3)).double().sum(dim=0)
            record["conv_count"] += data.numel() // data.shape[1]
        else:  # (batch, features) or (batch, sequence, features), read by linear layers
            rows = data.float().reshape(-1, data.shape[-1])
            record["linear"] = record["linear"] + torch.stack([block.sum(dim=0) for block in rows.split(4096)]
                                                              ).double().sum(dim=0)
            record["linear_count"] += data.numel() // data.shape[-1]

    def channel_means(self, node: fx.Node) -> dict[str, list[float]]:
        """Mean of every channel of ``node``'s output over the calibration data, both layouts."""
        record = self.channel_sums.get(node)
        if record is None:
            return {}
        return {kind: (record[kind] / record[f"{kind}_count"]).float().tolist()
                for kind in ("conv", "linear") if record[f"{kind}_count"]}


class Calibrate(Pass):
    """Observe the tensors to quantise and record each one's range (metadata only)."""

    name = "calibrate"
    exact = True
    needs_calibration = True
    # linear_heavy_observer: the observer for models with most MACs in Linear/matmul ops (transformers),
    # whose activations carry outlier channels that clipping calibrators cut (TensorRT advises MinMax for BERT).
    default_options = {
        "observer": "mse", "observer_options": {}, "overrides": {}, "batch_size": 32, "sample_limit": 1 << 18,
        "linear_heavy_observer": None, "ranges": {},
    }

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.options["ranges"] = _validated_ranges(self.options["ranges"])

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Calibration needs validated data and a placement policy."""
        super().requires(gm, ctx)
        if not isinstance(ctx.calibration_data, CalibrationBatches):
            raise CalibrationDataError(
                f"target {ctx.target_name!r} calibrates, so it needs calibration_data: a few hundred "
                "representative inputs shaped like the example inputs"
            )
        if ctx.quant_policy is None:
            raise PassError(f"pass {self.name!r} needs the target's quantisation policy")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Run the calibration batches and write every planned tensor's range."""
        self._check_range_paths(gm)
        plan = plan_quantization(gm, ctx.quant_policy)
        default, choice = self._default_observer(gm, ctx)
        observers = {node: self._observer(node, ctx.quant_policy.activation_symmetric, default)
                     for node in plan.activations}
        interpreter = _ObservingInterpreter(gm, observers, self.options["sample_limit"])
        samples = 0
        with torch.no_grad():
            for batch in ctx.calibration_data:
                for chunk in _chunks(batch, self.options["batch_size"]):
                    interpreter.run(*chunk)
                    samples += chunk[0].shape[0] if chunk and chunk[0].dim() else 1
        kinds = Counter()
        for node, observer in observers.items():
            node.meta[meta.QUANT_RANGE] = {**_range_record(node, observer),
                                           "channel_mean": interpreter.channel_means(node)}
            if meta.FIXED_RANGE in node.meta:  # known, e.g. 8-bit pixels: [0, 255], which no observer may clip
                low, high = node.meta[meta.FIXED_RANGE]
                node.meta[meta.QUANT_RANGE].update(low=float(low), high=float(high), observer="fixed")
        fixed = self._fix_ranges(plan, observers)
        for node in observers:
            kinds[node.meta[meta.QUANT_RANGE]["observer"]] += 1
        shared = _share_concat_ranges(plan) if ctx.quant_policy.share_concat_scale else 0
        return PassResult(gm, modified=False, stats={
            "tensors": len(observers), "samples": samples, "observers": dict(kinds), "concat_shared": shared,
            **choice,
            "data": ctx.calibration_data.summary(), **fixed,
        })

    def _check_range_paths(self, gm: fx.GraphModule) -> None:
        """Every ``ranges`` pattern names a module of the model (TargetError naming it otherwise)."""
        paths = {ir.module_path(node) for node in gm.graph.nodes} - {""}
        for pattern in self.options["ranges"]:
            if not any(_matches(path, pattern) for path in paths):
                raise TargetError(f"pass {self.name!r}: option ranges names {pattern!r}, which matches no module "
                                  f"path of the model (e.g. {', '.join(sorted(paths)[:5])})")

    def _fix_ranges(self, plan, observers: dict[fx.Node, Observer]) -> dict[str, Any]:
        """Apply the ``ranges`` option to the integer layers' outputs; a record of what it fixed."""
        ranges = self.options["ranges"]
        if not ranges:
            return {}
        fixed, used = {}, set()
        for node in observers:
            written = _written_by(node, plan)
            pattern = next((p for p in ranges if any(_matches(path, p) for path in written)), None)
            if pattern is None:
                continue
            low, high = ranges[pattern]
            node.meta[meta.QUANT_RANGE].update(low=low, high=high, observer="fixed")
            fixed[node.name] = pattern
            used.add(pattern)
        unused = [pattern for pattern in ranges if pattern not in used]
        if unused:
            logger.info("calibrate: ranges pattern(s) %s match no quantised layer output (layers kept in float?)",
                        ", ".join(map(repr, unused)))
        return {"ranges_fixed": fixed, "ranges_unused": unused}

    def _default_observer(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[str, dict[str, Any]]:
        """The observer for tensors without an override, and a record of how it was chosen."""
        heavy = self.options["linear_heavy_observer"]
        if heavy is None:
            return self.options["observer"], {}
        share = probe.linear_mac_share(gm, ctx.example_inputs)
        chosen = heavy if share >= 0.5 else self.options["observer"]
        return chosen, {"observer_choice": {"chosen": chosen, "linear_mac_share": round(share, 4),
                                            "linear_heavy_observer": heavy, "otherwise": self.options["observer"]}}

    def _observer(self, node: fx.Node, symmetric: bool, default: str | None = None) -> Observer:
        """The observer for ``node``: ``default`` (the pass's), or the override for its module path.

        A symmetric policy makes clipping observers search one threshold for ``|x|`` (unless the
        options say otherwise), so the range they pick is the one the symmetric grid will use.
        """
        default = default or self.options["observer"]
        path = ir.module_path(node)
        spec = self.options["overrides"].get(path) or self.options["overrides"].get(node.name)
        name = spec if isinstance(spec, str) else (spec or {}).get("observer", default)
        options = dict(self.options["observer_options"]) if name == self.options["observer"] else {}
        observer_class = OBSERVERS.get(name)  # an unknown name is make_observer's error to give
        if symmetric and observer_class is not None and "symmetric" in inspect.signature(observer_class).parameters:
            options.setdefault("symmetric", True)
        return make_observer(name, **options)

    def ensures(self, gm: fx.GraphModule) -> None:
        """Every range is finite and non-empty."""
        for node in gm.graph.nodes:
            record = node.meta.get(meta.QUANT_RANGE)
            if record is not None and not record["high"] > record["low"]:
                raise PassError(f"calibrated range of {node.name} is empty: {record}")


def _validated_ranges(ranges: object) -> dict[str, tuple[float, float]]:
    """The ``ranges`` option as ``{pattern: (low, high)}``; TargetError naming the entry at fault."""
    if not isinstance(ranges, dict):
        raise TargetError(f"pass 'calibrate': option ranges must be a dict {{module path: [low, high]}}, "
                          f"got {type(ranges).__name__}")
    checked = {}
    for pattern, bounds in ranges.items():
        where = f"pass 'calibrate': ranges[{pattern!r}]"
        if not isinstance(pattern, str) or not pattern:
            raise TargetError(f"pass 'calibrate': option ranges is keyed by module paths, got {pattern!r}")
        if not isinstance(bounds, (list, tuple)) or len(bounds) != 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bounds):
            raise TargetError(f"{where} must be two finite numbers [low, high], got {bounds!r}")
        low, high = float(bounds[0]), float(bounds[1])
        if not low <= 0.0 <= high or not low < high:
            raise TargetError(f"{where} = {[low, high]} must satisfy low <= 0 <= high and low < high "
                              "(a quantisation grid holds zero)")
        checked[pattern] = (low, high)
    return checked


def _matches(path: str, pattern: str) -> bool:
    return path == pattern or fnmatch.fnmatchcase(path, pattern)


def _written_by(node: fx.Node, plan) -> list[str]:
    """The module paths of the integer layer writing ``node`` (and of its fused activation); none for other tensors."""
    point = plan.activations[node]
    if not point.all_users:
        return []
    writer = node if node in plan.integer_ops else node.args[0] if node.args else None
    if writer not in plan.integer_ops:
        return []
    return [path for path in {ir.module_path(writer), ir.module_path(node)} if path]


def _share_concat_ranges(plan) -> int:
    """Give each concat's quantised inputs and output the union of their ranges; return the tensors changed."""
    changed = 0
    for group in concat_groups(plan):
        low = min(node.meta[meta.QUANT_RANGE]["low"] for node in group)
        high = max(node.meta[meta.QUANT_RANGE]["high"] for node in group)
        for node in group:
            record = node.meta[meta.QUANT_RANGE]
            changed += (record["low"], record["high"]) != (low, high)
            record.update(low=low, high=high, shared_with=sorted(other.name for other in group if other is not node))
    return changed


def _range_record(node: fx.Node, observer: Observer) -> dict[str, Any]:
    try:
        low, high = observer.range()
    except ValueError as error:
        raise PassError(
            f"tensor {node.name} (module {ir.module_path(node) or '<root>'!r}) was never observed with a finite "
            f"value during calibration: {error}. Check that the calibration data reach this layer"
        ) from error
    return {"low": float(low), "high": float(high), "observer": observer.name,
            "min": float(observer.minimum), "max": float(observer.maximum)}


def _chunks(batch: tuple[torch.Tensor, ...], size: int):
    """Split a batch along dimension 0 into pieces of at most ``size`` samples."""
    count = batch[0].shape[0] if batch and batch[0].dim() else 1
    if count <= size:
        yield batch
        return
    for start in range(0, count, size):
        yield tuple(tensor[start:start + size] for tensor in batch)
