"""gptq: integer weights chosen for the layer's output error on calibrated inputs.

Properties of the rounding itself (uncorrelated inputs give nearest rounding; correlated inputs
give a smaller output error; every integer stays in range), then the pass inside cpu-int8: the
integers it chooses are the ones the graph and ONNX Runtime use, the ledger says so, and bad
options and missing data are typed errors.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from compiler import compile, ir, meta
from compiler.errors import CalibrationDataError, PassError
from compiler.quant_ops import DEQUANTIZE_PER_CHANNEL
from compiler.targets import PassSpec, get_target
from passes import REGISTRY
from passes.quant.gptq import GPTQ, gptq_round, output_error
from passes.quant.insert_qdq import weight_integers, weight_scales
from tests.support import randomize_batch_norm


def _correlated_moment(width: int, seed: int) -> torch.Tensor:
    """``E[x x^T]`` of inputs whose neighbouring features move together, like an image's pixels."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(4096, width + 4, generator=generator, dtype=torch.float64)
    rows = sum(base[:, shift:shift + width] for shift in range(5))
    return (rows.T @ rows / rows.shape[0]).unsqueeze(0)


def _layer(rows: int, width: int, seed: int, largest: int):
    weight = torch.randn(1, rows, width, generator=torch.Generator().manual_seed(seed))
    scales = weight_scales(weight[0], 0, largest).reshape(1, rows)
    return weight, scales


def test_free_columns_take_the_error_unrounded_and_the_rest_stays_in_range():
    weight, scales = _layer(5, 12, 3, 127)
    bias = torch.randn(1, 5, 1, generator=torch.Generator().manual_seed(4))
    moment = _correlated_moment(13, 3)
    chosen = gptq_round(torch.cat([weight, bias], dim=2), scales, moment, 127, free=1)
    step = scales.double().unsqueeze(2)
    assert torch.equal(chosen[:, :, :12], chosen[:, :, :12].round()) and chosen[:, :, :12].abs().max() <= 127
    assert not torch.equal(chosen[:, :, 12:], chosen[:, :, 12:].round())  # the free column is not rounded
    alone = gptq_round(weight, scales, moment[:, :12, :12], 127)
    exact = torch.cat([weight, bias], dim=2).double()
    with_free = output_error(exact, chosen * step, moment)
    assert with_free < output_error(exact, torch.cat([alone * step, bias.double()], dim=2), moment)


@pytest.mark.parametrize("seed", range(3))
def test_uncorrelated_inputs_give_nearest_rounding(seed):
    weight, scales = _layer(6, 20, seed, 63)
    chosen = gptq_round(weight, scales, torch.eye(20, dtype=torch.float64).unsqueeze(0), 63)
    assert torch.equal(chosen, torch.round(weight.double() / scales.double().unsqueeze(2)))


@pytest.mark.parametrize("seed,largest", [(0, 63), (1, 127), (2, 7)])
def test_correlated_inputs_get_a_smaller_output_error_and_integers_stay_in_range(seed, largest):
    weight, scales = _layer(8, 32, seed, largest)
    moment = _correlated_moment(32, seed)
    step = scales.double().unsqueeze(2)
    chosen = gptq_round(weight, scales, moment, largest)
    nearest = torch.round(weight.double() / step)
    assert chosen.abs().max() <= largest and torch.equal(chosen, chosen.round())
    assert output_error(weight, chosen * step, moment) < 0.7 * output_error(weight, nearest * step, moment)


def test_grouped_rounding_equals_rounding_each_group_alone():
    weight, scales = _layer(4, 9, 0, 127)
    stacked_weight, stacked_scales = torch.cat([weight, weight.flip(2)]), torch.cat([scales, scales])
    moments = torch.cat([_correlated_moment(9, 1), _correlated_moment(9, 2)])
    together = gptq_round(stacked_weight, stacked_scales, moments, 127)
    for group in range(2):
        alone = gptq_round(stacked_weight[group:group + 1], scales, moments[group:group + 1], 127)
        assert torch.equal(together[group:group + 1], alone)


def test_chosen_integers_are_kept_only_where_the_scale_is_unchanged():
    weight = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    scales = weight_scales(weight, 0, 63)
    node = torch.fx.Graph().placeholder("w")
    chosen = torch.full((3, 5), 7, dtype=torch.int8)
    node.meta[meta.WEIGHT_INTEGERS] = {"integers": chosen, "scales": scales.clone(), "largest": 63, "method": "gptq"}
    assert torch.equal(weight_integers(node, weight, scales, 0, 63), chosen)
    raised = scales.clone()
    raised[1] *= 2
    mixed = weight_integers(node, weight, raised, 0, 63)
    assert torch.equal(mixed[[0, 2]], chosen[[0, 2]]) and not torch.equal(mixed[1], chosen[1])
    assert not torch.equal(weight_integers(node, weight, scales, 0, 127), chosen)  # another bit width


