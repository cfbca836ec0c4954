"""cross_layer_equalization: per-channel weight ranges of consecutive layers are balanced while the
float outputs stay what they were; every pair it cannot rescale exactly is refused with its reason.

Weights get per-channel magnitudes spread over two decades, so the layers start unbalanced and a
wrong axis, group index or missing bias division shows up in the outputs.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from compiler import compile, ir
from compiler.errors import PassError, TargetError
from compiler.pass_base import PassContext
from compiler.pipeline import run_pipeline
from compiler.targets import TARGETS, PassSpec
from passes import REGISTRY
from passes.quant.cross_layer_equalization import (
    CrossLayerEqualization,
    input_ranges,
    output_ranges,
    upper_bounds,
)
from tests.support import randomize_batch_norm

CONVS = ("aten.conv1d", "aten.conv2d", "aten.linear")


def _spread(model: nn.Module, seed: int = 0) -> nn.Module:
    """Multiply every layer's output channels by factors in [0.1, 10]: unbalanced ranges."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                factor = 10 ** (torch.rand(module.weight.shape[0], generator=generator) * 2 - 1)
                module.weight.mul_(factor.reshape(-1, *(1,) * (module.weight.dim() - 1)))
                if module.bias is not None:
                    module.bias.mul_(factor)
    return model.eval()


class DepthwiseSeparable(nn.Module):
    """stem -> ReLU6 -> expand 1x1 -> ReLU -> depthwise 3x3 -> ReLU -> project 1x1 -> 1x1 head."""

    def __init__(self, activation=nn.ReLU):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), activation())
        self.depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), activation())
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.project(self.depthwise(self.expand(self.stem(x)))))


def _chain(*layers: nn.Module) -> nn.Module:
    return _spread(nn.Sequential(*layers))


PAIRS = {
    "conv-relu-conv": (lambda: _chain(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 3)), (2, 3, 9, 9), "aten.relu"),
    "conv-conv": (lambda: _chain(nn.Conv2d(3, 6, 1), nn.Conv2d(6, 5, 3, padding=1)), (2, 3, 6, 6), "none"),
    "depthwise-conv": (lambda: _chain(nn.Conv2d(6, 6, 3, groups=6), nn.ReLU(), nn.Conv2d(6, 4, 1)),
                       (2, 6, 7, 7), "aten.relu"),
    "conv-depthwise": (lambda: _chain(nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 3, groups=6, bias=False)),
                       (2, 3, 7, 7), "none"),
    "conv-depthwise multiplier 2": (lambda: _chain(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, groups=4)),
                                    (2, 3, 7, 7), "aten.relu"),
    "conv-grouped conv, groups=2": (lambda: _chain(nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 3, groups=2)),
                                    (2, 3, 7, 7), "none"),
    "conv1d-leaky_relu-conv1d": (lambda: _chain(nn.Conv1d(3, 6, 3), nn.LeakyReLU(0.2), nn.Conv1d(6, 4, 3)),
                                 (2, 3, 12), "aten.leaky_relu"),
    "conv-relu-zero pad-conv": (lambda: _chain(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.ZeroPad2d((1, 0, 1, 0)),
                                               nn.Conv2d(6, 4, 2, stride=2)), (2, 3, 7, 7), "aten.relu"),
    "conv-reflection pad-relu-conv": (lambda: _chain(nn.Conv2d(3, 6, 1), nn.ReflectionPad2d(1), nn.ReLU(),
                                                     nn.Conv2d(6, 4, 3)), (2, 3, 7, 7), "aten.relu"),
    "linear-relu-linear on (batch, tokens, features)": (
        lambda: _chain(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)), (2, 4, 5), "aten.relu"),
    "conv without bias-conv": (lambda: _chain(nn.Conv2d(3, 6, 1, bias=False), nn.Conv2d(6, 4, 1)),
                               (2, 3, 5, 5), "none"),
}


def _weight(gm, node) -> torch.Tensor:
    return ir.get_attribute(gm, node.args[1].target)


def _layers(gm):
    return [node for node in ir.call_nodes(gm) if ir.op_name(node) in CONVS]


def test_registered_under_its_file_name():
    assert REGISTRY["cross_layer_equalization"] is CrossLayerEqualization


