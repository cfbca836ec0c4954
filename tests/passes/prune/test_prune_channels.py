"""prune_channels: the MAC budget met with kernel-friendly widths, exact where the cut channels were
zero, the identity at 0%, refusals with reasons, and a pruned model that lowers and runs."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import models
from compiler import TARGETS, PassError, PassSpec, compile, meta
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
    compiled = compile(model, pruning_target(macs=0.3, importance="l1", reconstruct=False, round_to=16),
                       digits.example_inputs)
    entry = compiled.report.entry("prune_channels")
    assert entry.stats["widths"] == {"conv2": [32, 16]}  # conv1's 16 channels are not above round_to
    assert entry.macs_after < 0.7 * entry.macs_before
    images = digits.eval_data(64)[0]
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(compiled(images), expected, rtol=1e-4, atol=1e-5)
    weights = {init.name: tuple(init.dims) for init in compiled.onnx.graph.initializer}
    assert (10, 16 * 4 * 4) in weights.values()  # the classifier lost 16 blocks of 16 columns


@pytest.mark.parametrize("importance", ["l2", "bn_scale", "taylor", "reconstruction"])
def test_every_importance_finds_the_channels_that_carry_zero(digits, importance):
    model = with_dead_channels(digits.model, 16)
    calibration = digits.calibration_data(64)
    result = run_pipeline(model, pruning_target(macs=0.3, importance=importance, round_to=16), digits.example_inputs,
                          calibration_data=[calibration])
    entry = result.ledger.entry("prune_channels")
    assert entry.stats["widths"] == {"conv2": [32, 16]}
    images = digits.eval_data(64)[0]
    with torch.no_grad():
        expected, actual = model(images), result.graph_module(images)[0]
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)  # the cut channels carried exactly 0
    # 64 samples are too few rows for the classifier's 256 remaining columns: left as cut, and said so
    assert entry.stats["reconstruction"]["layers_fitted"] == 0
    assert "fewer than 4 calibration rows per input weight" in next(iter(entry.stats["reconstruction"]["skipped"]))


def test_bn_scale_ranks_by_the_folded_batchnorms_gamma_not_by_the_folded_weight(digits):
    model = copy.deepcopy(digits.model).eval()
    with torch.no_grad():  # channels 0-15: small gamma over a small deviation, so the folded weight stays as large
        model.bn2.weight.fill_(1.0)
        model.bn2.running_var.fill_(1.0 - model.bn2.eps)
        model.bn2.weight[:16] = 0.01
        model.bn2.running_var[:16] = 1e-4 - model.bn2.eps
    kept = {}
    for importance in ("l2", "bn_scale"):
        result = run_pipeline(model, pruning_target(macs=0.3, importance=importance, round_to=16, reconstruct=False),
                              digits.example_inputs)
        conv2 = next(node for node in result.graph_module.graph.nodes if node.name == "conv2d_1")
        kept[importance] = conv2.meta[meta.KEPT_FEATURES]["index"].tolist()
        if importance == "bn_scale":  # the recorded gammas lost the same channels
            assert conv2.meta[meta.BN_GAMMA].tolist() == [1.0] * 16
            assert "scored_by_l2" not in result.ledger.entry("prune_channels").stats
    assert kept["bn_scale"] == list(range(16, 32)) and kept["l2"] != kept["bn_scale"]


def test_bn_scale_scores_a_group_without_batchnorm_by_l2_and_says_so():
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    result = run_pipeline(model, pruning_target(params=0.3, importance="bn_scale", round_to=8, reconstruct=False),
                          (torch.randn(2, 8),))
    entry = result.ledger.entry("prune_channels")
    assert entry.stats["scored_by_l2"] == ["0"] and entry.stats["widths"]["0"][1] < 32


def test_reconstruction_brings_a_pruned_model_closer_than_cutting_alone(digits):
    calibration = digits.calibration_data(256)
    images = digits.eval_data(256)[0]
    with torch.no_grad():
        expected = digits.model(images)
    errors = {}
    for reconstruct in (False, True):
        result = run_pipeline(digits.model, pruning_target(macs=0.5, importance="l1", reconstruct=reconstruct,
                                                           round_to=4),
                              digits.example_inputs, calibration_data=[calibration])
        with torch.no_grad():
            errors[reconstruct] = float((result.graph_module(images)[0] - expected).pow(2).mean())
    assert errors[True] < 0.8 * errors[False], errors
    assert result.ledger.entry("prune_channels").stats["reconstruction"]["layers_fitted"] >= 1


class _Chain(torch.nn.Module):
    """Four linears: three hidden groups in a row, each re-fitted after the one before it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in ((32, 64), (64, 64), (64, 64), (64, 8)))

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


