"""How much each channel of a group matters: weight norms, or its measured cost to the next layers.

* ``l1`` / ``l2``: the norm of the weight rows that write each channel (convs, linears, depthwise
  filters), each member's norms divided by their mean so that no layer dominates by scale. Cheap,
  data-free, and blind to what the channel carries: a channel with small weights and a large
  bias writes a large constant, and cutting it shifts every layer that reads it.
* ``bn_scale``: the magnitude of the BatchNorm weight (gamma) that scaled each channel, as network
  slimming ranks channels; the folding passes record it on the conv or linear that absorbed the
  BatchNorm. Data-free; a group with no folded BatchNorm is scored by ``l2`` instead (the pass's
  ledger lists those groups).
* ``taylor``: first-order Taylor on calibration data, ``|sum(w * dL/dw)|`` over each channel's
  rows, with the model's own loss (cross-entropy to its top class; no labels needed).
* ``reconstruction`` (data-aware): the error each reader's output gains when the channel is removed
  and the reader's remaining weights and bias are re-fitted by least squares on calibration
  activations, the optimal-brain-surgeon quantity ``w_c^T [(G^-1)_cc]^-1 w_c`` with ``G`` the
  second-moment matrix of the reader's input (with a constant column, so a channel's mean is
  absorbed by the bias) and ``w_c`` the reader's weights on that channel (a block of columns for a
  kxk conv or behind a flatten). Each reader's error is divided by its output energy, so scores
  are relative errors, comparable across layers: the ``global`` allocation ranks channels of all
  groups on one scale. This is what :mod:`passes.prune.reconstruct` then achieves. Where the
  calibration data gives too few rows to re-fit a reader (fewer than ``ROWS_PER_WEIGHT`` per
  column, as for a classifier behind a flatten), its cost is the channel's contribution to the
  reader's output, ``E[(w_c . x_c)^2]``, without a re-fit.

For a group of attention heads every kind gives one score per head. ``l1``/``l2`` take the norm of
each head's block of ``head_dim`` rows in the Q, K and V Linears; ``taylor`` sums ``w * dL/dw`` over
the block (the first-order change of the loss when the whole head goes); ``reconstruction`` reads
the output projection, whose input columns come in blocks of ``head_dim`` per head, as for a
flatten: removing a head zeroes its block of the merged tensor, whatever its Q and K rows were.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from compiler import ir, meta
from compiler.errors import PassError
from passes.prune.groups import ChannelGroup

WEIGHT_NORMS = {
    "l1": lambda rows: rows.abs().sum(dim=1),
    "l2": lambda rows: rows.pow(2).sum(dim=1).sqrt(),
}
KINDS = (*WEIGHT_NORMS, "bn_scale", "taylor", "reconstruction")
_RIDGE = 1e-3
#: The fewest rows (samples x positions) per input column for a least-squares re-fit that generalises.
ROWS_PER_WEIGHT = 4
_WRITERS = ("out", "depthwise")
_TAYLOR_CHUNK = 16


def scores(gm: fx.GraphModule, groups: list[ChannelGroup], kind: str, samples: tuple[torch.Tensor, ...] | None,
           max_rows: int = 65536, valid: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One score per channel of every group, in group order (higher: keep).

    ``valid`` (a bool ``(batch, length)`` mask of real tokens, :mod:`compiler.sequences`) keeps a
    linear's padded positions out of its Gram matrix.
    """
    if kind in WEIGHT_NORMS:
        return [_norm_score(gm, group, kind) for group in groups]
    if kind == "bn_scale":
        return [_bn_scale_score(group, gammas) if (gammas := _gammas(gm, group)) else _norm_score(gm, group, "l2")
                for group in groups]
    if samples is None:
        raise PassError(f"importance {kind!r} measures channels on calibration data: pass "
                        "calibration_data, or choose importance 'l1' or 'l2'")
    if kind == "taylor":
        return _taylor_scores(gm, groups, samples)
    readers = {member.node: member for group in groups for member in group.members if member.role == "in"}
    grams = _input_grams(gm, samples, set(readers), max_rows, valid)
    nodes = {node.name: node for node in gm.graph.nodes}
    result = []
    for group in groups:
        total = torch.zeros(group.channels, dtype=torch.float64)
        for member in group.members:
            if member.role == "in":
                total += _removal_cost(gm, nodes[member.node], grams[member.node], group.channels)
        result.append(total)
    return result


