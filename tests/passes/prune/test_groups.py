"""Coupled channel groups on real and toy graphs: who is coupled, and why a group is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from compiler import probe
from compiler.capture import capture
from compiler.pipeline import run_pipeline
from passes.prune.groups import channel_groups


def zoo_groups(name: str):
    entry = models.load(name)
    return channel_groups(run_pipeline(entry.model, "cpu-fp32", entry.example_inputs).graph_module)


def toy_groups(model: nn.Module, *inputs: torch.Tensor):
    gm = capture(model.eval(), inputs).graph_module
    probe.run_annotated(gm, inputs)
    return channel_groups(gm)


def members(group) -> set[tuple[str, str]]:
    return {(member.module_path, member.role) for member in group.members}


def group_with(groups, module_path: str, role: str):
    (found,) = [group for group in groups if (module_path, role) in members(group)]
    return found


@pytest.fixture(scope="module")
def resnet18():
    return zoo_groups("resnet18")


def test_resnet18_couples_each_stage_through_its_residual_adds(resnet18):
    assert sum(group.prunable for group in resnet18) == 12  # 8 inner block widths, 4 stage widths
    stage = group_with(resnet18, "layer2.0.conv2", "out")
    assert stage.prunable and stage.channels == 128
    assert members(stage) == {
        ("layer2.0.conv2", "out"), ("layer2.0.downsample.0", "out"), ("layer2.1.conv2", "out"),
        ("layer2.1.conv1", "in"), ("layer3.0.conv1", "in"), ("layer3.0.downsample.0", "in"),
    }
    inner = group_with(resnet18, "layer2.0.conv1", "out")
    assert members(inner) == {("layer2.0.conv1", "out"), ("layer2.0.conv2", "in")}


def test_the_interface_is_refused_with_reasons(resnet18):
    head = group_with(resnet18, "fc", "out")
    assert not head.prunable and head.refusals == ["graph output 'linear': the model's interface keeps its width"]
    last_stage = group_with(resnet18, "fc", "in")
    assert last_stage.prunable and last_stage.channels == 512  # pooled and flattened: one column per channel
    assert [member.per_channel for member in last_stage.members if member.module_path == "fc"] == [1]


def test_efficientnet_depthwise_convs_tie_their_input_to_their_output():
    groups = zoo_groups("efficientnet-lite0")
    block = group_with(groups, "_blocks.1._depthwise_conv", "depthwise")
    assert block.prunable and block.channels == 96
    assert members(block) == {("_blocks.1._expand_conv", "out"), ("_blocks.1._depthwise_conv", "depthwise"),
                              ("_blocks.1._project_conv", "in")}
    assert sum(group.prunable for group in groups) == 24
    assert all("sym_size" not in reason for group in groups for reason in group.refusals)


def test_minilm_ffn_neurons_and_attention_heads_are_groups_and_the_hidden_size_is_refused():
    groups = zoo_groups("minilm-l6")
    ffn = [group for group in groups if group.prunable and group.unit == 1]
    assert len(ffn) == 6 and {group.channels for group in ffn} == {1536}
    assert members(ffn[0]) == {("bert.encoder.layer.0.intermediate.dense", "out"),
                               ("bert.encoder.layer.0.output.dense", "in")}
    heads = [group for group in groups if group.prunable and group.unit != 1]
    assert len(heads) == 6 and {(group.channels, group.unit) for group in heads} == {(12, 32)}
    # the captured BERT splits with view(batch, length, -1, 32) and merges with reshape(batch, length, -1):
    # no literal head count to rewrite, so no split or merge members
    layer = "bert.encoder.layer.3.attention"
    assert members(heads[3]) == {(f"{layer}.self.query", "out"), (f"{layer}.self.key", "out"),
                                 (f"{layer}.self.value", "out"), (f"{layer}.self", "attention"),
                                 (f"{layer}.output.dense", "in")}
    assert {m.per_channel for m in heads[3].members if m.role in ("out", "in")} == {32}
    hidden = group_with(groups, "bert.encoder.layer.0.output.dense", "out")
    assert not hidden.prunable and any("layer_norm" in reason for reason in hidden.refusals)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.join = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.join(torch.cat([self.left(x), self.right(x)], dim=1))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.grouped, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.grouped(self.stem(x)))


class FlattenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 3 * 3, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.reduce, self.expand = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        scale = torch.sigmoid(self.expand(torch.relu(self.reduce(y.mean((2, 3), keepdim=True)))))
        return self.head(y * scale)


def test_a_concat_is_refused_naming_it():
    torch.manual_seed(0)
    groups = toy_groups(Concat(), torch.randn(2, 3, 6, 6))
    left = group_with(groups, "left", "out")
    assert not left.prunable and any(reason.startswith("aten.cat in module") for reason in left.refusals)


def test_a_grouped_conv_is_refused_naming_it():
    torch.manual_seed(0)
    groups = toy_groups(Grouped(), torch.randn(2, 3, 8, 8))
    stem = group_with(groups, "stem", "out")
    assert stem.refusals == ["grouped conv (groups=2) in module 'grouped'"]
    after = group_with(groups, "head", "in")
    assert not after.prunable and "grouped conv (groups=2) in module 'grouped'" in after.refusals


def test_a_flatten_into_a_linear_reads_one_block_of_columns_per_channel():
    torch.manual_seed(0)
    groups = toy_groups(FlattenHead(), torch.randn(2, 1, 5, 5))
    conv = group_with(groups, "conv", "out")
    assert conv.prunable and conv.channels == 4
    assert [(m.module_path, m.per_channel) for m in conv.members if m.role == "in"] == [("fc", 9)]


def test_a_squeeze_excite_scale_is_coupled_with_the_tensor_it_scales():
    torch.manual_seed(0)
    groups = toy_groups(SqueezeExcite(), torch.randn(2, 3, 8, 8))
    scaled = group_with(groups, "conv", "out")
    assert scaled.prunable
    assert members(scaled) == {("conv", "out"), ("expand", "out"), ("reduce", "in"), ("head", "in")}


def test_every_out_member_writes_as_many_channels_as_its_group_has(resnet18):
    entry = models.load("resnet18")
    gm = run_pipeline(entry.model, "cpu-fp32", entry.example_inputs).graph_module
    weights = {node.name: node.args[1] for node in gm.graph.nodes if str(node.target) == "aten.conv2d.default"}
    for group in channel_groups(gm):
        for member in group.members:
            if member.role == "out" and member.node in weights:
                assert weights[member.node].meta["val"].shape[0] == group.channels
