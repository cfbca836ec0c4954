"""Feature points for distillation: which student tensors are matched to which teacher tensors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from compiler import TARGETS, PassSpec, ir
from compiler.capture import capture
from compiler.errors import PassError
from compiler.pipeline import run_pipeline
from passes.recovery.features import _outputs_at, feature_points
from tests.support import randomize_batch_norm


class InvertedResidual(nn.Module):
    """Stem, an expand-depthwise-project block with a residual add, pooling and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(16, 64, 1), nn.BatchNorm2d(64), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.BatchNorm2d(64), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(64, 16, 1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        y = self.stem(x)
        y = y + self.project(self.depthwise(self.expand(y)))
        return self.head(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


@pytest.fixture(scope="module")
def pruned():
    """(student after BN folding and pruning, teacher as captured, samples)."""
    torch.manual_seed(0)
    model = randomize_batch_norm(InvertedResidual()).eval()
    samples = torch.randn(32, 3, 12, 12)
    cut = PassSpec("prune_channels", {"macs": 0.4, "round_to": 1, "reconstruct": False, "importance": "l1"})
    base = TARGETS["cpu-fp32"]
    target = dataclasses.replace(base, name="pruned", pipeline=(*base.pipeline, cut, PassSpec("eliminate_dead_code")))
    result = run_pipeline(model, target, samples[:1], calibration_data=[(samples,)])
    teacher = capture(model, (samples[:1],)).graph_module
    return result.graph_module, teacher, samples


def _values(gm, names, samples):
    with torch.no_grad():
        return dict(zip(names, _outputs_at(gm, names)(samples)[1], strict=True))


def test_points_are_block_boundaries_sliced_to_the_channels_pruning_kept(pruned):
    student, teacher, samples = pruned
    points = feature_points(student, teacher, (samples[:2],), count=8, budget_bytes=1e9, samples=32)
    nodes = {node.name: node for node in student.graph.nodes}
    assert points and all(ir.op_name(nodes[point.node]) in ("aten.hardtanh", "aten.add") for point in points)
    sliced = [point for point in points if point.index is not None]
    assert sliced, "the expand block was pruned, so some point must hold a subset of the teacher's channels"
    mine = _values(student, [point.node for point in points], samples)
    theirs = _values(teacher, [point.node for point in points], samples)
    for point in points:
        assert point.teacher_view(theirs[point.node]).shape == mine[point.node].shape
    # The stem reads no cut channel: its kept channels are the teacher's own, exactly (BN folding is exact).
    first = sliced[0]
    assert ir.module_path(nodes[first.node]).startswith("stem")
    torch.testing.assert_close(mine[first.node], first.teacher_view(theirs[first.node]), rtol=1e-4, atol=1e-5)
    # Downstream the values differ (the expand conv lost input channels) but stay nearer the teacher than zero.
    assert not torch.allclose(mine[sliced[-1].node], sliced[-1].teacher_view(theirs[sliced[-1].node]), atol=1e-3)


def test_a_pair_that_only_shares_a_name_is_dropped():
    """After BatchNorm folding the student's ``conv2d`` is the teacher's ``batch_norm``, not its ``conv2d``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                          nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # far from the identity, so the pairs differ clearly
            module.running_mean.uniform_(2, 3)
            module.running_var.uniform_(0.05, 0.1)
    model.eval()
    samples = torch.randn(8, 3, 12, 12)
    student = run_pipeline(model, "cpu-fp32", samples[:1]).graph_module
    teacher = capture(model, (samples[:1],)).graph_module
    assert [ir.op_name(node) for node in student.graph.nodes].count("aten.batch_norm") == 0
    assert feature_points(student, teacher, (samples[:2],), count=8, budget_bytes=1e9, samples=8) == []


def test_the_memory_budget_drops_the_earliest_points(pruned):
    student, teacher, samples = pruned
    every = feature_points(student, teacher, (samples[:2],), count=8, budget_bytes=1e9, samples=32)
    last = _values(student, [every[-1].node], samples)[every[-1].node]
    budget = last[0].numel() * last.element_size() * 32
    assert feature_points(student, teacher, (samples[:2],), count=8, budget_bytes=budget, samples=32) == every[-1:]
    assert feature_points(student, teacher, (samples[:2],), count=0, budget_bytes=1e9, samples=32) == []


@pytest.mark.parametrize("features", [-1, 1.5, True])
def test_a_bad_feature_count_is_a_pass_error(features):
    base = TARGETS["cpu-fp32"]
    recover = PassSpec("recover", {"features": features})
    target = dataclasses.replace(base, name="bad", pipeline=(*base.pipeline, recover))
    with pytest.raises(PassError, match="features"):
        run_pipeline(InvertedResidual().eval(), target, torch.randn(1, 3, 8, 8),
                     calibration_data=[(torch.randn(8, 3, 8, 8),)])
