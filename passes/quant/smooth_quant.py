"""``smooth_quant``: move activation outliers of Linear inputs into the weights (Xiao et al. 2022).

A few channels of a transformer's activations are far larger than the rest, so one per-tensor
quantisation step fits them and wastes the grid on the others. For a tensor ``X`` read only by
Linear layers ``Y_i = X W_i^T``, dividing channel ``j`` of ``X`` by ``s_j`` and multiplying
column ``j`` of every ``W_i`` by ``s_j`` leaves every ``Y_i`` unchanged, with

    s_j = max|X_j| ** alpha / max_i max|W_i[:, j]| ** (1 - alpha)

(one ``s`` for all readers, so Q, K and V built from one LayerNorm output share it). The division
is folded into the op that produces ``X``, and only where that is exact:

* ``aten.layer_norm`` over the last dimension with an affine weight of its own: ``LN(x)_j =
  n_j * w_j + b_j``, so ``w_j / s_j`` and ``b_j / s_j`` divide channel ``j`` by ``s_j``;
* ``aten.linear`` with constant weight and bias of its own: rows ``j`` of the weight and ``b_j``.

Every reader of ``X`` must be a Linear reading it as its input: ``aten.linear`` (weight column
``j``), or ``aten.matmul``/``aten.mm``/``aten.addmm`` with a constant 2-D weight (row ``j``), whose
weight no other op reads. A LayerNorm also read by a residual add (post-LN BERT) is refused: the
add would see the divided values. ``max|X_j|`` is measured by running the calibration data
through the graph, so the pass declares ``needs_calibration``. A tensor whose largest channel
maximum is below ``outlier_threshold`` times the median one has no outliers and is left alone.
Run it before ``calibrate``: it changes weights and activation ranges. Arithmetic is float64.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from compiler import ir
from compiler.errors import CalibrationDataError, PassError
from compiler.pass_base import Pass, PassContext, PassResult
from passes.quant.calibration_data import CalibrationBatches

logger = logging.getLogger(__name__)
aten = torch.ops.aten

# Readers: op -> (index of the activation input, index of the weight, weight axis of input channels).
_READERS = {
    aten.linear.default: (0, 1, 1), aten.matmul.default: (0, 1, 0), aten.mm.default: (0, 1, 0),
    aten.addmm.default: (1, 2, 0),
}


@dataclass
class Group:
    """A tensor to smooth: its producer, the producer's constants and the Linears that read it."""

    producer: fx.Node
    weight: fx.Node  # LayerNorm weight, or the producing Linear's weight (channel = row)
    bias: fx.Node | None
    readers: list[fx.Node]