@pytest.mark.parametrize(("build", "shape", "activation"), PAIRS.values(), ids=PAIRS.keys())
def test_pair_is_balanced_and_outputs_match(capture_gm, run_pass, assert_matches_model, build, shape, activation):
    model = build()
    inputs = (torch.randn(shape),)
    gm = capture_gm(model, inputs)
    first, second = _layers(gm)
    before = (output_ranges(_weight(gm, first)), input_ranges(_weight(gm, second), _groups(second)))

    result = run_pass(CrossLayerEqualization, gm, inputs)

    assert result.modified and result.stats["equalized"] == 1
    (row,) = result.stats["layers"]
    assert (row["first"], row["second"], row["activation"]) == ("0", str(len(model) - 1), activation)
    assert row["imbalance_after"] <= row["imbalance_before"] * (1 + 1e-6)
    assert row["precision_after"] >= row["precision_before"] * (1 - 1e-6)
    ranges1 = output_ranges(_weight(gm, first))
    ranges2 = input_ranges(_weight(gm, second), _groups(second))
    # a lone pair ends exactly balanced: both layers hold sqrt(r1 * r2) on every channel
    torch.testing.assert_close(ranges1, ranges2, rtol=1e-5, atol=0)
    torch.testing.assert_close(ranges1, (before[0] * before[1]).sqrt(), rtol=1e-5, atol=0)
    assert_matches_model(model, result.graph_module, inputs)


def _groups(node) -> int:
    return node.args[6] if len(node.args) > 6 else 1


def test_depthwise_separable_chain_after_batch_norm_folding():
    """Through the pipeline (verified exact by the pass manager) after fold_conv_bn, chains couple."""
    model = _spread(randomize_batch_norm(DepthwiseSeparable()))
    inputs = (torch.randn(2, 3, 8, 8),)
    target = dataclasses.replace(TARGETS["cpu-fp32"], name="fold-cle", pipeline=(
        PassSpec("fold_conv_bn"), PassSpec("cross_layer_equalization", {"iterations": 40})))

    result = run_pipeline(model, target, inputs)

    entry = result.ledger.entries[-1]
    assert entry.name == "cross_layer_equalization" and entry.modified
    pairs = [(row["first"], row["second"]) for row in entry.stats["layers"]]
    assert pairs == [("expand.0", "depthwise.0"), ("depthwise.0", "project.0"), ("project.0", "head")]
    # stem -> ReLU6 -> expand: the stem's input (the image) has no provable bound
    assert entry.stats["refused"]["clip at 6 and no provable bound on the first layer's input"] == 1
    assert entry.drift["max_abs"] < 1e-4
    # iterated to the fixed point, a channel's range is the same in all four layers it crosses
    expand, depthwise, project, head = _layers(result.graph_module)[1:]
    gm = result.graph_module
    torch.testing.assert_close(output_ranges(_weight(gm, expand)), output_ranges(_weight(gm, depthwise)), rtol=1e-3,
                               atol=0)
    torch.testing.assert_close(output_ranges(_weight(gm, depthwise)), input_ranges(_weight(gm, project), 1),
                               rtol=1e-3, atol=0)
    torch.testing.assert_close(output_ranges(_weight(gm, project)), input_ranges(_weight(gm, head), 1), rtol=1e-3,
                               atol=0)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs)[0], model(*inputs), rtol=1e-4, atol=1e-4)


class BoundedClip(nn.Module):
    """ReLU6 -> conv A -> ReLU6 -> conv B: A's input lies in [0, 6], so A's channel bounds are provable.

    Channels 0-2 of A have small weights (the clip after A can never be reached), channels 3-5
    large ones (it is reached).
    """

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 6, 1)
        self.second = nn.Conv2d(6, 4, 1)
        with torch.no_grad():
            self.first.weight.copy_(torch.rand(6, 3, 1, 1) * 0.1)
            self.first.weight[3:] *= 100
            self.first.bias.copy_(torch.rand(6) * 0.1)
            self.second.weight.copy_(torch.rand(4, 6, 1, 1) * 5 + 0.5)

    def forward(self, x):
        return self.second(torch.clamp(self.first(torch.clamp(x, 0, 6)), 0, 6))


def test_clip_scales_only_channels_it_provably_cannot_reach(capture_gm, run_pass, assert_matches_model):
    model = BoundedClip().eval()
    inputs = (torch.randn(2, 3, 5, 5),)
    gm = capture_gm(model, inputs)
    first, second = _layers(gm)
    bounds = upper_bounds(model.first.weight, model.first.bias, 0.0, 6.0)
    assert torch.all(bounds[:3] <= 6) and torch.all(bounds[3:] > 6)
    old_weight = model.first.weight.detach().double()

    result = run_pass(CrossLayerEqualization, gm, inputs)

    (row,) = result.stats["layers"]
    assert row["activation"] == "aten.clamp(0, 6)" and row["scaled_channels"] == 3
    scale = old_weight.reshape(6, -1)[:, 0] / _weight(gm, first).double().reshape(6, -1)[:, 0]
    torch.testing.assert_close(scale[3:], torch.ones(3, dtype=torch.float64))  # clip reachable: untouched
    assert torch.all(scale[:3] >= bounds[:3].double() / 6 - 1e-6)  # the new bound stays below the clip
    assert_matches_model(model, result.graph_module, inputs)
    # inputs far beyond 6 saturate the first clip, so every channel of A reaches its bound: both
    # clips are active, and a scale below bound / 6 (or any scale on channels 3-5) would show
    large = (torch.rand(5, 3, 5, 5) * 100,)
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(*large)[0], model(*large), rtol=1e-4, atol=1e-4)


