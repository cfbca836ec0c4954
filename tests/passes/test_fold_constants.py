"""fold_constants: parameter-only subgraphs become one precomputed tensor, unless that would grow
the model or the subgraph is random."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from compiler import ir
from compiler.errors import PassError, TargetError
from compiler.pass_base import PassContext
from passes import REGISTRY
from passes.cleanup.fold_constants import FoldConstants


class TransposedScaledWeight(nn.Module):
    """``x @ (w.t() * 2)``: the classic constant subgraph (t, mul) feeding a matmul."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 6))

    def forward(self, x):
        return x @ (self.weight.t() * 2)


class SharedConstant(nn.Module):
    """``t`` feeds both a matmul (not constant) and a constant ``mul``: two frontiers."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 6))

    def forward(self, x):
        transposed = self.weight.t()
        return x @ transposed + x @ (transposed * 2)


class ExpandedWeight(nn.Module):
    """An expand of a (1, 16) weight to (128, 16): folding would store 128x the elements."""

    def __init__(self):
        super().__init__()
        self.small = nn.Parameter(torch.randn(1, 16))

    def forward(self, x):
        return x @ self.small.expand(128, 16)


class RandomConstant(nn.Module):
    """``rand_like`` of a parameter is constant-looking but random: never folded."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return x + torch.rand_like(self.weight) * 0 + self.weight.exp()


class NothingConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return torch.relu(self.fc(x))


def _feeding(gm, target):
    """The get_attr tensors read by the first node calling ``target``."""
    node = next(node for node in gm.graph.nodes if node.target == target)
    return [ir.get_attribute(gm, arg.target) for arg in node.all_input_nodes if arg.op == "get_attr"]


def test_registered_under_its_file_name():
    assert REGISTRY["fold_constants"] is FoldConstants


def test_outputs_match_the_model(capture_gm, run_pass, assert_matches_model):
    model = TransposedScaledWeight().eval()
    inputs = (torch.randn(2, 6),)
    result = run_pass(FoldConstants, capture_gm(model, inputs), inputs)
    assert result.modified
    assert_matches_model(model, result.graph_module, inputs)


def test_folds_the_subgraph_into_one_tensor(capture_gm, run_pass):
    model = TransposedScaledWeight().eval()
    inputs = (torch.randn(2, 6),)
    gm = capture_gm(model, inputs)
    assert ir.op_histogram(gm) == {"aten.t": 1, "aten.mul": 1, "aten.matmul": 1}

    result = run_pass(FoldConstants, gm, inputs)

    assert ir.op_histogram(result.graph_module) == {"aten.matmul": 1}
    # the get_attr of weight, t and the replaced mul
    assert result.stats == {"folded": 1, "nodes_erased": 3, "refused": {}}
    (constant,) = _feeding(result.graph_module, torch.ops.aten.matmul.default)
    assert torch.equal(constant, model.weight.detach().t() * 2)
    assert constant.is_contiguous()
    # the original weight is read by nothing any more, so it is no longer stored
    assert "weight" not in dict(result.graph_module.named_parameters())
    assert ir.parameter_count(result.graph_module) == 30


def test_folds_every_frontier_of_a_shared_constant(capture_gm, run_pass, assert_matches_model):
    model = SharedConstant().eval()
    inputs = (torch.randn(2, 6),)
    result = run_pass(FoldConstants, capture_gm(model, inputs), inputs)
    assert result.stats["folded"] == 2  # t (read by a matmul) and t * 2
    assert ir.op_histogram(result.graph_module) == {"aten.matmul": 2, "aten.add": 1}
    assert_matches_model(model, result.graph_module, inputs)


def test_nothing_constant_is_not_modified(capture_gm, run_pass, assert_untouched):
    inputs = (torch.randn(2, 6),)
    gm = capture_gm(NothingConstant(), inputs)
    before = ir.fingerprint(gm)
    result = run_pass(FoldConstants, gm, inputs)
    assert_untouched(result, before)
    assert result.stats == {"folded": 0, "nodes_erased": 0, "refused": {}}


def test_refuses_a_fold_that_grows_the_model(capture_gm, run_pass, assert_untouched):
    inputs = (torch.randn(2, 128),)
    gm = capture_gm(ExpandedWeight(), inputs)
    before = ir.fingerprint(gm)
    result = run_pass(FoldConstants, gm, inputs)
    assert_untouched(result, before)
    assert result.stats["refused"] == {"would grow stored tensors": 1}
    assert ir.op_histogram(result.graph_module) == {"aten.expand": 1, "aten.matmul": 1}


@pytest.mark.parametrize(("max_growth", "folds"), [(127.0, False), (128.0, True)])
def test_max_growth_is_the_allowed_ratio(
    capture_gm, run_pass, assert_matches_model, max_growth, folds
):
    model = ExpandedWeight().eval()
    inputs = (torch.randn(2, 128),)
    result = run_pass(FoldConstants, capture_gm(model, inputs), inputs, max_growth=max_growth)
    assert result.modified is folds  # 128 x 16 elements from 16: a growth of exactly 128
    assert ("aten.expand" in ir.op_histogram(result.graph_module)) is not folds
    assert_matches_model(model, result.graph_module, inputs)


def test_never_folds_random_operators(capture_gm, run_pass, assert_matches_model):
    model = RandomConstant().eval()
    inputs = (torch.randn(2, 6),)
    result = run_pass(FoldConstants, capture_gm(model, inputs), inputs)
    histogram = ir.op_histogram(result.graph_module)
    assert histogram["aten.rand_like"] == 1
    assert histogram["aten.mul"] == 1  # rand_like * 0 depends on a random value: not constant
    assert "aten.exp" not in histogram  # the deterministic branch is folded
    assert result.stats["folded"] == 1
    assert_matches_model(model, result.graph_module, inputs)


def test_refuses_a_non_graph_module():
    inputs = (torch.randn(2, 6),)
    with pytest.raises(PassError, match="fold_constants.*GraphModule"):
        FoldConstants()(TransposedScaledWeight(), PassContext(inputs, inputs))


def test_refuses_unknown_options():
    with pytest.raises(TargetError, match="no option.*max_size.*max_growth"):
        FoldConstants(max_size=10)


def test_pass_manager_accepts_it(run_in_manager):
    _, ledger = run_in_manager(FoldConstants(), TransposedScaledWeight(), (torch.randn(2, 6),))
    entry = ledger.entry("fold_constants")
    assert entry.modified
    assert entry.options == {"max_growth": 1.0}
    assert entry.op_delta == {"aten.mul": -1, "aten.t": -1}
    assert entry.params_after == entry.params_before == 30