class Photo(nn.Module):
    """Convs over smooth images: the correlated inputs GPTQ is for."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6())
        self.project = nn.Conv2d(16, 24, 1)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        y = self.project(self.depthwise(self.stem(x)))
        return self.head(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


def _images(count: int, seed: int) -> torch.Tensor:
    """Smooth random images: upsampled noise, so neighbouring pixels are correlated."""
    coarse = torch.rand(count, 3, 6, 6, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return nn.functional.interpolate(coarse, size=(24, 24), mode="bilinear", align_corners=False)


def _target(with_gptq: bool, **options):
    base = get_target("cpu-int8")
    dropped = {"quant_sensitivity", "reconstruct"} | (set() if with_gptq else {"gptq"})
    pipeline = tuple(PassSpec(spec.name, {**spec.options, **options}) if spec.name == "gptq" else spec
                     for spec in base.pipeline if spec.name not in dropped)
    return dataclasses.replace(base, pipeline=pipeline)


def _compile(with_gptq: bool, **options):
    torch.manual_seed(0)
    model = randomize_batch_norm(Photo())
    return model, compile(model, _target(with_gptq, **options), _images(1, 0),
                          calibration_data=[_images(32, 1), _images(32, 2)])


@pytest.fixture(scope="module")
def compiled_pair():
    return _compile(True), _compile(False)


def test_registered_in_cpu_int8_between_calibration_and_the_quantisers():
    assert REGISTRY["gptq"] is GPTQ
    names = [spec.name for spec in get_target("cpu-int8").pipeline]
    assert names.index("calibrate") < names.index("gptq") < names.index("insert_qdq")


def _integer_weights(compiled) -> dict[str, torch.Tensor]:
    """Module path -> the int8 weight the graph reads."""
    gm, found = compiled.graph_module, {}
    for node in gm.graph.nodes:
        if node.target is DEQUANTIZE_PER_CHANNEL and node.args[0].op == "get_attr":
            value = ir.get_attribute(gm, node.args[0].target)
            user = next(iter(node.users))
            if value.dtype == torch.int8 and user.op == "call_function":
                found[user.meta.get(meta.MODULE_PATH, "")] = value
    return found


def test_the_graph_uses_the_integers_gptq_chose(compiled_pair):
    (_, compiled), (_, plain) = compiled_pair
    stats = compiled.report.entry("gptq").stats
    rounded = {row["module_path"] for row in stats["layers"]}
    assert "stem.0" in rounded and all(row["held_out_gain_db"] > 0 for row in stats["layers"])
    assert "depthwise.0" not in rounded  # depthwise convs keep nearest rounding by default
    rows = {row["module_path"]: row for row in compiled.report.entry("insert_qdq").stats["layers"]
            if row["kind"] == "weight"}
    assert {path for path, row in rows.items() if row["rounding"] == "gptq"} == rounded
    table = str(compiled.report)
    assert all(any(line.startswith(path) and "minmax_per_channel, gptq" in line for line in table.splitlines())
               for path in rounded)
    chosen, nearest = _integer_weights(compiled), _integer_weights(plain)
    assert set(chosen) == set(nearest) == set(rows)
    for path in rows:
        assert torch.equal(chosen[path], nearest[path]) == (path not in rounded), path


def test_gptq_lowers_the_output_error_on_held_out_images(compiled_pair):
    (model, with_gptq), (_, without) = compiled_pair
    images = _images(64, 9)
    with torch.no_grad():
        reference = model(images).double()

    def noise(compiled):
        return float((compiled.simulate(images).double() - reference).pow(2).mean())

    assert noise(with_gptq) < noise(without)


def test_onnx_runtime_agrees_with_the_simulation(compiled_pair):
    (_, compiled), _ = compiled_pair
    images = _images(8, 5)
    runtime, simulated = compiled(images).numpy(), compiled.simulate(images).numpy()
    np.testing.assert_allclose(runtime, simulated, rtol=0, atol=1e-5)


def test_missing_calibration_data_is_a_typed_error():
    with pytest.raises(CalibrationDataError):
        compile(Photo().eval(), _target(True), _images(1, 0))


@pytest.mark.parametrize("options,message", [({"samples": 0}, "samples"), ({"samples": True}, "samples"),
                                             ({"damping": 2.0}, "damping"), ({"damping": "small"}, "damping")])
def test_bad_options_are_pass_errors(options, message):
    with pytest.raises(PassError, match=message):
        _compile(True, **options)
