"""prune_channels: the MAC budget met with kernel-friendly widths, exact where the cut channels were
zero, the identity at 0%, refusals with reasons, and a pruned model that lowers and runs."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import models
from compiler import TARGETS, PassError, PassSpec, compile
from compiler.pipeline import run_pipeline


def pruning_target(**options):
    base = TARGETS["cpu-fp32"]
    return dataclasses.replace(base, name="cpu-fp32-pruned",
                               pipeline=(*base.pipeline, PassSpec("prune_channels", options),
                                         PassSpec("eliminate_dead_code")))


@pytest.fixture(scope="module")
def digits():
    return models.load("digits-cnn")


def with_dead_channels(model, count: int):
    """conv2's BatchNorm zeroes its first ``count`` channels: they carry exactly 0 to the classifier."""
    dead = copy.deepcopy(model)
    with torch.no_grad():
        dead.bn2.weight[:count] = 0
        dead.bn2.bias[:count] = 0
    return dead.eval()


def test_cutting_channels_that_carry_zero_changes_nothing(digits):
    model = with_dead_channels(digits.model, 16)
    compiled = compile(model, pruning_target(macs=0.3), digits.example_inputs)
    entry = compiled.report.entry("prune_channels")
    assert entry.stats["widths"] == {"conv2": [32, 16]}  # conv1's 16 channels are not above round_to
    assert entry.macs_after < 0.7 * entry.macs_before
    images = digits.eval_data(64)[0]
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(compiled(images), expected, rtol=1e-4, atol=1e-5)
    weights = {init.name: tuple(init.dims) for init in compiled.onnx.graph.initializer}
    assert (10, 16 * 4 * 4) in weights.values()  # the classifier lost 16 blocks of 16 columns


def test_zero_percent_is_the_identity(digits):
    result = run_pipeline(digits.model, pruning_target(macs=0.0), digits.example_inputs)
    entry = result.ledger.entry("prune_channels")
    assert entry.modified is False and entry.macs_after == entry.macs_before


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_efficientnet_meets_the_budget_with_widths_in_multiples_of_16(ratio):
    entry_model = models.load("efficientnet-lite0")
    compiled = compile(entry_model.model, pruning_target(macs=ratio), entry_model.example_inputs)
    entry = compiled.report.entry("prune_channels")
    removed = 1 - entry.macs_after / entry.macs_before
    assert ratio <= removed <= ratio + 0.05, removed
    assert entry.stats["groups_pruned"] >= 20
    assert all(kept % 16 == 0 and kept < before for before, kept in entry.stats["widths"].values())
    assert entry.stats["skipped"]["graph output 'linear': the model's interface keeps its width"] == 1
    # the runtime computes what the pruned IR computes (compile checks it), at batch sizes beyond the example
    images = entry_model.eval_data(3)[0]
    with torch.no_grad():
        expected = compiled.graph_module(images)[0]
    torch.testing.assert_close(compiled(images), expected, rtol=1e-3, atol=1e-4)


def test_protected_groups_are_left_whole_and_say_so(digits):
    result = run_pipeline(digits.model, pruning_target(macs=0.3, protect=["conv2"]), digits.example_inputs)
    entry = result.ledger.entry("prune_channels")
    assert entry.modified is False and entry.stats["skipped"]["protected"] == 1


@pytest.mark.parametrize(("options", "message"), [
    ({"macs": 1.0}, "fraction of MACs to remove"),
    ({"macs": True}, "fraction of MACs to remove"),
    ({"importance": "taylor"}, "importance 'taylor' is not one of l1, l2"),
    ({"round_to": 0}, "round_to must be a positive integer"),
])
def test_bad_options_are_pass_errors(digits, options, message):
    with pytest.raises(PassError, match=message):
        run_pipeline(digits.model, pruning_target(**options), digits.example_inputs)
