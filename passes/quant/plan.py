"""Where the quantisers go: a pure function of the graph and the placement policy.

``calibrate`` observes exactly the tensors this plan names and ``insert_qdq`` quantises exactly
those, so the two can never disagree about what was calibrated.

Two kinds of activation quantisers:

* An integer op's *output* (after a fused ReLU/ReLU6) is quantised for every user: the runtime's
  integer kernel writes integers, so every reader sees the quantised value.
* A float tensor read by an integer op is quantised only on the edges into integer ops (looking
  through pad, reshape and other pass-through ops); its float readers keep the float value, as
  they do behind a QuantizeLinear/DequantizeLinear pair in ONNX.

A policy that does not quantise weighted ops' outputs (TensorRT's) leaves conv and linear outputs
float, and quantises only the skip input of a residual add (role ``"residual"``). With
``share_concat_scale``, :func:`concat_groups` lists the tensors that must share one range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from compiler import ir
from compiler.quant_policy import INTEGER, WEIGHTED, QuantPolicy

aten = torch.ops.aten

#: An edge into a user: (user node, argument index, index within a list argument or None).
Edge = tuple[fx.Node, int, int | None]


@dataclass
class ActivationPoint:
    """One activation tensor to quantise.

    Attributes:
        source: the node producing the tensor.
        all_users: quantise it for every reader (the output of an integer kernel).
        edges: otherwise, the edges into integer ops (or pass-through chains leading to them).
        reasons: why, one short line per requesting op, for the ledger.
        ops: the integer ops that read or write the tensor (one entry per reason).
    """

    source: fx.Node
    all_users: bool = False
    edges: list[Edge] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    ops: list[fx.Node] = field(default_factory=list)


@dataclass
class WeightPoint:
    """A weighted op whose constant weight is quantised per output channel."""

    op: fx.Node
    weight: fx.Node
    axis: int


@dataclass
class QuantPlan:
    """Every quantiser to insert, activations in graph order."""

    activations: dict[fx.Node, ActivationPoint]
    weights: list[WeightPoint]
    integer_ops: list[fx.Node]
    residual_adds: list[fx.Node] = field(default_factory=list)


def plan_quantization(gm: fx.GraphModule, policy: QuantPolicy) -> QuantPlan:
    """Walk the graph once and list the quantisers ``policy`` needs."""
    activations: dict[fx.Node, ActivationPoint] = {}
    weights, integer_ops, residual_adds = [], [], []
    outputs = _model_outputs(gm)
    for node in gm.graph.nodes:
        role = policy.role(node)
        if role == "residual":
            residual_adds.append(node)
            _, skip = policy.residual_inputs(node)
            source, entry = _look_through((node, skip, None), policy)
            point = activations.setdefault(source, ActivationPoint(source))
            point.edges.append(entry)
            point.reasons.append(f"skip input of residual add {node.name}")
            point.ops.append(node)
            continue
        if role not in ("weighted", "integer"):
            continue
        integer_ops.append(node)
        for edge in _activation_edges(node, role):
            source, entry = _look_through(edge, policy)
            point = activations.setdefault(source, ActivationPoint(source))
            point.edges.append(entry)
            point.reasons.append(f"input of {ir.op_name(node)} {node.name}")
            point.ops.append(node)
        if role == "weighted":
            _, weight_index, axis = WEIGHTED[ir.op_name(node)]
            weights.append(WeightPoint(node, node.args[weight_index], axis))
        produced = _output_tensor(node, policy)
        if produced is not None and (policy.quantize_model_outputs or produced not in outputs):
            point = activations.setdefault(produced, ActivationPoint(produced))
            point.all_users = True
            point.reasons.append(f"output of {ir.op_name(node)} {node.name}")
            point.ops.append(node)
    ordered = {node: activations[node] for node in gm.graph.nodes if node in activations}
    return QuantPlan(ordered, weights, integer_ops, residual_adds)


def concat_groups(plan: QuantPlan) -> list[list[fx.Node]]:
    """Sets of quantised tensors that must share one range: each integer concat's inputs and output.

    Groups that share a tensor are merged (union-find), so a tensor gets one range whatever the
    number of concats it feeds.
    """
    parent: dict[fx.Node, fx.Node] = {}

    def find(node: fx.Node) -> fx.Node:
        while parent.setdefault(node, node) is not node:
            node = parent[node]
        return node

    for op in plan.integer_ops:
        if op.target is not aten.cat.default:
            continue
        members = [source for source, point in plan.activations.items() if op in point.ops]
        for member in members:
            parent[find(member)] = find(members[0])
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in parent:
        groups.setdefault(find(node), []).append(node)
    return [group for group in groups.values() if len(group) > 1]


def _model_outputs(gm: fx.GraphModule) -> set[fx.Node]:
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    return {value for value in torch.utils._pytree.tree_leaves(output.args) if isinstance(value, fx.Node)}


def _activation_edges(node: fx.Node, role: str) -> list[Edge]:
    """The edges of ``node``'s float activation inputs."""
    name = ir.op_name(node)
    if role == "weighted":
        return [(node, WEIGHTED[name][0], None)]
    if node.target is aten.cat.default:
        return [(node, 0, index) for index in range(len(node.args[0]))]
    return [(node, index, None) for index in INTEGER[name] if index < len(node.args)]


def _argument(edge: Edge) -> fx.Node:
    user, index, position = edge
    value = user.args[index]
    return value[position] if position is not None else value


def _look_through(edge: Edge, policy: QuantPolicy) -> tuple[fx.Node, Edge]:
    """Climb pass-through ops from the edge's input; return the source and the edge to rewire."""
    value = _argument(edge)
    while policy.role(value) == "passthrough" and isinstance(value.args[0], fx.Node):
        edge = (value, 0, None)
        value = value.args[0]
    return value, edge


def _output_tensor(node: fx.Node, policy: QuantPolicy) -> fx.Node | None:
    """The tensor the integer kernel writes: its output, or that of a ReLU/ReLU6 fused after it.

    A linear (or matmul) whose readers are all float ops keeps a float output: the runtime's
    integer GEMM can write float directly (QGemm, MatMulIntegerToFloat), which is more accurate.
    """
    if not policy.quantize_weighted_outputs and policy.role(node) == "weighted":
        return None
    user = ir.single_user(node)
    if user is not None and policy.role(user) == "activation" and _clips_at_zero(user):
        return user
    if ir.op_name(node) in ("aten.linear", "aten.matmul"):
        readers = list(node.users)
        if not readers or not all(_reaches_integer_op(reader, policy) for reader in readers):
            return None
    return node


def _reaches_integer_op(node: fx.Node, policy: QuantPolicy) -> bool:
    while policy.role(node) == "passthrough":
        if len(node.users) != 1:
            return False
        node = next(iter(node.users))
    return policy.role(node) in ("weighted", "integer")


def _clips_at_zero(node: fx.Node) -> bool:
    """ReLU, ReLU6 or a clip whose lower bound is 0: the quantiser's zero point absorbs it."""
    name = ir.op_name(node)
    if name in ("aten.relu", "aten.relu_", "aten.relu6"):
        return True
    low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", node.kwargs.get("min"))
    return low == 0

