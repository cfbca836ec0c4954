"""IR helpers: op histogram, MACs against hand-computed values, parameter count, fingerprint."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from compiler import ir, meta, probe
from compiler.capture import capture


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.bn1(self.conv1(x)).relu()
        x = self.bn2(self.conv2(x)).relu()
        return self.head(x.mean((2, 3)))


class MacZoo(nn.Module):
    """One of each operator with a MAC formula, on shapes small enough to count by hand."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(4, 8, 3, groups=2)  # 4x6x6 -> 8x4x4
        self.strided = nn.Conv2d(8, 6, 2, stride=2, bias=False)  # 8x4x4 -> 6x2x2
        self.linear = nn.Linear(6, 5)
        self.register_buffer("projection", torch.randn(5, 7))

    def forward(self, x):
        y = self.strided(self.grouped(x))  # (N, 6, 2, 2)
        tokens = y.flatten(2).transpose(1, 2)  # (N, 4, 6)
        return torch.matmul(self.linear(tokens), self.projection)  # (N, 4, 7)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 4, bias=False)
        self.decoder = nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight

    def forward(self, x):
        return self.decoder(self.encoder(x).relu())


def captured(model: nn.Module, *inputs: torch.Tensor):
    torch.manual_seed(0)
    gm = capture(model.eval(), inputs).graph_module
    probe.run_annotated(gm, inputs)
    return gm


def macs_by_op(gm) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for node in ir.call_nodes(gm):
        found.setdefault(ir.op_name(node), []).append(node.meta[meta.MACS])
    return found


@pytest.fixture(scope="module")
def cnn_gm():
    torch.manual_seed(0)
    return captured(SmallCNN(), torch.randn(2, 3, 8, 8))


def test_op_histogram_counts_every_operator(cnn_gm):
    assert dict(ir.op_histogram(cnn_gm)) == {
        "aten.conv2d": 2, "aten.batch_norm": 2, "aten.relu": 2, "aten.mean": 1, "aten.linear": 1,
    }


def test_conv_and_linear_macs_match_hand_computed_values(cnn_gm):
    found = macs_by_op(cnn_gm)
    # output elements x (in_channels / groups x kernel area)
    assert found["aten.conv2d"] == [2 * 8 * 8 * 8 * (3 * 3 * 3), 2 * 8 * 8 * 8 * (8 * 3 * 3)]
    assert found["aten.linear"] == [2 * 5 * 8]
    assert found["aten.relu"] == [0, 0] and found["aten.batch_norm"] == [0, 0]
    assert probe.total_macs(cnn_gm) == 27648 + 73728 + 80


def test_grouped_strided_conv_and_batched_linear_and_matmul_macs():
    torch.manual_seed(0)
    gm = captured(MacZoo(), torch.randn(3, 4, 6, 6))
    found = macs_by_op(gm)
    grouped = 3 * 8 * 4 * 4 * (2 * 3 * 3)  # groups=2: 2 input channels per output channel
    strided = 3 * 6 * 2 * 2 * (8 * 2 * 2)
    assert sorted(found["aten.conv2d"]) == sorted([grouped, strided])
    assert found["aten.linear"] == [3 * 4 * 5 * 6]
    assert found["aten.matmul"] == [3 * 4 * 7 * 5]
    assert probe.total_macs(gm) == grouped + strided + 3 * 4 * 5 * 6 + 3 * 4 * 7 * 5


def test_macs_follow_the_probe_batch(cnn_gm):
    gm = captured(SmallCNN(), torch.randn(5, 3, 8, 8))
    assert probe.total_macs(gm) == probe.total_macs(cnn_gm) // 2 * 5


def test_parameter_count_counts_float_tensors_the_graph_reads(cnn_gm):
    convs = (8 * 3 * 9 + 8) + (8 * 8 * 9 + 8)
    batch_norms = 2 * 4 * 8  # weight, bias, running mean and variance (not num_batches_tracked)
    assert ir.parameter_count(cnn_gm) == convs + batch_norms + 8 * 5 + 5


def test_parameter_count_counts_tied_weights_once():
    gm = captured(Tied(), torch.randn(2, 4))
    assert ir.parameter_count(gm) == 16 + 4
    linears = [node for node in ir.call_nodes(gm) if ir.op_name(node) == "aten.linear"]
    assert [node.meta[meta.PARAMS] for node in linears] == [16, 16 + 4]


def test_fingerprint_is_stable_without_changes(cnn_gm):
    assert ir.fingerprint(cnn_gm) == ir.fingerprint(cnn_gm)


def test_fingerprint_changes_on_in_place_weight_edit():
    gm = captured(SmallCNN(), torch.randn(2, 3, 8, 8))
    before = ir.fingerprint(gm)
    with torch.no_grad():
        gm.get_submodule("conv2").weight.mul_(1.0)  # values equal, but written in place
    after_edit = ir.fingerprint(gm)
    assert after_edit != before
    with torch.no_grad():
        gm.get_submodule("conv2").weight = nn.Parameter(gm.get_submodule("conv2").weight.clone())
    assert ir.fingerprint(gm) not in (before, after_edit)


def test_fingerprint_changes_on_graph_edit():
    gm = captured(SmallCNN(), torch.randn(2, 3, 8, 8))
    before = ir.fingerprint(gm)
    relu = next(node for node in ir.call_nodes(gm) if ir.op_name(node) == "aten.relu")
    with gm.graph.inserting_after(relu):
        doubled = gm.graph.call_function(torch.ops.aten.relu.default, (relu,))
    relu.replace_all_uses_with(doubled, delete_user_cb=lambda user: user is not doubled)
    assert ir.fingerprint(gm) != before
