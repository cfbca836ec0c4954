"""fold_conv_bn: an inference BatchNorm after a convolution disappears into the conv's weight and
bias; every pattern it cannot fold exactly is refused with its reason, never folded wrongly.

BatchNorm statistics and affine parameters are randomised: with the defaults the fold is close
to the identity and a wrong formula would pass.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compiler import ir
from compiler.errors import PassError, TargetError
from compiler.pass_base import PassContext
from passes import REGISTRY
from passes.fusion.fold_conv_bn import FoldConvBatchNorm

aten = torch.ops.aten
CONVS = {"aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution"}


def _conv_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    return nn.Sequential(conv, bn)


FOLDABLE = {
    "conv1d": (lambda: _conv_bn(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5)), (2, 3, 10)),
    "conv2d": (lambda: _conv_bn(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)), (2, 3, 8, 8)),
    "conv3d": (lambda: _conv_bn(nn.Conv3d(2, 3, 3), nn.BatchNorm3d(3)), (2, 2, 5, 5, 5)),
    "conv1d without bias": (
        lambda: _conv_bn(nn.Conv1d(3, 5, 3, bias=False), nn.BatchNorm1d(5)), (2, 3, 10)),
    "conv2d without bias": (
        lambda: _conv_bn(nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5)), (2, 3, 8, 8)),
    "depthwise": (
        lambda: _conv_bn(nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4)), (2, 4, 8, 8)),
    "depthwise without bias, multiplier 2": (
        lambda: _conv_bn(nn.Conv2d(4, 8, 3, groups=4, bias=False), nn.BatchNorm2d(8)),
        (2, 4, 8, 8)),
    "groups=2, neither 1 nor depthwise": (
        lambda: _conv_bn(nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)), (2, 4, 8, 8)),
    "out_channels=1": (lambda: _conv_bn(nn.Conv2d(3, 1, 3), nn.BatchNorm2d(1)), (2, 3, 8, 8)),
    "BatchNorm affine=False": (
        lambda: _conv_bn(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, affine=False)), (2, 3, 8, 8)),
    "BatchNorm eps=0.1": (
        lambda: _conv_bn(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, eps=0.1)), (2, 3, 8, 8)),
    "padding='same', stride 1, dilation 2": (
        lambda: _conv_bn(nn.Conv2d(3, 5, 3, padding="same", dilation=2), nn.BatchNorm2d(5)),
        (2, 3, 8, 8)),
    "stride 2": (lambda: _conv_bn(nn.Conv2d(3, 5, 3, stride=2), nn.BatchNorm2d(5)), (2, 3, 9, 9)),
}


class SeveralConsumers(nn.Module):
    """The conv output feeds the BatchNorm and a residual add: folding would change the add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class TiedWeights(nn.Module):
    """Two convs share one weight, each with its own BatchNorm: folding one would break the other."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3)
        self.second = nn.Conv2d(3, 4, 3)
        self.second.weight = self.first.weight
        self.first_bn = nn.BatchNorm2d(4)
        self.second_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.first_bn(self.first(x)) - self.second_bn(self.second(x))


class TiedBiases(TiedWeights):
    """Two convs with their own weights but one shared bias: the folded biases would differ."""

    def __init__(self):
        super().__init__()
        self.second.weight = nn.Parameter(torch.randn_like(self.first.weight))
        self.second.bias = self.first.bias


class ComputedGamma(nn.Module):
    """``F.batch_norm`` whose weight and bias are computed in forward, not stored."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)
        self.beta = nn.Parameter(torch.randn(4))
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x):
        return F.batch_norm(
            self.conv(x), self.mean, self.var, self.gamma * 2, self.beta + 1, training=False
        )


class TwoBatchNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.bn1(self.conv(x)))


REFUSED = {
    "conv output with several consumers": (
        SeveralConsumers, (2, 3, 6, 6), {"anchor output has other users": 1}),
    "tied conv weights": (
        TiedWeights, (2, 3, 6, 6), {"anchor weight is shared with other nodes": 2}),
    "tied conv biases": (
        TiedBiases, (2, 3, 6, 6), {"anchor bias is not a constant of its own": 2}),
    "BatchNorm without running stats": (
        lambda: _conv_bn(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),
        (2, 3, 6, 6), {"BatchNorm uses batch statistics (training, or no running stats)": 1}),
    # in_channels == out_channels: a fold along the wrong axis would pass the channel check
    "transposed conv2d": (
        lambda: _conv_bn(nn.ConvTranspose2d(3, 3, 3), nn.BatchNorm2d(3)), (2, 3, 5, 5),
        {"transposed convolution": 1}),
    "transposed conv1d": (
        lambda: _conv_bn(nn.ConvTranspose1d(4, 4, 3), nn.BatchNorm1d(4)), (2, 4, 7),
        {"transposed convolution": 1}),
    "BatchNorm weight computed in forward": (
        ComputedGamma, (2, 3, 6, 6), {"BatchNorm weight or bias is not a constant": 1}),
}