class SmoothQuant(Pass):
    """Divide outlier activation channels by ``s`` in their producer and multiply the readers' weights by ``s``."""

    name = "smooth_quant"
    exact = True
    needs_calibration = True
    default_options: dict[str, Any] = {"alpha": 0.5, "outlier_threshold": 5.0, "batch_size": 32}

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Needs validated calibration data and sane options."""
        super().requires(gm, ctx)
        if not isinstance(ctx.calibration_data, CalibrationBatches):
            raise CalibrationDataError(
                f"pass {self.name!r} measures activation maxima, so target {ctx.target_name!r} needs "
                "calibration_data: representative inputs shaped like the example inputs"
            )
        alpha, threshold = self.options["alpha"], self.options["outlier_threshold"]
        if not 0 <= alpha <= 1:
            raise PassError(f"pass {self.name!r}: alpha must lie in [0, 1], got {alpha!r}")
        if not threshold >= 1:
            raise PassError(f"pass {self.name!r}: outlier_threshold must be at least 1, got {threshold!r}")
        batch_size = self.options["batch_size"]
        if not isinstance(batch_size, int) or batch_size < 1:
            raise PassError(f"pass {self.name!r}: batch_size must be a positive int, got {batch_size!r}")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Measure the candidate tensors' channel maxima, then smooth those with outliers."""
        groups, refusals = find_groups(gm)
        # Measured once, before any smoothing: smoothing a group changes only its own producer's
        # output (every other tensor is computed exactly as before), so the maxima stay valid.
        maxima = channel_maxima(gm, [group.producer for group in groups], ctx.calibration_data,
                                self.options["batch_size"]) if groups else {}
        rows = []
        for group in groups:
            row = self._smooth(gm, group, maxima.get(group.producer))
            if isinstance(row, str):
                refusals.append((group.producer, row))
            else:
                rows.append(row)
        logger.debug("smooth_quant: %d of %d tensors smoothed", len(rows), len(groups))
        return PassResult(gm, modified=bool(rows), stats={
            "smoothed": len(rows), "candidates": len(groups),
            "refused": dict(Counter(reason for _, reason in refusals)), "layers": rows,
            "left_alone": [{"producer": ir.module_path(node) or node.name, "reason": reason}
                           for node, reason in refusals],
        })

    def _smooth(self, gm: fx.GraphModule, group: Group, activation: torch.Tensor | None) -> dict | str:
        """Smooth one group; return its ledger row, or why it was left alone."""
        if activation is None:
            return "never reached by the calibration data"
        ratio = outlier_ratio(activation)
        if ratio < self.options["outlier_threshold"]:
            return f"no outlier channels (max/median below {self.options['outlier_threshold']:g})"
        weight = torch.stack([_column_maxima(gm, reader) for reader in group.readers]).amax(dim=0)
        scale = smoothing_scales(activation, weight, self.options["alpha"])
        _apply(gm, group, scale)
        return {
            "producer": ir.module_path(group.producer), "producer_op": ir.op_name(group.producer),
            "layers": [ir.module_path(reader) for reader in group.readers], "channels": int(scale.numel()),
            "max_scale": float(scale.max()), "min_scale": float(scale.min()),
            "outlier_ratio_before": ratio, "outlier_ratio_after": outlier_ratio(activation / scale),
        }


def find_groups(gm: fx.GraphModule) -> tuple[list[Group], list[tuple[fx.Node, str]]]:
    """Every tensor read by Linears whose producer can absorb a per-channel scale; (producer, reason) for the rest."""
    groups, refusals = [], []
    producers = [_activation(reader) for reader in ir.call_nodes(gm) if reader.target in _READERS]
    for producer in dict.fromkeys(node for node in producers if node is not None):
        group = match_group(gm, producer)
        if isinstance(group, str):
            refusals.append((producer, group))
        else:
            groups.append(group)
    return groups, refusals


def _activation(reader: fx.Node) -> fx.Node | None:
    """The activation input of a Linear-like op with a constant weight, else None."""
    activation_index, weight_index, _ = _READERS[reader.target]
    weight = reader.args[weight_index] if len(reader.args) > weight_index else None
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    value = reader.args[activation_index]
    return value if isinstance(value, fx.Node) else None


def match_group(gm: fx.GraphModule, producer: fx.Node) -> Group | str:
    """The group of ``producer``'s tensor, or the reason it cannot be smoothed exactly."""
    readers = list(producer.users)
    for reader in readers:
        reason = _reader_refusal(gm, producer, reader)
        if reason:
            return reason
    if producer.target == aten.layer_norm.default:
        shape, weight = producer.args[1], producer.args[2] if len(producer.args) > 2 else None
        bias = producer.args[3] if len(producer.args) > 3 else None
        if len(shape) != 1:
            return "LayerNorm over more than the last dimension"
    elif producer.target == aten.linear.default:
        weight, bias = producer.args[1], producer.args[2] if len(producer.args) > 2 else None
    else:
        return f"producer {ir.op_name(producer)} cannot absorb a per-channel scale"
    if ir.tensor_of(gm, weight) is None or ir.is_shared(weight):
        return f"producer {ir.op_name(producer)} has no weight of its own"
    if bias is not None and (ir.tensor_of(gm, bias) is None or ir.is_shared(bias)):
        return f"producer {ir.op_name(producer)} has no bias of its own"
    return Group(producer, weight, bias, readers)


