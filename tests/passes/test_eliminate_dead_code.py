"""eliminate_dead_code: unused nodes and the tensors only they read go; everything else stays."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from compiler import ir
from compiler.errors import PassError, TargetError
from compiler.pass_base import PassContext
from passes import REGISTRY
from passes.cleanup.eliminate_dead_code import EliminateDeadCode


class DeadBranch(nn.Module):
    """A linear + relu computed and thrown away, next to a live linear + BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(6, 4)
        self.dead = nn.Linear(6, 3)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        torch.relu(self.dead(x))  # result unused: dead code in the captured graph
        return self.bn(self.used(x))


class NoDeadCode(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return torch.relu(self.fc(x))


class ImpureAndUnusedInput(nn.Module):
    """``.to`` leaves an unused but impure ``_assert_tensor_metadata``; input ``y`` is unused."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x, y):
        return self.fc(x.to(torch.float32))


def test_registered_under_its_file_name():
    assert REGISTRY["eliminate_dead_code"] is EliminateDeadCode


def test_outputs_match_the_model(capture_gm, run_pass, randomize_batch_norm, assert_matches_model):
    model = randomize_batch_norm(DeadBranch(), seed=1).eval()
    inputs = (torch.randn(2, 6),)
    result = run_pass(EliminateDeadCode, capture_gm(model, inputs), inputs)
    assert result.modified
    assert_matches_model(model, result.graph_module, inputs)


def test_removes_dead_nodes_and_their_tensors(capture_gm, run_pass):
    inputs = (torch.randn(2, 6),)
    gm = capture_gm(DeadBranch(), inputs)
    assert ir.op_histogram(gm) == {"aten.linear": 2, "aten.relu": 1, "aten.batch_norm": 1}

    result = run_pass(EliminateDeadCode, gm, inputs)

    assert ir.op_histogram(result.graph_module) == {"aten.linear": 1, "aten.batch_norm": 1}
    # linear, relu, the two get_attr of `dead`, and the unread bn.num_batches_tracked
    assert result.stats["nodes_removed"] == 5
    assert result.stats["tensor_elements_dropped"] == 6 * 3 + 3 + 1
    names = {name for name, _ in result.graph_module.named_parameters()}
    names |= {name for name, _ in result.graph_module.named_buffers()}
    assert not any(name.startswith("dead.") for name in names)
    assert "bn.num_batches_tracked" not in names
    assert {"used.weight", "used.bias", "bn.running_mean", "bn.running_var"} <= names
    assert all(node.users for node in result.graph_module.graph.nodes if node.op == "get_attr")


def test_no_dead_code_is_not_modified(capture_gm, run_pass, assert_untouched):
    inputs = (torch.randn(2, 6),)
    gm = capture_gm(NoDeadCode(), inputs)
    before = ir.fingerprint(gm)
    result = run_pass(EliminateDeadCode, gm, inputs)
    assert_untouched(result, before)
    assert result.stats == {"nodes_removed": 0, "tensor_elements_dropped": 0}


def test_second_run_finds_nothing(capture_gm, run_pass, assert_untouched):
    inputs = (torch.randn(2, 6),)
    gm = run_pass(EliminateDeadCode, capture_gm(DeadBranch(), inputs), inputs).graph_module
    before = ir.fingerprint(gm)
    assert_untouched(run_pass(EliminateDeadCode, gm, inputs), before)


def test_keeps_impure_nodes_and_unused_inputs(capture_gm, run_pass, assert_matches_model):
    model = ImpureAndUnusedInput().eval()
    inputs = (torch.randn(2, 6), torch.randn(2, 6))
    gm = capture_gm(model, inputs)
    placeholders = [node.name for node in gm.graph.nodes if node.op == "placeholder"]

    result = run_pass(EliminateDeadCode, gm, inputs)

    # the assert has no users but is a side effect; the unused input is part of the interface
    assert ir.op_histogram(result.graph_module)["aten._assert_tensor_metadata"] == 1
    after = [node.name for node in result.graph_module.graph.nodes if node.op == "placeholder"]
    assert after == placeholders == ["x", "y"]
    assert_matches_model(model, result.graph_module, inputs)


def test_refuses_a_non_graph_module():
    inputs = (torch.randn(2, 6),)
    with pytest.raises(PassError, match="eliminate_dead_code.*GraphModule.*Linear"):
        EliminateDeadCode()(nn.Linear(6, 4), PassContext(inputs, inputs))


def test_refuses_unknown_options():
    with pytest.raises(TargetError, match="no option.*aggressive"):
        EliminateDeadCode(aggressive=True)


def test_postcondition_names_a_dead_node_left_behind(capture_gm):
    gm = capture_gm(NoDeadCode(), (torch.randn(2, 6),))
    EliminateDeadCode().ensures(gm)  # nothing dead: accepted
    relu = next(node for node in gm.graph.nodes if node.target == torch.ops.aten.relu.default)
    with gm.graph.inserting_after(relu):
        gm.graph.call_function(torch.ops.aten.neg.default, (relu,))
    with pytest.raises(PassError, match=r"dead node left behind: neg\w* \(aten.neg\)"):
        EliminateDeadCode().ensures(gm)


def test_pass_manager_accepts_it(run_in_manager, randomize_batch_norm):
    model = randomize_batch_norm(DeadBranch(), seed=2).eval()
    _, ledger = run_in_manager(EliminateDeadCode(), model, (torch.randn(2, 6),))
    entry = ledger.entry("eliminate_dead_code")
    assert entry.modified
    assert entry.op_delta == {"aten.linear": -1, "aten.relu": -1}
    assert entry.params_after == entry.params_before - (6 * 3 + 3)
    assert entry.drift["max_abs"] == 0.0