def _batch_norm_count(gm) -> int:
    return ir.op_histogram(gm)["aten.batch_norm"]


def _conv_nodes(gm):
    return [node for node in ir.call_nodes(gm) if ir.op_name(node) in CONVS]


def test_registered_under_its_file_name():
    assert REGISTRY["fold_conv_bn"] is FoldConvBatchNorm


@pytest.mark.parametrize(("build", "shape"), FOLDABLE.values(), ids=FOLDABLE.keys())
def test_folds_and_outputs_match(
    capture_gm, run_pass, randomize_batch_norm, assert_matches_model, build, shape
):
    model = randomize_batch_norm(build(), seed=len(shape)).eval()
    inputs = (torch.randn(shape),)
    gm = capture_gm(model, inputs)
    convs_before = sum(ir.op_histogram(gm)[op] for op in CONVS)

    result = run_pass(FoldConvBatchNorm, gm, inputs)

    assert result.modified
    assert result.stats["folded"] == 1
    assert result.stats["refused"] == {}
    histogram = ir.op_histogram(result.graph_module)
    assert "aten.batch_norm" not in histogram
    assert sum(histogram[op] for op in CONVS) == convs_before
    assert_matches_model(model, result.graph_module, inputs)


def test_folded_weight_and_bias_follow_the_formula(capture_gm, run_pass, randomize_batch_norm):
    model = randomize_batch_norm(_conv_bn(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)), seed=3).eval()
    inputs = (torch.randn(2, 3, 8, 8),)
    result = run_pass(FoldConvBatchNorm, capture_gm(model, inputs), inputs)
    conv, bn = model[0], model[1]
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    expected_weight = conv.weight.detach().double() * scale.reshape(-1, 1, 1, 1)
    expected_bias = (conv.bias.detach().double() - bn.running_mean.double()) * scale
    expected_bias += bn.bias.detach().double()

    (node,) = _conv_nodes(result.graph_module)
    weight = ir.get_attribute(result.graph_module, node.args[1].target)
    bias = ir.get_attribute(result.graph_module, node.args[2].target)
    assert weight.dtype == bias.dtype == torch.float32
    torch.testing.assert_close(weight.double(), expected_weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bias.double(), expected_bias, rtol=1e-6, atol=1e-6)
    # BatchNorm's four tensors are gone from the module (num_batches_tracked is left to DCE)
    names = {name for name, _ in result.graph_module.named_buffers()}
    names |= {name for name, _ in result.graph_module.named_parameters()}
    assert not names & {"1.weight", "1.bias", "1.running_mean", "1.running_var"}


def test_attaches_a_bias_to_a_conv_without_one(capture_gm, run_pass, randomize_batch_norm):
    model = randomize_batch_norm(
        _conv_bn(nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5)), seed=4).eval()
    inputs = (torch.randn(2, 3, 8, 8),)
    gm = capture_gm(model, inputs)
    (node,) = _conv_nodes(gm)
    assert len(node.args) < 3 or node.args[2] is None

    result = run_pass(FoldConvBatchNorm, gm, inputs)

    (node,) = _conv_nodes(result.graph_module)
    bias = ir.get_attribute(result.graph_module, node.args[2].target)
    bn = model[1]
    expected = bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(
        bn.running_var + bn.eps)
    torch.testing.assert_close(bias, expected, rtol=1e-5, atol=1e-6)


def test_folds_two_batch_norms_in_a_row(
    capture_gm, run_pass, randomize_batch_norm, assert_matches_model
):
    model = randomize_batch_norm(TwoBatchNorms(), seed=5).eval()
    inputs = (torch.randn(2, 3, 6, 6),)
    result = run_pass(FoldConvBatchNorm, capture_gm(model, inputs), inputs)
    assert result.stats["folded"] == 2
    assert _batch_norm_count(result.graph_module) == 0
    assert_matches_model(model, result.graph_module, inputs)


def test_folds_the_decomposed_dialect(run_pass, randomize_batch_norm):
    """``aten.convolution`` + ``_native_batch_norm_legit_no_training`` + getitem, as
    ``run_decompositions`` writes them, fold too."""
    model = randomize_batch_norm(_conv_bn(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), seed=6).eval()
    inputs = (torch.randn(2, 3, 6, 6),)
    gm = torch.export.export(model, inputs, strict=False).run_decompositions().module()
    for node in [n for n in gm.graph.nodes if n.op == "call_module"]:  # export's shape guard
        gm.graph.erase_node(node)
    gm.recompile()
    histogram = ir.op_histogram(gm)
    assert histogram["aten.convolution"] == histogram["aten._native_batch_norm_legit_no_training"]

    result = run_pass(FoldConvBatchNorm, gm, inputs)

    assert result.stats["folded"] == 1
    assert ir.op_histogram(result.graph_module) == {"aten.convolution": 1}
    with torch.no_grad():
        torch.testing.assert_close(
            result.graph_module(*inputs).double(), model(*inputs).double(),
            rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("build", "shape", "refused"), REFUSED.values(), ids=REFUSED.keys())