def _taylor_scores(gm: fx.GraphModule, groups: list[ChannelGroup], samples) -> list[torch.Tensor]:
    """First-order Taylor: per channel, |sum of weight x gradient| over the rows that write it.

    The loss is the model's own: cross-entropy against its top class for a classifier (no labels
    needed), half the squared output otherwise; summed over the calibration samples.
    """
    nodes = {node.name: node for node in gm.graph.nodes}
    writers = {member.node for group in groups for member in group.members if member.role in _WRITERS}
    names = sorted({nodes[name].args[1].target for name in writers})
    originals = {name: ir.get_attribute(gm, name) for name in names}
    try:
        for name, tensor in originals.items():
            owner_path, _, attribute = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            owner._buffers.pop(attribute, None)
            owner._parameters[attribute] = torch.nn.Parameter(tensor.detach().clone(), requires_grad=True)
        for start in range(0, samples[0].shape[0], _TAYLOR_CHUNK):  # gradients add up over the chunks
            output = gm(*(tensor[start:start + _TAYLOR_CHUNK] for tensor in samples))
            output = output[0] if isinstance(output, (tuple, list)) else output
            if output.dim() == 2 and output.shape[1] > 1:
                loss = F.cross_entropy(output, output.argmax(1).detach(), reduction="sum")
            else:
                loss = 0.5 * output.pow(2).sum()
            loss.backward()
        products = {name: (ir.get_attribute(gm, name) * ir.get_attribute(gm, name).grad).detach()
                    for name in names}
    finally:
        for name, tensor in originals.items():
            ir.set_attribute(gm, name, tensor)
    result = []
    for group in groups:
        total = torch.zeros(group.channels, dtype=torch.float64)
        for member in group.members:
            if member.role in _WRITERS:
                product = products[nodes[member.node].args[1].target].double()
                rows = _row_blocks(product, member.per_channel).sum(dim=1).abs()
                total += rows / rows.mean().clamp(min=1e-30)
        result.append(total)
    return result


def _norm_score(gm: fx.GraphModule, group: ChannelGroup, kind: str) -> torch.Tensor:
    nodes = {node.name: node for node in gm.graph.nodes}
    total = torch.zeros(group.channels, dtype=torch.float64)
    for member in group.members:
        if member.role not in ("out", "depthwise"):
            continue
        weight = ir.get_attribute(gm, nodes[member.node].args[1].target).detach().double()
        norms = WEIGHT_NORMS[kind](_row_blocks(weight, member.per_channel))
        total += norms / norms.mean().clamp(min=1e-12)
    return total


def _bn_scale_score(group: ChannelGroup, gammas: list[torch.Tensor]) -> torch.Tensor:
    """Per channel, |gamma| of each folded BatchNorm that scaled it, each member's divided by its mean."""
    total = torch.zeros(group.channels, dtype=torch.float64)
    for gamma in gammas:
        magnitude = gamma.double().abs()
        total += magnitude / magnitude.mean().clamp(min=1e-12)
    return total


def _gammas(gm: fx.GraphModule, group: ChannelGroup) -> list[torch.Tensor]:
    """The recorded BatchNorm gammas of the group's writers (one value per channel each)."""
    writers = {member.node for member in group.members if member.role in _WRITERS}
    found = (node.meta.get(meta.BN_GAMMA) for node in gm.graph.nodes if node.name in writers)
    return [gamma for gamma in found if gamma is not None and gamma.numel() == group.channels]


def without_batch_norm(gm: fx.GraphModule, groups: list[ChannelGroup]) -> list[str]:
    """Module paths of the groups ``bn_scale`` cannot score by a BatchNorm (they fall back to ``l2``)."""
    return [group.members[0].module_path or "<root>" for group in groups if not _gammas(gm, group)]


