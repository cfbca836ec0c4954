"""remove_noops: nodes whose output equals their input are bypassed; look-alikes that change
values, shapes or dtypes are kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compiler import ir
from compiler.errors import PassError, TargetError
from compiler.pass_base import PassContext
from passes import REGISTRY
from passes.cleanup.remove_noops import RemoveNoops

INPUTS = (torch.randn(2, 4, 6),)


class Around(nn.Module):
    """``tanh(fn(x))``: one candidate op between the input and a real op."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return torch.tanh(self.fn(x))


class NoopSoup(nn.Module):
    """Every kind of no-op in one model, between real ops, with a dynamic-batch reshape."""

    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.3)
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        y = self.dropout(self.fc(x))
        y = y.reshape(x.shape[0], 4, 6).clone().detach()
        y = y.transpose(1, 2).transpose(1, 2).permute(0, 2, 1).permute(0, 2, 1)
        y = y.to(torch.float32) * 1 + 0
        y = y[:, :] / 1 - 0
        y = y.view(-1, 4, 6).expand(-1, 4, 6)
        return torch.tanh(y)


REMOVED = {
    "dropout": (nn.Dropout(0.3), "dropout", "aten.dropout"),
    "dropout1d": (nn.Dropout1d(0.3), "dropout", "aten.feature_dropout"),
    "alpha dropout": (nn.AlphaDropout(0.3), "dropout", "aten.alpha_dropout"),
    "training dropout p=0": (lambda x: F.dropout(x, 0.0, training=True), "dropout", "aten.dropout"),
    "clone": (lambda x: x.clone(), "identity", "aten.clone"),
    "detach": (lambda x: x.detach(), "identity", "aten.detach"),
    "alias": (lambda x: torch.ops.aten.alias(x), "identity", "aten.alias"),
    "same-dtype cast": (lambda x: x.to(torch.float32), "cast", "aten.to"),
    "type_as itself": (lambda x: x.type_as(x), "cast", "aten.type_as"),
    "reshape to own shape": (lambda x: x.reshape(x.shape[0], 4, 6), "reshape", "aten.reshape"),
    "view to own shape": (lambda x: x.view(-1, 4, 6), "reshape", "aten.view"),
    "expand to own shape": (lambda x: x.expand(-1, 4, 6), "reshape", "aten.expand"),
    "flatten of the last dim": (lambda x: x.flatten(2), "reshape", "aten.flatten"),
    "full slice": (lambda x: x[:, :, 0:6], "slice", "aten.slice"),
    "times 1": (lambda x: x * 1, "neutral arithmetic", "aten.mul"),
    "plus 0": (lambda x: x + 0.0, "neutral arithmetic", "aten.add"),
    "minus 0": (lambda x: x - 0, "neutral arithmetic", "aten.sub"),
    "divided by 1": (lambda x: x / 1, "neutral arithmetic", "aten.div"),
    "permute pair": (lambda x: x.permute(1, 2, 0).permute(2, 0, 1), "permute pair", "aten.permute"),
    "transpose pair": (lambda x: x.transpose(1, 2).transpose(2, 1), "permute pair", "aten.transpose"),
}

KEPT = {
    "training dropout": lambda x: F.dropout(x, 0.5, training=True),
    "reshape to another shape": lambda x: x.reshape(-1, 6, 4),
    "times 2": lambda x: x * 2,
    "plus 1": lambda x: x + 1,
    "cast to float64": lambda x: x.to(torch.float64),
    "permutes that do not cancel": lambda x: x.permute(1, 2, 0).permute(1, 2, 0),
    "transposes of different dims": lambda x: x.transpose(1, 2).transpose(0, 1),
    "flatten that merges dims": lambda x: x.flatten(1),
}


def test_registered_under_its_file_name():
    assert REGISTRY["remove_noops"] is RemoveNoops


def test_outputs_match_the_model(capture_gm, run_pass, assert_matches_model):
    model = NoopSoup().eval()
    result = run_pass(RemoveNoops, capture_gm(model, INPUTS), INPUTS)
    assert result.modified
    assert_matches_model(model, result.graph_module, INPUTS)


