"""Intermediate-feature distillation: which student tensors to match to which teacher tensors.

Matching only the logits tells a pruned student little per sample; matching the tensors between
blocks as well (FitNets; TinyBERT and MiniLM match every layer's hidden states) gives it a target
at every depth. A feature point is a node of the student whose value can be compared with the
same node of the teacher (the captured IR, same node names):

* the shapes are equal (a LayerNorm's hidden states, a residual stream left unpruned), or
* the student's tensor holds a subset of the teacher's features along one dimension: pruning
  records on each cut writer the features it kept (``meta.KEPT_FEATURES``), and ops whose output
  has their input's shape (activations, residual adds, norms) carry that record forward.

Candidates are the block boundaries that survive the exact passes under their names: a
transformer's hidden states (its LayerNorms' outputs, as TinyBERT and MiniLM match them) where the
model has LayerNorms, else residual adds and activations (a conv's own output is not one: folding a
BatchNorm into it makes the student's ``conv2d`` the teacher's ``batch_norm``), and the outputs of
convs and linears only where there is none of those; never a model output (the logits are matched
already). Every point is
checked on a sample: the teacher's tensor, sliced, must have the student's shape, and the
student's value must be nearer the teacher's than zero is (normalised squared error under
``_MAX_START_ERROR``), so a pair that only shares a name is dropped, never guessed. Up to
``count`` of the rest are taken, spread evenly with the last always in, within a memory budget
for the teacher's cached values (earliest, largest points go first).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx

from compiler import ir, meta

logger = logging.getLogger(__name__)

_NORMS = ("aten.layer_norm", "aten.native_layer_norm")
_BOUNDARIES = ("aten.add", "aten.add_", "aten.relu", "aten.relu_",
               "aten.hardtanh", "aten.hardtanh_", "aten.clamp", "aten.gelu", "aten.silu", "aten.hardswish")
_MAX_START_ERROR = 0.5
_WEIGHTED = ("aten.conv1d", "aten.conv2d", "aten.linear")


@dataclass(frozen=True)
class FeaturePoint:
    """A student node matched to the teacher's node of the same name, sliced to ``index`` along ``dim``."""

    node: str
    dim: int | None = None
    index: torch.Tensor | None = None

    def teacher_view(self, value: torch.Tensor) -> torch.Tensor:
        """The teacher's value as the student holds it."""
        return value if self.index is None else value.index_select(self.dim % value.dim(), self.index)


def feature_points(student: fx.GraphModule, teacher: fx.GraphModule, sample: tuple[torch.Tensor, ...],
                   count: int, budget_bytes: float, samples: int) -> list[FeaturePoint]:
    """Up to ``count`` checked feature points whose teacher values for ``samples`` fit ``budget_bytes``."""
    if count <= 0:
        return []
    names = {node.name for node in teacher.graph.nodes}
    kept = _kept(student)
    candidates = [node for node in _candidates(student) if node.name in names]
    if not candidates:
        return []
    with torch.no_grad():
        teacher_values = _outputs_at(teacher, [node.name for node in candidates])(*sample)[1]
        student_values = _outputs_at(student, [node.name for node in candidates])(*sample)[1]
    checked, sizes = [], []
    for node, mine, theirs in zip(candidates, student_values, teacher_values, strict=True):
        point = _match(node.name, mine, theirs, kept.get(node.name))
        if point is not None and float(feature_loss([mine], [point.teacher_view(theirs)])) < _MAX_START_ERROR:
            checked.append(point)
            sizes.append(mine.numel() // max(1, mine.shape[0]) * mine.element_size())
    chosen = _spread(list(range(len(checked))), count)
    while chosen and sum(sizes[i] for i in chosen) * samples > budget_bytes:
        chosen.pop(0)
    return [checked[i] for i in chosen]


def _candidates(gm: fx.GraphModule) -> list[fx.Node]:
    """LayerNorms' outputs where there are any (a transformer's hidden states), else adds and activations.

    Convs and linears' own outputs only where there is none of those.
    """
    nodes = [node for node in gm.graph.nodes
             if node.op == "call_function" and not any(user.op == "output" for user in node.users)]
    norms = [node for node in nodes if ir.op_name(node) in _NORMS]
    boundaries = [node for node in nodes if ir.op_name(node) in _BOUNDARIES and _tensor_args(node) >= 1
                  and (ir.op_name(node) not in ("aten.add", "aten.add_") or _tensor_args(node) == 2)]
    return norms or boundaries or [node for node in nodes if ir.op_name(node) in _WEIGHTED]


def _tensor_args(node: fx.Node) -> int:
    return sum(isinstance(argument, fx.Node) for argument in node.args)


def _kept(gm: fx.GraphModule) -> dict[str, dict]:
    """Each node's kept-features record: its own (a pruned writer) or carried from a same-shaped input."""
    kept: dict[str, dict] = {}
    for node in gm.graph.nodes:
        if meta.KEPT_FEATURES in node.meta:
            kept[node.name] = node.meta[meta.KEPT_FEATURES]
            continue
        shape = node.meta.get(meta.SHAPE)
        for argument in node.args:
            if isinstance(argument, fx.Node) and argument.name in kept and argument.meta.get(meta.SHAPE) == shape:
                kept[node.name] = kept[argument.name]
                break
    return kept


def _match(name: str, mine: object, theirs: object, record: dict | None) -> FeaturePoint | None:
    if not (isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor) and mine.is_floating_point()
            and mine.dim() >= 2):
        return None
    if mine.shape == theirs.shape:
        return FeaturePoint(name)
    if record is None or mine.dim() != theirs.dim():
        return None
    point = FeaturePoint(name, record["dim"], record["index"])
    if int(point.index.max()) >= theirs.shape[point.dim] or point.teacher_view(theirs).shape != mine.shape:
        return None
    return point


def _spread(indices: list[int], count: int) -> list[int]:
    """``count`` of ``indices`` spread evenly, the last always included, in order."""
    if len(indices) <= count:
        return indices
    step = len(indices) / count
    return sorted({indices[len(indices) - 1 - int(i * step)] for i in range(count)})


def _outputs_at(gm: fx.GraphModule, names: list[str]) -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s weights that returns ``(gm's outputs, [values at names])``."""
    graph = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    outputs = graph.graph_copy(gm.graph, mapping)
    by_name = {node.name: mapping[node] for node in gm.graph.nodes if node in mapping}
    graph.output((outputs, [by_name[name] for name in names]))
    return fx.GraphModule(gm, graph)


def with_features(gm: fx.GraphModule, points: list[FeaturePoint]) -> fx.GraphModule:
    """``gm`` returning ``(outputs, [values at the points])``, sharing its weights."""
    return _outputs_at(gm, [point.node for point in points])


def feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over points of the squared error normalised by the teacher's mean square."""
    terms = [(mine - theirs).pow(2).mean() / theirs.pow(2).mean().clamp_min(1e-12)
             for mine, theirs in zip(student, teacher, strict=True)]
    return torch.stack(terms).mean()
