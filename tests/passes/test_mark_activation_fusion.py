"""mark_activation_fusion: conv/linear + activation pairs are annotated as fusion groups in
``node.meta``; the graph itself never changes, so the pass always reports ``modified=False``."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compiler import ir, meta
from compiler.errors import PassError, TargetError
from compiler.pass_base import PassContext
from passes import REGISTRY
from passes.fusion.fold_conv_bn import FoldConvBatchNorm
from passes.fusion.mark_activation_fusion import ANCHORS, MarkActivationFusion

IMAGES = (torch.randn(2, 3, 6, 6),)
VECTORS = (torch.randn(2, 6),)


class Then(nn.Module):
    """``activation(anchor(x))`` with the activation given as a module or a function."""

    def __init__(self, anchor: nn.Module, activation):
        super().__init__()
        self.anchor = anchor
        self.activation = activation

    def forward(self, x):
        return self.activation(self.anchor(x))


ACTIVATIONS = {
    "nn.ReLU": (nn.ReLU(), "relu"),
    "nn.ReLU(inplace=True)": (nn.ReLU(inplace=True), "relu"),
    "nn.ReLU6": (nn.ReLU6(), "relu6"),
    "F.relu6": (F.relu6, "relu6"),
    "clamp(0, 6)": (lambda x: torch.clamp(x, 0, 6), "relu6"),
    "nn.Hardtanh(-2, 2)": (nn.Hardtanh(-2.0, 2.0), "clip"),
    "F.hardtanh default": (F.hardtanh, "clip"),
    "clamp(min=0)": (lambda x: torch.clamp(x, min=0.0), "clip"),
    "nn.SiLU": (nn.SiLU(), "silu"),
    "nn.GELU": (nn.GELU(), "gelu"),
    "nn.GELU(tanh)": (nn.GELU(approximate="tanh"), "gelu"),
    "nn.Hardswish": (nn.Hardswish(), "hardswish"),
}

ANCHOR_MODULES = {
    "conv2d": (lambda: nn.Conv2d(3, 4, 3), IMAGES),
    "linear": (lambda: nn.Linear(6, 4), VECTORS),
}


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class SharedConvOutput(nn.Module):
    """The conv feeds a ReLU and a residual add: a fused kernel could not give the add its input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(y) + y


def _marked(gm):
    return {node.name: {key: node.meta[key] for key in (meta.FUSION_GROUP, meta.FUSION_ROLE,
                                                        meta.FUSED_ACTIVATION) if key in node.meta}
            for node in gm.graph.nodes if meta.FUSION_ROLE in node.meta}


def test_registered_under_its_file_name():
    assert REGISTRY["mark_activation_fusion"] is MarkActivationFusion


def test_outputs_and_graph_are_unchanged(capture_gm, run_pass, assert_matches_model, assert_untouched):
    model = Then(nn.Conv2d(3, 4, 3), nn.ReLU6()).eval()
    gm = capture_gm(model, IMAGES)
    before = ir.fingerprint(gm)
    result = run_pass(MarkActivationFusion, gm, IMAGES)
    assert result.stats["groups"] == 1
    assert_untouched(result, before)  # metadata only: modified=False is honest
    assert_matches_model(model, result.graph_module, IMAGES)


@pytest.mark.parametrize(("anchor", "inputs"), ANCHOR_MODULES.values(), ids=ANCHOR_MODULES.keys())
@pytest.mark.parametrize(("activation", "kind"), ACTIVATIONS.values(), ids=ACTIVATIONS.keys())
def test_marks_each_activation(capture_gm, run_pass, anchor, inputs, activation, kind):
    gm = capture_gm(Then(anchor(), activation), inputs)
    result = run_pass(MarkActivationFusion, gm, inputs)

    assert result.modified is False
    assert result.stats == {"groups": 1, "by_activation": {kind: 1}, "refused": {}}
    (anchor_node,) = [node for node in ir.call_nodes(gm) if node.target in ANCHORS]
    (activation_node,) = anchor_node.users
    assert _marked(result.graph_module) == {
        anchor_node.name: {meta.FUSION_GROUP: anchor_node.name, meta.FUSION_ROLE: "anchor",
                           meta.FUSED_ACTIVATION: kind},
        activation_node.name: {meta.FUSION_GROUP: anchor_node.name,
                               meta.FUSION_ROLE: "activation"},
    }