def test_removes_every_kind_and_counts_it(capture_gm, run_pass):
    gm = capture_gm(NoopSoup(), INPUTS)
    result = run_pass(RemoveNoops, gm, INPUTS)
    assert result.stats == {
        "removed": 14, "cast": 1, "dropout": 1, "identity": 2, "neutral arithmetic": 4,
        "permute pair": 2, "reshape": 3, "slice": 1,
    }
    # the impure dtype assert that .to leaves behind stays; so do the real ops
    assert ir.op_histogram(result.graph_module) == {
        "aten.linear": 1, "aten.tanh": 1, "aten._assert_tensor_metadata": 1,
    }


@pytest.mark.parametrize(("fn", "kind", "op"), REMOVED.values(), ids=REMOVED.keys())
def test_removes_each_noop(capture_gm, run_pass, assert_matches_model, fn, kind, op):
    model = Around(fn).eval()
    gm = capture_gm(model, INPUTS)
    assert op in ir.op_histogram(gm)
    result = run_pass(RemoveNoops, gm, INPUTS)
    histogram = ir.op_histogram(result.graph_module)
    assert op not in histogram
    assert histogram["aten.tanh"] == 1
    assert result.stats[kind] == result.stats["removed"] >= 1
    assert_matches_model(model, result.graph_module, INPUTS)


@pytest.mark.parametrize("fn", KEPT.values(), ids=KEPT.keys())
def test_keeps_lookalikes_and_reports_unmodified(capture_gm, run_pass, assert_untouched, fn):
    gm = capture_gm(Around(fn).eval(), INPUTS)
    before = ir.fingerprint(gm)
    result = run_pass(RemoveNoops, gm, INPUTS)
    assert_untouched(result, before)
    assert result.stats == {"removed": 0}


@pytest.mark.parametrize("name", [name for name in KEPT if name != "training dropout"])
def test_kept_lookalikes_still_compute_the_model(capture_gm, run_pass, assert_matches_model, name):
    model = Around(KEPT[name]).eval()
    result = run_pass(RemoveNoops, capture_gm(model, INPUTS), INPUTS)
    assert_matches_model(model, result.graph_module, INPUTS)


def test_keeps_the_partial_slice_of_an_indexing(capture_gm, run_pass, assert_matches_model):
    model = Around(lambda x: x[:, 1:]).eval()  # captured as a full slice of dim 0, then dim 1
    gm = capture_gm(model, INPUTS)
    assert ir.op_histogram(gm)["aten.slice"] == 2
    result = run_pass(RemoveNoops, gm, INPUTS)
    assert ir.op_histogram(result.graph_module)["aten.slice"] == 1
    assert result.stats == {"removed": 1, "slice": 1}
    assert_matches_model(model, result.graph_module, INPUTS)


def test_three_transposes_leave_one(capture_gm, run_pass, assert_matches_model):
    model = Around(lambda x: x.transpose(1, 2).transpose(1, 2).transpose(1, 2)).eval()
    result = run_pass(RemoveNoops, capture_gm(model, INPUTS), INPUTS)
    assert ir.op_histogram(result.graph_module)["aten.transpose"] == 1
    assert result.stats == {"removed": 1, "permute pair": 1}
    assert_matches_model(model, result.graph_module, INPUTS)


def test_pair_whose_first_permute_has_other_users(capture_gm, run_pass, assert_matches_model):
    def fn(x):
        first = x.permute(0, 2, 1)
        return first.permute(0, 2, 1) + first.sum()

    model = Around(fn).eval()
    result = run_pass(RemoveNoops, capture_gm(model, INPUTS), INPUTS)
    assert ir.op_histogram(result.graph_module)["aten.permute"] == 1  # the shared first one
    assert_matches_model(model, result.graph_module, INPUTS)


def test_refuses_a_non_graph_module():
    with pytest.raises(PassError, match="remove_noops.*GraphModule.*Dropout"):
        RemoveNoops()(nn.Dropout(), PassContext(INPUTS, INPUTS))


def test_refuses_unknown_options():
    with pytest.raises(TargetError, match="no option.*keep_dropout.*none"):
        RemoveNoops(keep_dropout=True)


def test_pass_manager_accepts_it(run_in_manager):
    _, ledger = run_in_manager(RemoveNoops(), NoopSoup(), INPUTS)
    entry = ledger.entry("remove_noops")
    assert entry.modified
    assert entry.stats["removed"] == 14
    assert entry.op_delta["aten.permute"] == -2
    assert entry.drift["max_abs"] == 0.0
