"""Attention heads as channel groups: Q, K, V and the output projection lose whole heads together.

Cutting heads must compute what the unpruned model computes with those heads silenced (their V rows
and bias and their output-projection columns zeroed: zeroing Q and K alone would leave the head
averaging its values); a pattern that is not understood is refused with the op that broke it.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from compiler import TARGETS, PassSpec, compile, probe
from compiler.capture import capture
from compiler.pipeline import run_pipeline
from passes.prune import importance
from passes.prune.groups import channel_groups
from passes.prune.slicing import keep_channels

EMBED, HEADS, HEAD_DIM, LENGTH = 16, 4, 4, 8


class SelfAttention(nn.Module):
    """Q, K, V and output projections around ``scaled_dot_product_attention`` or matmul-softmax-matmul."""

    def __init__(self, sdpa: bool = True, literal: bool = True):
        super().__init__()
        self.sdpa, self.literal = sdpa, literal
        self.query, self.key, self.value, self.out = (nn.Linear(EMBED, EMBED) for _ in range(4))

    def split(self, x):
        return x.view(x.shape[0], x.shape[1], HEADS if self.literal else -1, HEAD_DIM).transpose(1, 2)

    def scores(self, q, k):
        return q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5

    def attend(self, q, k, v):
        if self.sdpa:
            return F.scaled_dot_product_attention(q, k, v)
        return torch.softmax(self.scores(q, k), dim=-1) @ v

    def forward(self, x):
        heads = self.attend(self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x)))
        merged = heads.transpose(1, 2).reshape(x.shape[0], x.shape[1], EMBED if self.literal else -1)
        return self.out(merged)


class Encoder(nn.Module):
    def __init__(self, attention: nn.Module):
        super().__init__()
        self.attention = attention

    def forward(self, x):
        return self.attention(x)


class PerHeadBias(SelfAttention):
    """A learned bias per head on the scores (relative position bias): heads cannot be cut without it."""

    def __init__(self):
        super().__init__(sdpa=False)
        self.position_bias = nn.Parameter(torch.randn(1, HEADS, LENGTH, LENGTH))

    def scores(self, q, k):
        return super().scores(q, k) + self.position_bias


class ExposedProbabilities(SelfAttention):
    """Returns the attention probabilities too, whose head count is the model's interface."""

    def __init__(self):
        super().__init__(sdpa=False)

    def forward(self, x):
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        probabilities = torch.softmax(self.scores(q, k), dim=-1)
        merged = (probabilities @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], EMBED)
        return self.out(merged), probabilities


class PackedProjection(SelfAttention):
    """One Linear writes Q, K and V side by side, then a chunk splits them."""

    def __init__(self):
        super().__init__()
        self.query = nn.Linear(EMBED, 3 * EMBED)

    def forward(self, x):
        q, k, v = (self.split(part) for part in self.query(x).chunk(3, dim=-1))
        return self.out(self.attend(q, k, v).transpose(1, 2).reshape(x.shape[0], x.shape[1], EMBED))


def inputs(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, LENGTH, EMBED, generator=torch.Generator().manual_seed(seed))


def captured(model: nn.Module, **options):
    x = (inputs(),)
    gm = capture(model.eval(), x, **options).graph_module
    probe.run_annotated(gm, x)
    return gm


def members(group) -> set[tuple[str, str]]:
    return {(member.module_path, member.role) for member in group.members}


def group_with(groups, module_path: str, role: str = "out"):
    (found,) = [group for group in groups if (module_path, role) in members(group)]
    return found


def silenced(model: nn.Module, drop: list[int]) -> nn.Module:
    """``model`` with heads ``drop`` contributing nothing: their V rows, V bias and output columns zeroed."""
    silent = copy.deepcopy(model)
    attention = silent.attention
    with torch.no_grad():
        for head in drop:
            block = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
            attention.value.weight[block] = 0
            attention.value.bias[block] = 0
            attention.out.weight[:, block] = 0
    return silent