@pytest.mark.parametrize(("model", "refused"), [
    (SharedConvOutput(), {"anchor output has several users": 1}),
    (ConvBnRelu(), {"no activation follows": 1}),
    (Then(nn.Conv2d(3, 4, 3), nn.Sigmoid()), {"no activation follows": 1}),
    (Then(nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.1)), {"no activation follows": 1}),
], ids=["conv output with several users", "BatchNorm in between", "sigmoid", "leaky relu"])
def test_refuses_with_a_reason_and_marks_nothing(
    capture_gm, run_pass, assert_matches_model, assert_untouched, model, refused
):
    model = model.eval()
    gm = capture_gm(model, IMAGES)
    before = ir.fingerprint(gm)
    result = run_pass(MarkActivationFusion, gm, IMAGES)
    assert_untouched(result, before)
    assert result.stats == {"groups": 0, "by_activation": {}, "refused": refused}
    assert _marked(result.graph_module) == {}
    assert_matches_model(model, result.graph_module, IMAGES)


def test_no_anchor_finds_nothing(capture_gm, run_pass, assert_untouched):
    gm = capture_gm(Then(nn.Identity(), nn.ReLU()), IMAGES)
    before = ir.fingerprint(gm)
    result = run_pass(MarkActivationFusion, gm, IMAGES)
    assert_untouched(result, before)
    assert result.stats == {"groups": 0, "by_activation": {}, "refused": {}}
    assert _marked(result.graph_module) == {}


def test_groups_appear_once_batch_norm_is_folded(capture_gm, run_pass):
    gm = capture_gm(ConvBnRelu(), IMAGES)
    assert run_pass(MarkActivationFusion, gm, IMAGES).stats["groups"] == 0
    gm = run_pass(FoldConvBatchNorm, gm, IMAGES).graph_module
    result = run_pass(MarkActivationFusion, gm, IMAGES)
    assert result.stats["by_activation"] == {"relu": 1}


def test_marks_every_pair_of_a_network(capture_gm, run_pass):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU6(), nn.Conv2d(4, 4, 1), nn.Hardswish(), nn.Flatten(),
        nn.Linear(64, 8), nn.GELU(), nn.Linear(8, 2),
    )
    result = run_pass(MarkActivationFusion, capture_gm(model, IMAGES), IMAGES)
    assert result.stats == {
        "groups": 3, "by_activation": {"gelu": 1, "hardswish": 1, "relu6": 1},
        "refused": {"no activation follows": 1},
    }


def test_postcondition_catches_a_mark_without_its_anchor(capture_gm, run_pass):
    gm = run_pass(MarkActivationFusion, capture_gm(Then(nn.Linear(6, 4), nn.ReLU()), VECTORS),
                  VECTORS).graph_module
    MarkActivationFusion().ensures(gm)  # consistent marks: accepted
    anchor = next(node for node in gm.graph.nodes if node.target in ANCHORS)
    del anchor.meta[meta.FUSION_GROUP]
    with pytest.raises(PassError, match="relu.*marked but its input is not its anchor"):
        MarkActivationFusion().ensures(gm)


def test_refuses_a_non_graph_module():
    with pytest.raises(PassError, match="mark_activation_fusion.*GraphModule.*ReLU"):
        MarkActivationFusion()(nn.ReLU(), PassContext(IMAGES, IMAGES))


def test_refuses_unknown_options():
    with pytest.raises(TargetError, match="mark_activation_fusion.*no option.*activations"):
        MarkActivationFusion(activations=["relu"])


def test_pass_manager_accepts_it(run_in_manager):
    gm, ledger = run_in_manager(MarkActivationFusion(), Then(nn.Conv2d(3, 4, 3), nn.SiLU()), IMAGES)
    entry = ledger.entry("mark_activation_fusion")
    assert entry.modified is False
    assert entry.op_delta == {}
    assert entry.stats["by_activation"] == {"silu": 1}
    assert _marked(gm)  # the annotations survive the manager's checks