def test_sequential_reconstruction_fits_each_layer_to_the_refitted_ones_before_it():
    # regression: the lockstep run kept the old weights of a re-fitted layer, so every later layer was
    # fitted to outputs the model no longer computed, and three fits left it worse than none
    model = _Chain().eval()
    calibration = (torch.randn(512, 32),)
    with torch.no_grad():
        expected = model(*calibration)
    errors = {}
    for reconstruct in (False, "readers"):
        result = run_pipeline(model, pruning_target(macs=0.4, importance="l1", reconstruct=reconstruct, round_to=1,
                                                           reconstruct_samples=512),
                              (calibration[0][:1],), calibration_data=[calibration])
        with torch.no_grad():
            output = result.graph_module(*calibration)[0]
        errors[reconstruct] = float((output - expected).pow(2).mean() / expected.pow(2).mean())
    assert result.ledger.entry("prune_channels").stats["reconstruction"]["layers_fitted"] == 3
    assert errors["readers"] < 0.5 * errors[False], errors


def test_a_parameter_budget_is_met_and_uniform_allocation_keeps_one_share(digits):
    calibration = digits.calibration_data(64)
    result = run_pipeline(digits.model, pruning_target(params=0.3, allocation="uniform"),
                          digits.example_inputs, calibration_data=[calibration])
    entry = result.ledger.entry("prune_channels")
    assert entry.params_after <= 0.7 * entry.params_before
    assert entry.stats["budget"] == {"params": 0.3}


