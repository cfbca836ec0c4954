"""Targets are data: every name resolves, unknown names and options are refused, replace() works."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn as nn

import backends
import passes
from compiler import TARGETS, PassSpec, Target, TargetError, compile, inspect
from compiler.pass_base import Pass
from compiler.pipeline import build_passes
from compiler.targets import get_target


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).relu().mean((2, 3)))


def small_net() -> nn.Module:
    torch.manual_seed(0)
    model = SmallNet().eval()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2.0)
    return model


def test_there_is_at_least_one_target():
    assert "cpu-fp32" in TARGETS


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_pass_and_backend_of_every_target_exists(name):
    target = TARGETS[name]
    assert target.name == name
    assert target.pipeline, "a target with no passes"
    for spec in target.pipeline:
        assert spec.name in passes.REGISTRY, f"{name}: unknown pass {spec.name!r}"
        pass_class = passes.REGISTRY[spec.name]
        assert issubclass(pass_class, Pass) and pass_class.name == spec.name
        assert set(spec.options) <= set(pass_class.default_options), spec.name
    assert target.backend in backends.REGISTRY
    backend_class = backends.REGISTRY[target.backend]
    assert set(target.backend_options) <= set(backend_class.default_options)
    backend_class(**dict(target.backend_options))  # the options are accepted
    assert [p.name for p in build_passes(target)] == [spec.name for spec in target.pipeline]


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_targets_serialise_to_json(name):
    data = json.loads(json.dumps(TARGETS[name].to_dict()))
    assert [spec["name"] for spec in data["pipeline"]] == [s.name for s in TARGETS[name].pipeline]


def test_registry_names_equal_the_pass_file_names():
    for name, pass_class in passes.REGISTRY.items():
        assert pass_class.__module__.rsplit(".", 1)[-1] == name


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(TargetError) as raised:
        compile(small_net(), target="tpu-int3", example_inputs=(torch.randn(2, 3, 8, 8),))
    message = str(raised.value)
    assert "'tpu-int3'" in message
    for name in TARGETS:
        assert name in message
    assert raised.value.exit_code == 2


def test_get_target_passes_a_target_through():
    target = TARGETS["cpu-fp32"]
    assert get_target(target) is target
    assert get_target("cpu-fp32") is target


def test_unknown_pass_option_is_refused():
    target = dataclasses.replace(
        TARGETS["cpu-fp32"], name="bad-option",
        pipeline=(PassSpec("remove_noops"), PassSpec("fold_conv_bn", {"aggressiveness": 11})),
    )
    with pytest.raises(TargetError, match=r"'fold_conv_bn' has no option\(s\) aggressiveness"):
        inspect(small_net(), target=target, example_inputs=(torch.randn(2, 3, 8, 8),))


def test_unknown_pass_is_refused_with_the_known_passes():
    target = dataclasses.replace(TARGETS["cpu-fp32"], name="bad-pass", pipeline=(PassSpec("magic"),))
    with pytest.raises(TargetError) as raised:
        inspect(small_net(), target=target, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert "'magic'" in str(raised.value)
    assert all(name in str(raised.value) for name in passes.REGISTRY)


def test_unknown_backend_option_is_refused():
    target = dataclasses.replace(TARGETS["cpu-fp32"], backend_options={"turbo": True})
    with pytest.raises(TargetError, match="turbo"):
        compile(small_net(), target=target, example_inputs=(torch.randn(2, 3, 8, 8),))


def test_target_with_a_shorter_pipeline_compiles():
    target = dataclasses.replace(
        TARGETS["cpu-fp32"], name="cpu-fp32-fold-only", pipeline=(PassSpec("fold_conv_bn"),)
    )
    assert isinstance(target, Target) and TARGETS["cpu-fp32"].pipeline != target.pipeline
    model = small_net()
    compiled = compile(model, target=target, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert [entry.name for entry in compiled.report.entries] == ["fold_conv_bn"]
    assert compiled.report.target == "cpu-fp32-fold-only"
    assert compiled.manifest["target"]["pipeline"] == [{"name": "fold_conv_bn", "options": {}}]
    assert compiled.report.entry("fold_conv_bn").op_delta == {"aten.batch_norm": -1}
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-3, atol=1e-5)


def test_with_float_layers_sets_the_policy_and_refuses_a_target_that_does_not_quantise():
    from compiler.targets import with_float_layers

    target = with_float_layers("cpu-int8", ["stem.*"], 3)
    assert target.quant_policy["float_modules"] == ["stem.*"] and target.quant_policy["float_prefix"] == 3
    assert with_float_layers("cpu-int8") is get_target("cpu-int8")
    with pytest.raises(TargetError, match="applies to quantising targets; 'cpu-fp32' does not quantise"):
        with_float_layers("cpu-fp32", prefix=1)


def test_float_layers_on_a_model_handed_to_dynamic_int8_are_refused_not_ignored():
    from compiler.targets import with_float_layers

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(2, 16)
    with pytest.raises(TargetError, match="float_prefix would keep .* hands this model .* to cpu-int8-dynamic"):
        compile(model, with_float_layers("cpu-int8", prefix=1), (x,), calibration_data=[torch.randn(8, 16)])
