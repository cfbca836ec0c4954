"""fold_linear_bn: BatchNorm1d after a linear layer on a rank-2 tensor folds into the linear;
anything else (rank-3 features, shared weights, several consumers) is refused with its reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from compiler import ir
from compiler.errors import PassError, TargetError
from compiler.pass_base import PassContext
from passes import REGISTRY
from passes.fusion.fold_linear_bn import FoldLinearBatchNorm

INPUTS = (torch.randn(2, 6),)


def _linear_bn(bias: bool = True, **bn_options) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5, bias=bias), nn.BatchNorm1d(5, **bn_options))


class RankThree(nn.Module):
    """Linear on (N, 5, 6) gives (N, 5, 5): BatchNorm1d normalises dim 1, not the features.

    The channel counts agree, so only the rank tells the fold is wrong.
    """

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x))


class SeveralConsumers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        y = self.fc(x)
        return self.bn(y) * y


class TiedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 5)
        self.second = nn.Linear(6, 5)
        self.second.weight = self.first.weight
        self.first_bn = nn.BatchNorm1d(5)
        self.second_bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.first_bn(self.first(x)) + self.second_bn(self.second(x))


class MlpHead(nn.Module):
    """Two linear + BatchNorm1d + ReLU blocks: the usual place this pattern appears."""

    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.block2 = nn.Sequential(nn.Linear(8, 4, bias=False), nn.BatchNorm1d(4), nn.ReLU())

    def forward(self, x):
        return self.block2(self.block1(x))


FOLDABLE = {
    "with bias": lambda: _linear_bn(),
    "without bias": lambda: _linear_bn(bias=False),
    "BatchNorm affine=False": lambda: _linear_bn(affine=False),
    "BatchNorm eps=0.5": lambda: _linear_bn(eps=0.5),
    "out_features=1": lambda: nn.Sequential(nn.Linear(6, 1), nn.BatchNorm1d(1)),
}

REFUSED = {
    "BatchNorm1d on a rank-3 linear output": (
        RankThree, (2, 5, 6),
        {"BatchNorm normalises a dimension other than the linear's features": 1}),
    "linear output with several consumers": (
        SeveralConsumers, (2, 6), {"anchor output has other users": 1}),
    "tied linear weights": (
        TiedWeights, (2, 6), {"anchor weight is shared with other nodes": 2}),
    "BatchNorm without running stats": (
        lambda: _linear_bn(track_running_stats=False), (2, 6),
        {"BatchNorm uses batch statistics (training, or no running stats)": 1}),
}


def test_registered_under_its_file_name():
    assert REGISTRY["fold_linear_bn"] is FoldLinearBatchNorm


@pytest.mark.parametrize("build", FOLDABLE.values(), ids=FOLDABLE.keys())
def test_folds_and_outputs_match(
    capture_gm, run_pass, randomize_batch_norm, assert_matches_model, build
):
    model = randomize_batch_norm(build(), seed=11).eval()
    result = run_pass(FoldLinearBatchNorm, capture_gm(model, INPUTS), INPUTS)
    assert result.modified
    assert result.stats["folded"] == 1
    assert result.stats["refused"] == {}
    assert ir.op_histogram(result.graph_module) == {"aten.linear": 1}
    assert_matches_model(model, result.graph_module, INPUTS)


def test_folded_weight_and_bias_follow_the_formula(capture_gm, run_pass, randomize_batch_norm):
    model = randomize_batch_norm(_linear_bn(bias=False), seed=12).eval()
    result = run_pass(FoldLinearBatchNorm, capture_gm(model, INPUTS), INPUTS)
    linear, bn = model[0], model[1]
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    expected_weight = linear.weight.detach().double() * scale[:, None]
    expected_bias = bn.bias.detach().double() - bn.running_mean.double() * scale

    (node,) = [node for node in ir.call_nodes(result.graph_module)]
    assert node.target == torch.ops.aten.linear.default
    weight = ir.get_attribute(result.graph_module, node.args[1].target)
    bias = ir.get_attribute(result.graph_module, node.args[2].target)
    torch.testing.assert_close(weight.double(), expected_weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bias.double(), expected_bias, rtol=1e-6, atol=1e-6)


def test_folds_every_block_of_an_mlp(
    capture_gm, run_pass, randomize_batch_norm, assert_matches_model
):
    model = randomize_batch_norm(MlpHead(), seed=13).eval()
    result = run_pass(FoldLinearBatchNorm, capture_gm(model, INPUTS), INPUTS)
    assert result.stats["folded"] == 2
    assert ir.op_histogram(result.graph_module) == {"aten.linear": 2, "aten.relu": 2}
    assert_matches_model(model, result.graph_module, INPUTS)


@pytest.mark.parametrize(("build", "shape", "refused"), REFUSED.values(), ids=REFUSED.keys())
def test_refuses_with_a_reason_and_outputs_stay_exact(
    capture_gm, run_pass, randomize_batch_norm, assert_matches_model, assert_untouched,
    build, shape, refused,
):
    model = randomize_batch_norm(build(), seed=14).eval()
    inputs = (torch.randn(shape),)
    gm = capture_gm(model, inputs)
    batch_norms = ir.op_histogram(gm)["aten.batch_norm"]
    before = ir.fingerprint(gm)

    result = run_pass(FoldLinearBatchNorm, gm, inputs)

    assert_untouched(result, before)
    assert result.stats == {"folded": 0, "nodes_erased": 0, "refused": refused}
    assert ir.op_histogram(result.graph_module)["aten.batch_norm"] == batch_norms
    assert_matches_model(model, result.graph_module, inputs)


@pytest.mark.parametrize(("model", "shape"), [
    (nn.Sequential(nn.Linear(6, 5), nn.ReLU()), (2, 6)),
    (nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.BatchNorm1d(5)), (2, 6)),
    (nn.Sequential(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5)), (2, 3, 8)),  # fold_conv_bn's job
    # not this pass's pattern either, so its refusal is not this pass's to report
    (nn.Sequential(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5, track_running_stats=False)), (2, 3, 8)),
], ids=["no BatchNorm", "BatchNorm after a ReLU", "BatchNorm after a conv",
        "BatchNorm without running stats after a conv"])
def test_no_pattern_is_not_modified(capture_gm, run_pass, assert_untouched, model, shape):
    inputs = (torch.randn(shape),)
    gm = capture_gm(model, inputs)
    before = ir.fingerprint(gm)
    result = run_pass(FoldLinearBatchNorm, gm, inputs)
    assert_untouched(result, before)
    assert result.stats == {"folded": 0, "nodes_erased": 0, "refused": {}}


def test_refuses_a_non_graph_module():
    with pytest.raises(PassError, match="fold_linear_bn.*GraphModule.*Sequential"):
        FoldLinearBatchNorm()(_linear_bn(), PassContext(INPUTS, INPUTS))


def test_refuses_unknown_options():
    with pytest.raises(TargetError, match="fold_linear_bn.*no option.*rank"):
        FoldLinearBatchNorm(rank=3)


def test_pass_manager_accepts_it(run_in_manager, randomize_batch_norm):
    model = randomize_batch_norm(MlpHead(), seed=15).eval()
    _, ledger = run_in_manager(FoldLinearBatchNorm(), model, INPUTS)
    entry = ledger.entry("fold_linear_bn")
    assert entry.modified
    assert entry.stats["folded"] == 2
    assert entry.op_delta == {"aten.batch_norm": -2}
    # BatchNorm tensors go (4 per feature); the bias-free second linear gains a bias of 4
    assert entry.params_after == entry.params_before - 4 * (8 + 4) + 4