VARIANTS = {
    "sdpa, literal head count": ({"sdpa": True, "literal": True}, {}),
    "matmul, -1 head count": ({"sdpa": False, "literal": False}, {}),
    "matmul, static shapes": ({"sdpa": False, "literal": True}, {"dynamic_dims": {}}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_hand_built_attention_is_one_group_of_heads(variant):
    attention, options = VARIANTS[variant]
    torch.manual_seed(0)
    group = group_with(channel_groups(captured(Encoder(SelfAttention(**attention)), **options)), "attention.query")
    assert group.prunable and (group.channels, group.unit) == (HEADS, HEAD_DIM)
    writers = {(m.module_path, m.role, m.per_channel) for m in group.members if m.role in ("out", "in")}
    assert writers == {("attention.query", "out", HEAD_DIM), ("attention.key", "out", HEAD_DIM),
                       ("attention.value", "out", HEAD_DIM), ("attention.out", "in", HEAD_DIM)}
    cores = [m.module_path for m in group.members if m.role == "attention"]
    assert cores == ["attention"] * (1 if attention["sdpa"] else 2)  # sdpa, or the scores and values matmuls
    literals = sorted(m.role for m in group.members if m.role in ("split", "merge"))
    assert literals == (["merge", "split", "split", "split"] if attention["literal"] else [])


@pytest.mark.parametrize("variant", VARIANTS)
def test_cutting_heads_equals_silencing_them(variant):
    attention, options = VARIANTS[variant]
    torch.manual_seed(0)
    model = Encoder(SelfAttention(**attention)).eval()
    gm = captured(model, **options)
    pruned = copy.deepcopy(gm)
    keep_channels(pruned, group_with(channel_groups(gm), "attention.query"), torch.tensor([0, 2]))
    pruned.recompile()
    assert pruned.get_parameter("attention.query.weight").shape == (2 * HEAD_DIM, EMBED)
    assert pruned.get_parameter("attention.out.weight").shape == (EMBED, 2 * HEAD_DIM)
    expected = silenced(model, drop=[1, 3])
    for batch in (2,) if options else (2, 5):  # static shapes run at the captured batch only
        x = inputs(batch, seed=batch)
        with torch.no_grad():
            torch.testing.assert_close(pruned(x)[0], expected(x), rtol=1e-5, atol=1e-6)
            assert not torch.allclose(gm(x)[0], expected(x), atol=1e-3)  # the cut heads did contribute


@pytest.mark.parametrize(("model", "reason"), [
    (PerHeadBias, "attention heads: aten.add in module 'attention' combines the scores with a tensor of shape "
                  "(1, 4, 8, 8), one per head"),
    (ExposedProbabilities, "attention heads: aten.softmax in module 'attention' carries heads to aten.matmul in "
                           "module 'attention', output in module '<root>'"),
    (PackedProjection, "attention heads: aten.view in module 'attention' splits getitem in module 'attention' "
                       "into heads, not a Linear"),
])
def test_an_attention_not_understood_is_refused_naming_the_op(model, reason):
    torch.manual_seed(0)
    groups = channel_groups(captured(Encoder(model())))
    query = group_with(groups, "attention.query")
    assert not query.prunable and any(refusal.startswith(reason) for refusal in query.refusals), query.refusals
    assert all(group.unit == 1 for group in groups)


def with_dead_head(head: int) -> nn.Module:
    """An attention whose head ``head`` has all-zero Q, K and V rows and biases: it contributes exactly 0."""
    torch.manual_seed(0)
    model = Encoder(SelfAttention(sdpa=False)).eval()
    with torch.no_grad():
        for projection in (model.attention.query, model.attention.key, model.attention.value):
            projection.weight[head * HEAD_DIM:(head + 1) * HEAD_DIM] = 0
            projection.bias[head * HEAD_DIM:(head + 1) * HEAD_DIM] = 0
    return model


def heads_target(**options):
    return dataclasses.replace(TARGETS["cpu-fp32"], name="heads", pipeline=(PassSpec("prune_channels", options),))


@pytest.mark.parametrize("kind", importance.KINDS)
def test_every_importance_scores_heads_and_finds_the_dead_one(kind):
    model = with_dead_head(2)
    gm = captured(model)
    group = group_with(channel_groups(gm), "attention.query")
    samples = (inputs(64, seed=1),)
    (scores,) = importance.scores(gm, [group], kind, samples)
    assert scores.shape == (HEADS,) and int(scores.argmin()) == 2, scores
    target = heads_target(macs=0.2, importance=kind, round_to=HEAD_DIM, reconstruct=False)
    result = run_pipeline(model, target, (inputs(),), calibration_data=[samples])
    assert result.ledger.entry("prune_channels").stats["widths"] == {"attention.query": [HEADS, HEADS - 1]}
    x = inputs(5, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(x)[0], model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reconstruct", ["readers", "all"])
def test_the_output_projection_is_refitted_on_the_merged_heads(reconstruct):
    torch.manual_seed(0)
    model = Encoder(SelfAttention(sdpa=False)).eval()
    calibration, x = [(inputs(64, seed=1),)], inputs(64, seed=2)
    errors, stats = {}, {}
    for option in (False, reconstruct):
        target = heads_target(macs=0.4, importance="l1", round_to=1, reconstruct=option)
        result = run_pipeline(model, target, (inputs(),), calibration_data=calibration)
        stats[option] = result.ledger.entry("prune_channels").stats
        with torch.no_grad():
            errors[option] = float((result.graph_module(x)[0] - model(x)).pow(2).mean())
    assert stats[reconstruct]["widths"] == {"attention.query": [HEADS, 2]}
    assert stats[reconstruct]["reconstruction"]["layers_fitted"] >= 1  # the output projection, reading 2 heads
    assert errors[reconstruct] < 0.8 * errors[False], errors


@pytest.fixture(scope="module")
def minilm():
    return models.load("minilm-l6")


def test_minilm_compiles_with_heads_cut_and_the_runtime_agrees(minilm):
    # about 2600 real tokens: enough rows to re-fit an output projection (padded positions are not read)
    calibration = minilm.calibration_data(160, seq_len=48)
    compiled = compile(minilm.model, "cpu-fp32", minilm.example_inputs, calibration_data=[calibration],
                       prune={"macs": 0.3}, recover_seconds=0)
    entry = compiled.report.entry("prune_channels")
    assert entry.macs_after <= 0.7 * entry.macs_before
    heads = {path: widths for path, widths in entry.stats["widths"].items() if path.endswith("attention.self.query")}
    assert len(heads) == 6 and all(kept < before == 12 for before, kept in heads.values())
    assert entry.stats["reconstruction"]["layers_fitted"] >= 6  # at least every output projection
    assert entry.stats["padding"]["mask_input"] == 1
    shapes = {init.name: tuple(init.dims) for init in compiled.onnx.graph.initializer}
    kept = heads["bert.encoder.layer.0.attention.self.query"][1] * 32
    assert (kept, 384) in shapes.values() and (384, kept) in shapes.values()
    # the runtime computes what the pruned IR computes, at another batch size and sequence length
    sentences = minilm.eval_data(3, seq_len=24)
    with torch.no_grad():
        expected = compiled.graph_module(*sentences)[0]
    torch.testing.assert_close(compiled(*sentences), expected, rtol=1e-3, atol=1e-5)