def test_clip_without_a_bounded_input_is_left_alone(capture_gm, run_pass, assert_untouched):
    model = _chain(nn.Conv2d(3, 6, 1), nn.ReLU6(), nn.Conv2d(6, 4, 1))
    inputs = (torch.randn(2, 3, 5, 5),)
    gm = capture_gm(model, inputs)
    fingerprint = ir.fingerprint(gm)

    result = run_pass(CrossLayerEqualization, gm, inputs)

    assert_untouched(result, fingerprint)
    assert result.stats["refused"]["clip at 6 and no provable bound on the first layer's input"] == 1


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.first(x)
        return self.second(y) + y


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


REFUSED = {
    "several readers (residual)": (Residual, "output has 2 readers"),
    "tied weights": (Tied, "weight is not a constant of its own"),
    "hardtanh(-1, 1)": (lambda: nn.Sequential(nn.Conv2d(4, 4, 1), nn.Hardtanh(), nn.Conv2d(4, 4, 1)),
                        "clip with lower bound -1 does not commute with scaling"),
    "sigmoid between": (lambda: nn.Sequential(nn.Conv2d(4, 4, 1), nn.Sigmoid(), nn.Conv2d(4, 4, 1)),
                        "output read by aten.sigmoid"),
    "two activations": (lambda: nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.ReLU(), nn.Conv2d(4, 4, 1)),
                        "output read by aten.relu"),
    "pad with value 1": (lambda: nn.Sequential(nn.Conv2d(4, 4, 1), nn.ConstantPad2d(1, 1.0), nn.Conv2d(4, 4, 1)),
                         "pad with a non-zero value or over the channels"),
    "pad over the channels": (
        lambda: nn.Sequential(nn.Conv2d(4, 4, 1), nn.ZeroPad3d((0, 0, 0, 0, 1, 0)), nn.Conv2d(5, 4, 1)),
        "pad with a non-zero value or over the channels"),
}


@pytest.mark.parametrize(("build", "reason"), REFUSED.values(), ids=REFUSED.keys())
def test_inexact_pairs_are_refused_with_their_reason(capture_gm, run_pass, assert_untouched, build, reason):
    model = _spread(build())
    inputs = (torch.randn(2, 4, 5, 5),)
    gm = capture_gm(model, inputs)
    fingerprint = ir.fingerprint(gm)

    result = run_pass(CrossLayerEqualization, gm, inputs)

    assert_untouched(result, fingerprint)
    assert result.stats["equalized"] == 0 and result.stats["layers"] == []
    assert reason in result.stats["refused"]


def test_scale_limits_bound_the_accumulated_scale(capture_gm, run_pass, assert_matches_model):
    model = PAIRS["conv-relu-conv"][0]()
    inputs = (torch.randn(2, 3, 9, 9),)
    result = run_pass(CrossLayerEqualization, capture_gm(model, inputs), inputs, min_scale=0.5, max_scale=2.0)
    (row,) = result.stats["layers"]
    assert 0.5 - 1e-9 <= row["min_scale"] and row["max_scale"] <= 2.0 + 1e-9
    assert_matches_model(model, result.graph_module, inputs)


@pytest.mark.parametrize(("options", "error"), [
    ({"iterations": 0}, PassError), ({"min_scale": 2.0}, PassError), ({"max_scale": 0.5}, PassError),
    ({"alpha": 0.5}, TargetError),
])
def test_bad_options_are_refused(capture_gm, options, error):
    inputs = (torch.randn(2, 3, 9, 9),)
    gm = capture_gm(PAIRS["conv-relu-conv"][0](), inputs)
    with pytest.raises(error, match=next(iter(options))):
        CrossLayerEqualization(**options)(gm, PassContext(inputs, inputs))


def test_runs_before_calibrate_in_an_int8_pipeline():
    model = _spread(randomize_batch_norm(DepthwiseSeparable()))
    base = TARGETS["cpu-int8"]
    pipeline = []
    for spec in base.pipeline:
        pipeline += [PassSpec("cross_layer_equalization")] * (spec.name == "calibrate") + [spec]
    target = dataclasses.replace(base, name="cpu-int8-cle", pipeline=tuple(pipeline))
    data = torch.rand(16, 3, 8, 8) * 2 - 1

    compiled = compile(model, target, data[:1], calibration_data=[data])

    names = [entry.name for entry in compiled.report.entries]
    assert names.index("cross_layer_equalization") == names.index("calibrate") - 1
    entry = compiled.report.entries[names.index("cross_layer_equalization")]
    assert entry.modified and entry.stats["equalized"] == 3
    assert all(math.isfinite(row["max_scale"]) for row in entry.stats["layers"])
    with torch.no_grad():
        reference = model(data)
    cosine = torch.nn.functional.cosine_similarity(compiled.simulate(data).flatten(1), reference.flatten(1)).min()
    assert cosine > 0.99
