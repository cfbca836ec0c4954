"""Shared mechanism of the BatchNorm folding passes.

It matches an inference BatchNorm and folds it into the affine operator (convolution or linear)
that feeds it.

An inference BatchNorm is ``y = (x - mean) * gamma / sqrt(var + eps) + beta``, per channel.
With ``s = gamma / sqrt(var + eps)`` and ``x = W * u + b`` this is ``y = (s * W) * u +
((b - mean) * s + beta)``: scale the weight's output-channel rows by ``s`` and replace the bias.
The arithmetic is done in float64 and cast back to the weight's dtype.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from compiler import ir, meta
from compiler.pass_base import Pass, PassContext, PassResult

aten = torch.ops.aten

_BATCH_NORMS = frozenset({
    aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
})


@dataclass
class BatchNormMatch:
    """An inference BatchNorm: the node producing its output and its constant statistics."""

    nodes: list[fx.Node]  # the batch-norm node, then any getitem(…, 0) that reads its output
    output: fx.Node
    source: fx.Node
    scale: torch.Tensor  # gamma / sqrt(var + eps), float64
    shift: torch.Tensor  # beta - mean * scale, float64
    mean: torch.Tensor
    gamma: torch.Tensor  # BatchNorm's weight (ones where it has none), float64


def match_batch_norm(gm: fx.GraphModule, node: fx.Node) -> tuple[BatchNormMatch | None, str]:
    """Recognise an inference BatchNorm at ``node``; return (match, "") or (None, reason)."""
    if node.target == aten.batch_norm.default:
        source, weight, bias, mean, var, training, _, eps = node.args[:8]
        if training:
            return None, "BatchNorm uses batch statistics (training, or no running stats)"
        output, nodes = node, [node]
    elif node.target == aten._native_batch_norm_legit_no_training.default:
        source, weight, bias, mean, var, _, eps = node.args[:7]
        getters = list(node.users)
        only_output = all(user.target is operator.getitem and user.args[1] == 0 for user in getters)
        if len(getters) != 1 or not only_output:
            return None, "BatchNorm statistics outputs are used"
        output, nodes = getters[0], [node, getters[0]]
    else:
        return None, "not a BatchNorm"
    tensors = [ir.tensor_of(gm, n) if n is not None else None for n in (weight, bias, mean, var)]
    if tensors[2] is None or tensors[3] is None:
        return None, "BatchNorm statistics are not constants"
    # A computed gamma or beta (F.batch_norm(x, m, v, weight=g * 2)) must not be mistaken for an
    # absent one: folding it as gamma = 1 or beta = 0 gives wrong outputs.
    if any(n is not None and t is None for n, t in zip((weight, bias), tensors[:2], strict=True)):
        return None, "BatchNorm weight or bias is not a constant"
    return _statistics(nodes, output, source, tensors, eps), ""


def _statistics(nodes, output, source, tensors, eps) -> BatchNormMatch:
    weight, bias, mean, var = (t.to(torch.float64) if t is not None else None for t in tensors)
    scale = torch.rsqrt(var + eps) * (weight if weight is not None else 1.0)
    shift = (bias if bias is not None else 0.0) - mean * scale
    gamma = weight if weight is not None else torch.ones_like(mean)
    return BatchNormMatch(nodes, output, source, scale, shift, mean, gamma)


class FoldBatchNormPass(Pass):
    """Fold every inference BatchNorm whose input comes from one of ``anchor_targets``."""

    anchor_targets: ClassVar[frozenset] = frozenset()

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Find BatchNorm nodes fed by an anchor and fold those that pass ``check``."""
        refused: Counter = Counter()
        folded, dead = 0, []
        for node in list(gm.graph.nodes):
            if not self._is_candidate(node):
                continue
            match, reason = match_batch_norm(gm, node)
            if match is not None:
                reason = self.check(gm, match.source, match) or ""
            if reason:
                refused[reason] += 1
                ctx.fallbacks.append(f"{self.name}: BatchNorm {ir.describe(node)} left unfolded: {reason}")
                continue
            dead += self._fold(gm, match)
            folded += 1
        # Only a pass that folded may tidy the module: modified=False must leave it untouched.
        erased = ir.erase_unused(gm, dead) if folded else 0
        gm.recompile()
        stats = {"folded": folded, "nodes_erased": erased, "refused": dict(refused)}
        return PassResult(gm, folded > 0, stats)

    def _is_candidate(self, node: fx.Node) -> bool:
        """True for a BatchNorm fed directly by one of this pass's anchors.

        Other BatchNorms are not this pass's pattern, so their refusals do not belong in its stats.
        """
        if node.op != "call_function" or node.target not in _BATCH_NORMS or node._erased:
            return False
        source = node.args[0]
        return isinstance(source, fx.Node) and source.target in self.anchor_targets

    def check(self, gm: fx.GraphModule, anchor: fx.Node, match: BatchNormMatch) -> str | None:
        """Why this BatchNorm cannot be folded into ``anchor``, or None."""
        # Anchor-specific refusals first: they say why more precisely (a transposed conv's
        # weight keeps its input channels on axis 0, so the channel check below would mislead).
        anchor_reason = self.check_anchor(gm, anchor, match)
        if anchor_reason:
            return anchor_reason
        if len(anchor.users) != 1:
            return "anchor output has other users"
        weight = anchor.args[1]
        if ir.tensor_of(gm, weight) is None:
            return "anchor weight is not a constant"
        if ir.is_shared(weight):
            return "anchor weight is shared with other nodes"
        bias = _bias_node(anchor)
        if bias is not None and (ir.tensor_of(gm, bias) is None or ir.is_shared(bias)):
            return "anchor bias is not a constant of its own"
        if ir.tensor_of(gm, weight).shape[0] != match.scale.numel():
            return "BatchNorm channels do not match the anchor's outputs"
        return None

    def check_anchor(
        self, gm: fx.GraphModule, anchor: fx.Node, match: BatchNormMatch
    ) -> str | None:
        """Anchor-specific refusals; None accepts."""
        return None

    def _fold(self, gm: fx.GraphModule, match: BatchNormMatch) -> list[fx.Node]:
        anchor = match.source
        weight_node, bias_node = anchor.args[1], _bias_node(anchor)
        weight = ir.tensor_of(gm, weight_node)
        shape = (-1,) + (1,) * (weight.dim() - 1)
        new_weight = (weight.to(torch.float64) * match.scale.reshape(shape)).to(weight.dtype)
        old_bias = (
            ir.tensor_of(gm, bias_node) if bias_node is not None else torch.zeros_like(match.mean)
        )
        new_bias = (old_bias.to(torch.float64) * match.scale + match.shift).to(weight.dtype)
        ir.set_attribute(gm, weight_node.target, new_weight)
        if bias_node is not None:
            ir.set_attribute(gm, bias_node.target, new_bias)
        else:
            _attach_bias(gm, anchor, weight_node, new_bias)
        anchor.meta[meta.BN_GAMMA] = match.gamma.float()  # what BatchNorm-scale pruning ranks channels by
        match.output.replace_all_uses_with(anchor)
        dead = [n for n in match.nodes[0].all_input_nodes if n is not anchor]
        for node in reversed(match.nodes):
            gm.graph.erase_node(node)
        return dead


def _bias_node(anchor: fx.Node) -> fx.Node | None:
    bias = anchor.args[2] if len(anchor.args) > 2 else anchor.kwargs.get("bias")
    return bias if isinstance(bias, fx.Node) else None


def _attach_bias(
    gm: fx.GraphModule, anchor: fx.Node, weight_node: fx.Node, bias: torch.Tensor
) -> None:
    prefix = weight_node.target.rpartition(".")[0]
    bias_node = ir.add_get_attr(gm, f"{prefix}.bias" if prefix else "bias", bias, before=anchor)
    bias_node.meta[meta.MODULE_PATH] = weight_node.meta.get(meta.MODULE_PATH, "")
    args = list(anchor.args) + [None] * max(0, 3 - len(anchor.args))
    args[2] = bias_node
    anchor.args = tuple(args)
    anchor.kwargs = {k: v for k, v in anchor.kwargs.items() if k != "bias"}