def test_refuses_with_a_reason_and_outputs_stay_exact(
    capture_gm, run_pass, randomize_batch_norm, assert_matches_model, assert_untouched,
    build, shape, refused,
):
    model = randomize_batch_norm(build(), seed=7).eval()
    inputs = (torch.randn(shape),)
    gm = capture_gm(model, inputs)
    batch_norms = _batch_norm_count(gm)
    before = ir.fingerprint(gm)

    result = run_pass(FoldConvBatchNorm, gm, inputs)

    assert_untouched(result, before)
    assert result.stats == {"folded": 0, "nodes_erased": 0, "refused": refused}
    assert _batch_norm_count(result.graph_module) == batch_norms
    assert_matches_model(model, result.graph_module, inputs)


def test_refuses_an_unbatched_conv1d(capture_gm, run_pass, randomize_batch_norm, assert_matches_model):
    """Conv1d on (C, L) gives (C_out, L); BatchNorm1d then normalises L, not the channels.

    With C_out == L the channel check cannot tell; folding per output channel would be wrong.
    """
    model = randomize_batch_norm(_conv_bn(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4)), seed=8).eval()
    inputs = (torch.randn(3, 4),)
    result = run_pass(FoldConvBatchNorm, capture_gm(model, inputs), inputs)
    assert not result.modified
    assert result.stats["refused"] == {
        "unbatched convolution: BatchNorm normalises a dimension other than the channels": 1}
    assert_matches_model(model, result.graph_module, inputs, batches=(3,))


def test_folds_the_good_one_and_refuses_the_other(
    capture_gm, run_pass, randomize_batch_norm, assert_matches_model
):
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.plain = _conv_bn(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3))
            self.shared = SeveralConsumers()

        def forward(self, x):
            return self.shared(self.plain(x))

    model = randomize_batch_norm(Mixed(), seed=9).eval()
    inputs = (torch.randn(2, 3, 6, 6),)
    result = run_pass(FoldConvBatchNorm, capture_gm(model, inputs), inputs)
    assert result.stats["folded"] == 1
    assert result.stats["refused"] == {"anchor output has other users": 1}
    assert _batch_norm_count(result.graph_module) == 1
    assert_matches_model(model, result.graph_module, inputs)


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()),
    nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)),  # BN after a ReLU
    nn.Sequential(nn.Flatten(), nn.Linear(108, 4), nn.BatchNorm1d(4)),  # fold_linear_bn's job
    # not this pass's pattern either, so its refusal is not this pass's to report
    nn.Sequential(nn.Flatten(), nn.Linear(108, 4), nn.BatchNorm1d(4, track_running_stats=False)),
], ids=["no BatchNorm", "BatchNorm after a ReLU", "BatchNorm after a linear",
        "BatchNorm without running stats after a linear"])
def test_no_pattern_is_not_modified(capture_gm, run_pass, assert_untouched, model):
    inputs = (torch.randn(2, 3, 6, 6),)
    gm = capture_gm(model, inputs)
    before = ir.fingerprint(gm)
    result = run_pass(FoldConvBatchNorm, gm, inputs)
    assert_untouched(result, before)
    assert result.stats == {"folded": 0, "nodes_erased": 0, "refused": {}}


def test_refusing_everything_leaves_the_module_alone(capture_gm, run_pass, assert_untouched):
    """A run that folds nothing must not tidy the module either (honest ``modified=False``)."""
    inputs = (torch.randn(2, 3, 6, 6),)
    gm = capture_gm(SeveralConsumers(), inputs)
    gm.register_buffer("unread", torch.zeros(3))  # e.g. left behind by an earlier pass
    before = ir.fingerprint(gm)
    result = run_pass(FoldConvBatchNorm, gm, inputs)
    assert_untouched(result, before)
    assert hasattr(result.graph_module, "unread")


def test_refuses_a_non_graph_module():
    inputs = (torch.randn(2, 3, 6, 6),)
    with pytest.raises(PassError, match="fold_conv_bn.*GraphModule.*Sequential"):
        FoldConvBatchNorm()(_conv_bn(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), PassContext(inputs, inputs))


def test_refuses_unknown_options():
    with pytest.raises(TargetError, match="fold_conv_bn.*no option.*epsilon"):
        FoldConvBatchNorm(epsilon=1e-3)


def test_pass_manager_accepts_it(run_in_manager, randomize_batch_norm):
    model = randomize_batch_norm(_conv_bn(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)), seed=10)
    _, ledger = run_in_manager(FoldConvBatchNorm(), model.eval(), (torch.randn(2, 3, 8, 8),))
    entry = ledger.entry("fold_conv_bn")
    assert entry.modified
    assert entry.op_delta == {"aten.batch_norm": -1}
    assert entry.params_after == entry.params_before - 4 * 5  # gamma, beta, mean, var
    assert entry.drift["max_abs"] < 1e-4