def _row_blocks(weight: torch.Tensor, per_channel: int) -> torch.Tensor:
    """A writer's weight as one row per channel: ``per_channel`` rows each (a head's block of Q, K or V)."""
    return weight.reshape(weight.shape[0] // per_channel, -1)


class _GramRecorder(fx.Interpreter):
    """Runs the graph, adding each chosen node's input rows (patches for convs) to its Gram matrix."""

    def __init__(self, gm: fx.GraphModule, nodes: set[str], max_rows: int, valid: torch.Tensor | None):
        super().__init__(gm)
        self.nodes, self.max_rows, self.valid = nodes, max_rows, valid
        self.grams: dict[str, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(0)

    def run_node(self, node: fx.Node) -> object:
        if node.name in self.nodes:
            rows = input_rows(node, self.env[node.args[0]], ir.tensor_of(self.module, node.args[1]), self.max_rows,
                              self.valid)
            if rows.shape[0] > self.max_rows:
                rows = rows[torch.randperm(rows.shape[0], generator=self.generator)[: self.max_rows]]
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1).double()
            self.grams[node.name] = rows.T @ rows
        return super().run_node(node)


def _input_grams(gm, samples, nodes: set[str], max_rows: int, valid: torch.Tensor | None) -> dict[str, torch.Tensor]:
    recorder = _GramRecorder(gm, nodes, max_rows, valid)
    with torch.no_grad():
        recorder.run(*samples)
    return recorder.grams


def input_rows(node: fx.Node, source: torch.Tensor, weight: torch.Tensor, max_rows: int | None = None,
               valid: torch.Tensor | None = None) -> torch.Tensor:
    """The rows a conv (unfolded patches, as its stride, padding and dilation take them) or a linear reads.

    With ``max_rows``, a conv unfolds only as many images as give about twice that many rows (memory).
    With ``valid``, a linear reading token positions (its input's leading dimensions are the mask's)
    gives only the real tokens' rows.
    """
    if ir.op_name(node) == "aten.linear":
        return real_tokens(source, valid).reshape(-1, source.shape[-1])
    if max_rows is not None:
        source = source[: max(1, -(-2 * max_rows // math.prod(source.shape[2:])))]
    stride, padding, dilation = (conv_pair(node, i, default) for i, default in ((3, 1), (4, 0), (5, 1)))
    patches = F.unfold(source, weight.shape[2:], dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def real_tokens(tensor: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``tensor``'s real token positions, flattened into rows, where its leading dimensions are ``valid``'s."""
    if valid is not None and tensor.dim() > 2 and tensor.shape[:2] == valid.shape:
        return tensor[valid]
    return tensor


def conv_pair(node: fx.Node, index: int, default: int) -> tuple[int, int]:
    """Stride, padding or dilation argument ``index`` of an aten conv2d as a pair of ints."""
    value = node.args[index] if len(node.args) > index else default
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
        return (value[0], value[-1])
    raise PassError(f"conv {node.name!r} in module {ir.module_path(node) or '<root>'!r}: "
                    f"argument {index} is {value!r}, not numeric")


def _removal_cost(gm: fx.GraphModule, node: fx.Node, gram: torch.Tensor, channels: int) -> torch.Tensor:
    """Per channel: the reader's relative output error after removing it and re-fitting the rest."""
    weight = ir.get_attribute(gm, node.args[1].target).detach().double()
    bias_node = node.args[2] if len(node.args) > 2 else None
    bias = ir.get_attribute(gm, bias_node.target).detach().double() if isinstance(bias_node, fx.Node) else None
    matrix = weight.reshape(weight.shape[0], -1)  # (out, columns), columns channel-major
    per = matrix.shape[1] // channels
    augmented = torch.cat([matrix, (bias if bias is not None else torch.zeros(matrix.shape[0],
                                                                              dtype=matrix.dtype))[:, None]], 1)
    energy = torch.einsum("oi,ij,oj->", augmented, gram, augmented).clamp(min=1e-12)
    index = torch.arange(channels)[:, None] * per + torch.arange(per)[None, :]  # (channels, per) columns
    w = matrix[:, index]  # (out, channels, per)
    if gram[-1, -1] < ROWS_PER_WEIGHT * gram.shape[0]:  # too few rows to re-fit: the contribution itself
        blocks = gram[index[:, :, None], index[:, None, :]]
        return torch.einsum("ocp,cpq,ocq->c", w, blocks, w) / energy
    damped = gram + _RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    inverse = torch.linalg.inv(damped)
    blocks = inverse[index[:, :, None], index[:, None, :]]  # (channels, per, per)
    costs = torch.einsum("ocp,cpq,ocq->c", w, torch.linalg.inv(blocks), w)
    return costs / energy