class _TwoHeads(nn.Module):
    """Two conv branches of one input; the second's output is scaled down 1000x, so its channels matter little."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.loud = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 8, 1))
        self.quiet = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 8, 1))

    def forward(self, x):
        return self.loud(x), self.quiet(x) * 1e-3


def test_sensitivity_allocation_cuts_where_the_output_changes_least():
    # Each branch's 64 channels score alike on their own layers; only the model's output tells them apart.
    model = _TwoHeads().eval()
    data = [(torch.randn(64, 3, 12, 12),)]
    outputs = {}
    for allocation in ("uniform", "sensitivity"):
        result = run_pipeline(model, pruning_target(macs=0.3, allocation=allocation, round_to=16, max_prune=0.75),
                              (data[0][0][:2],), calibration_data=data)
        entry = result.ledger.entry("prune_channels")
        assert entry.macs_after <= 0.7 * entry.macs_before
        outputs[allocation] = (entry, result.graph_module)
    entry, pruned = outputs["sensitivity"]
    assert entry.stats["widths"] == {"quiet.0": [64, 16]}  # uniform and global cut both to 48 and 32
    errors = entry.stats["sensitivity"]["output_error_at_half"]
    assert errors["quiet.0"] < 1e-4 * errors["loud.0"], errors
    images = torch.randn(16, 3, 12, 12)
    with torch.no_grad():
        expected = model(images)[0]
        uniform_error = (outputs["uniform"][1](images)[0] - expected).pow(2).mean()
        sensitivity_error = (pruned(images)[0] - expected).pow(2).mean()
    assert sensitivity_error < 0.1 * uniform_error


def test_round_to_auto_takes_the_backends_channel_multiple(digits):
    from backends.onnxruntime.isa import channel_multiple, detect_isa

    calibration = digits.calibration_data(64)
    result = run_pipeline(digits.model, pruning_target(macs=0.3), digits.example_inputs,
                          calibration_data=[calibration])
    entry = result.ledger.entry("prune_channels")
    assert entry.stats["round_to"] == channel_multiple(detect_isa()) in (8, 16)
    assert all(kept % entry.stats["round_to"] == 0 for _, kept in entry.stats["widths"].values())


def test_an_unfolded_batchnorm_is_cut_with_its_channels(digits):
    # no fold_conv_bn before pruning: bn2's scale, shift and statistics must lose the same channels
    model = with_dead_channels(digits.model, 16)
    target = dataclasses.replace(TARGETS["cpu-fp32"], name="bn-kept", pipeline=(
        PassSpec("prune_channels", {"macs": 0.3, "round_to": 16, "reconstruct": False}),))
    result = run_pipeline(model, target, digits.example_inputs, calibration_data=[digits.calibration_data(64)])
    assert result.ledger.entry("prune_channels").stats["widths"] == {"conv2": [32, 16]}
    assert result.graph_module.get_buffer("bn2.running_mean").shape == (16,)
    images = digits.eval_data(64)[0]
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(images)[0], model(images), rtol=1e-4, atol=1e-4)


def test_zero_percent_is_the_identity(digits):
    result = run_pipeline(digits.model, pruning_target(macs=0.0), digits.example_inputs)
    entry = result.ledger.entry("prune_channels")
    assert entry.modified is False and entry.macs_after == entry.macs_before


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_efficientnet_meets_the_budget_with_widths_in_multiples_of_16(ratio):
    entry_model = models.load("efficientnet-lite0")
    compiled = compile(entry_model.model, pruning_target(macs=ratio, round_to=16), entry_model.example_inputs,
                       calibration_data=[entry_model.calibration_data(32)])
    entry = compiled.report.entry("prune_channels")
    removed = 1 - entry.macs_after / entry.macs_before
    assert ratio <= removed <= ratio + 0.05, removed
    assert entry.stats["groups_pruned"] >= 10
    assert entry.stats["reconstruction"]["layers_fitted"] >= 10
    assert all(kept % 16 == 0 and kept < before for before, kept in entry.stats["widths"].values())
    assert entry.stats["skipped"]["graph output 'linear': the model's interface keeps its width"] == 1
    # the runtime computes what the pruned IR computes (compile checks it), at batch sizes beyond the example
    images = entry_model.eval_data(3)[0]
    with torch.no_grad():
        expected = compiled.graph_module(images)[0]
    scale = max(1.0, float(expected.abs().max()))  # re-fitted weights: fp32 rounding grows with the logits
    torch.testing.assert_close(compiled(images), expected, rtol=1e-3, atol=1e-4 * scale)


def test_protected_groups_are_left_whole_and_say_so(digits):
    result = run_pipeline(digits.model, pruning_target(macs=0.3, protect=["conv2"], reconstruct=False,
                                                       importance="l1"), digits.example_inputs)
    entry = result.ledger.entry("prune_channels")
    assert entry.modified is False and entry.stats["skipped"]["protected"] == 1


@pytest.mark.parametrize(("options", "message"), [
    ({"macs": 1.0}, "fraction of MACs to remove"),
    ({"macs": True}, "fraction of MACs to remove"),
    ({"params": 1.5}, "fraction of parameters to remove"),
    ({"importance": "fisher"}, "importance 'fisher' is not one of l1, l2, bn_scale, taylor, reconstruction"),
    ({"round_to": 0}, "round_to must be 'auto' or a positive integer"),
    ({"macs": 0.3, "params": 0.3}, "give one budget"),
    ({"allocation": "by-hand"}, "allocation must be 'auto'"),
    ({"max_prune": 0}, "max_prune"),
])
def test_bad_options_are_pass_errors(digits, options, message):
    with pytest.raises(PassError, match=message):
        run_pipeline(digits.model, pruning_target(**options), digits.example_inputs,
                     calibration_data=[digits.calibration_data(16)])


class TokenMLP(nn.Module):
    """Embedding, a two-layer MLP per token, masked mean pooling: padded positions never reach the output."""

    def __init__(self):
        super().__init__()
        self.embed, self.up, self.down = nn.Embedding(30, 16), nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, ids, mask):
        x = self.down(torch.relu(self.up(self.embed(ids))))
        weights = mask.unsqueeze(-1).to(x.dtype)
        return (x * weights).sum(1) / weights.sum(1)


def test_padded_positions_do_not_sway_scores_or_refits():
    """Metamorphic: what sits at padded positions must not change the pruned model (the fit reads real tokens)."""
    torch.manual_seed(0)
    model = TokenMLP().eval()
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 17, (128,), generator=generator)
    mask = (torch.arange(16)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 30, (128, 16), generator=generator)
    results = []
    for filler in (0, 7):  # the id at padded positions
        samples = (torch.where(mask.bool(), ids, filler), mask)
        compiled = compile(model, "cpu-fp32", tuple(tensor[:2] for tensor in samples), calibration_data=[samples],
                           prune={"macs": 0.3}, recover_seconds=0)
        entry = compiled.report.entry("prune_channels")
        assert entry.stats["padding"] == {"mask_input": 1, "samples": 128, "real_tokens": int(mask.sum()),
                                          "padded_length": 16}
        assert entry.stats["reconstruction"]["layers_fitted"] == 1
        results.append({name: tensor.clone() for name, tensor in compiled.graph_module.state_dict().items()})
    assert results[0].keys() == results[1].keys()
    for name, tensor in results[0].items():
        torch.testing.assert_close(results[1][name], tensor, msg=name)