def _reader_refusal(gm: fx.GraphModule, producer: fx.Node, reader: fx.Node) -> str:
    """Why ``reader`` stops the smoothing of ``producer``'s tensor ("" when it does not)."""
    if reader.target not in _READERS or _activation(reader) is not producer:
        return f"also read by {ir.op_name(reader)}"
    _, weight_index, _ = _READERS[reader.target]
    weight = reader.args[weight_index]
    if producer in reader.args[weight_index + 1:] or ir.is_shared(weight):
        return "a reader shares its weight or reads the tensor twice"
    if reader.target != aten.linear.default and ir.tensor_of(gm, weight).dim() != 2:
        return "a reader's weight is not a matrix"
    return ""


def _column_maxima(gm: fx.GraphModule, reader: fx.Node) -> torch.Tensor:
    """Largest weight magnitude per input channel of a reader."""
    _, weight_index, axis = _READERS[reader.target]
    weight = ir.tensor_of(gm, reader.args[weight_index]).detach().double().abs()
    return weight.amax(dim=1 - axis)


def outlier_ratio(maxima: torch.Tensor) -> float:
    """Largest channel maximum over the median one (inf when the median is 0)."""
    median = float(maxima.median())
    return float(maxima.max()) / median if median > 0 else float("inf")


def smoothing_scales(activation: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """``max|X_j|^alpha / max|W_j|^(1 - alpha)``; 1 where either is 0 or the result is not finite."""
    scale = activation.pow(alpha) / weight.pow(1 - alpha)
    usable = (activation > 0) & (weight > 0) & torch.isfinite(scale) & (scale > 0)
    return torch.where(usable, scale, torch.ones_like(scale))


def _apply(gm: fx.GraphModule, group: Group, scale: torch.Tensor) -> None:
    """Divide the producer's channel ``j`` by ``s_j``; multiply every reader's input channel ``j`` by it."""
    weight = ir.tensor_of(gm, group.weight)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    ir.set_attribute(gm, group.weight.target, (weight.double() / scale.reshape(shape)).to(weight.dtype))
    if group.bias is not None:
        bias = ir.tensor_of(gm, group.bias)
        ir.set_attribute(gm, group.bias.target, (bias.double() / scale).to(bias.dtype))
    for reader in group.readers:
        _, weight_index, axis = _READERS[reader.target]
        node = reader.args[weight_index]
        value = ir.tensor_of(gm, node)
        factor = scale.reshape(-1, 1) if axis == 0 else scale.reshape(1, -1)
        ir.set_attribute(gm, node.target, (value.double() * factor).to(value.dtype))


class _MaximumRecorder(fx.Interpreter):
    """Runs the graph and keeps the running per-channel (last dimension) maximum of |value| of watched nodes."""

    def __init__(self, gm: fx.GraphModule, watched: list[fx.Node]):
        super().__init__(gm)
        self.watched = set(watched)
        self.maxima: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, node: fx.Node) -> Any:
        """Run one node; fold its output into the maxima when it is watched."""
        value = super().run_node(node)
        if node in self.watched and isinstance(value, torch.Tensor):
            current = value.detach().abs().reshape(-1, value.shape[-1]).amax(dim=0).double()
            previous = self.maxima.get(node)
            self.maxima[node] = current if previous is None else torch.maximum(previous, current)
        return value


def channel_maxima(gm: fx.GraphModule, nodes: list[fx.Node], batches: CalibrationBatches,
                   batch_size: int) -> dict[fx.Node, torch.Tensor]:
    """``max |value|`` per last-dimension channel of each node's output over the calibration data."""
    recorder = _MaximumRecorder(gm, nodes)
    with torch.no_grad():
        for batch in batches:
            count = batch[0].shape[0] if batch and batch[0].dim() else 1
            for start in range(0, count, batch_size):
                recorder.run(*(tensor[start:start + batch_size] if tensor.dim() else tensor for tensor in batch))
    return recorder.maxima
