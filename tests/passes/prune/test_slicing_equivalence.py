"""Cutting channels is exactly zeroing them: for every prunable group of the zoo's models, the IR with
half the channels cut computes what the unpruned IR computes with those channels' writers zeroed
(weights and biases of every ``out`` and ``depthwise`` member; for attention heads, each head's block
of Q, K and V rows: with its V rows and bias zero a head contributes exactly 0), on real inputs."""

from __future__ import annotations

import copy

import pytest
import torch

import models
from compiler import ir, probe
from compiler.pipeline import run_pipeline
from passes.prune.groups import channel_groups
from passes.prune.slicing import features, keep_channels


def zeroed(gm, group, drop: torch.Tensor):
    masked = copy.deepcopy(gm)
    nodes = {node.name: node for node in masked.graph.nodes}
    for member in group.members:
        if member.role not in ("out", "depthwise", "norm"):
            continue
        node = nodes[member.node]
        for argument in node.args[1:3]:
            if argument is not None:
                tensor = ir.get_attribute(masked, argument.target).clone()
                tensor[features(drop, member.per_channel)] = 0
                ir.set_attribute(masked, argument.target, tensor)
    return masked


@pytest.mark.parametrize("name", ["digits-cnn", "resnet18", "mobilenet-v2", "efficientnet-lite0", "minilm-l6"])
def test_every_group_cut_equals_the_same_channels_zeroed(name):
    zoo = models.load(name)
    gm = run_pipeline(zoo.model, "cpu-fp32", zoo.example_inputs).graph_module
    inputs = tuple(zoo.eval_data(2))
    probe.run_annotated(gm, inputs)
    groups = [group for group in channel_groups(gm) if group.prunable]
    assert groups
    assert any(group.unit > 1 for group in groups) == (name == "minilm-l6")  # attention heads
    for group in groups:
        keep, drop = torch.arange(0, group.channels, 2), torch.arange(1, group.channels, 2)
        pruned = copy.deepcopy(gm)
        keep_channels(pruned, group, keep)
        pruned.recompile()
        with torch.no_grad():
            expected, actual = zeroed(gm, group, drop)(*inputs)[0], pruned(*inputs)[0]
        scale = float(expected.abs().max())
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * max(1.0, scale),
                                   msg=lambda text, g=group: f"{g.members[0].module_path}: {text}")
