"""reconstruct: each int8 layer refitted to the float output from the int8 model's own input.

The pieces first (the sampled patches are the convolution's, the least-squares and bias fits
solve what they say), then the pass inside cpu-int8 on a small CNN: it runs last, rewrites only
integers, lowers the output error against eager float on held-out images, ONNX Runtime still
computes what the simulation computes, the ledger says what each layer got, and bad options and
missing data are typed errors.
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
from compiler.targets import PassSpec, get_target, with_float_fallback
from passes import REGISTRY
from passes.quant.reconstruct import Reconstruct, patches, refit_bias, ridge_solution, sample_batches
from tests.support import randomize_batch_norm


class _Node:
    """Stands for an fx node where only the op name matters."""

    def __init__(self, name: str):
        self.op, self.target, self.name = "call_function", getattr(torch.ops.aten, name).default, name


@pytest.mark.parametrize("stride,padding,groups", [(1, 1, 1), (2, 1, 1), (1, 2, 4), (2, 0, 8)])
def test_patches_at_full_density_are_the_convolutions_unfolded_input(stride, padding, groups):
    x = torch.randn(3, 8, 11, 13, generator=torch.Generator().manual_seed(stride + padding + groups))
    weight = torch.randn(16, 8 // groups, 3, 5)
    args = (x, weight, None, [stride, stride], [padding, padding], [1, 1], groups)
    found = patches(_Node("conv2d"), args, x, per_sample=10**6)
    unfolded = nn.functional.unfold(x, (3, 5), padding=padding, stride=stride)
    assert torch.equal(found, unfolded.reshape(3, groups, -1, unfolded.shape[2]))
    output = nn.functional.conv2d(x, weight, None, stride, padding, 1, groups)
    per_group = torch.einsum("grk,bgkp->bgrp", weight.reshape(groups, 16 // groups, -1), found)
    torch.testing.assert_close(per_group.reshape(3, 16, *output.shape[2:]), output, rtol=1e-5, atol=1e-5)


def test_sparse_patches_are_a_grid_of_the_dense_ones():
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    args = (x, torch.randn(4, 4, 3, 3), None, [1, 1], [1, 1], [1, 1], 1)
    sparse = patches(_Node("conv2d"), args, x, per_sample=64)
    dense = nn.functional.unfold(x, 3, padding=1, stride=4)
    assert sparse.shape[3] == 64 and torch.equal(sparse[:, 0], dense)


def test_sample_batches_rebatch_images_and_keep_token_lengths_apart():
    images = [(torch.rand(10, 3, 4, 4),), (torch.rand(10, 3, 4, 4),), (torch.rand(10, 3, 4, 4),)]
    batches = sample_batches(images, 25, 8)
    assert [batch[0].shape[0] for batch in batches] == [8, 8, 8, 1]
    assert torch.equal(torch.cat([batch[0] for batch in batches]), torch.cat([images[0][0], images[1][0],
                                                                             images[2][0][:5]]))
    tokens = [(torch.zeros(4, 12, dtype=torch.int64),), (torch.zeros(4, 20, dtype=torch.int64),)]
    assert [batch[0].shape for batch in sample_batches(tokens, 6, 16)] == [(4, 12), (2, 20)]


def test_the_ridge_solution_of_an_exact_input_is_the_float_weights():
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(500, 6, generator=generator, dtype=torch.float64)
    moment = (rows.T @ rows / 500).unsqueeze(0)
    target = torch.randn(1, 4, 6, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(ridge_solution(target, moment, moment, 1e-3), target)


def test_the_ridge_solution_undoes_a_known_input_distortion():
    generator = torch.Generator().manual_seed(2)
    exact = torch.randn(2000, 5, generator=generator, dtype=torch.float64)
    mixing = torch.eye(5, dtype=torch.float64) + 0.2 * torch.randn(5, 5, generator=generator, dtype=torch.float64)
    distorted = exact @ mixing  # what a layer reads after upstream error
    target = torch.randn(1, 3, 5, generator=generator, dtype=torch.float64)
    qq = (distorted.T @ distorted / 2000).unsqueeze(0)
    qf = (distorted.T @ exact / 2000).unsqueeze(0)
    solved = ridge_solution(target, qq, qf, 1e-9)
    torch.testing.assert_close(solved[0] @ mixing.T, target[0], rtol=1e-5, atol=1e-6)


def test_the_refitted_bias_cancels_the_mean_output_error():
    generator = torch.Generator().manual_seed(3)
    quantized = torch.cat([torch.randn(800, 4, generator=generator, dtype=torch.float64) + 0.5,
                           torch.ones(800, 1, dtype=torch.float64)], dim=1)
    exact = quantized.clone()
    exact[:, :4] += 0.1  # the int8 input reads 0.1 low on every channel
    target = torch.randn(1, 3, 5, generator=generator, dtype=torch.float64)
    current = target.clone()
    current[:, :, :4] += 0.01 * torch.randn(1, 3, 4, generator=generator, dtype=torch.float64)
    refitted = refit_bias(current, target, (quantized.T @ quantized / 800).unsqueeze(0),
                          (quantized.T @ exact / 800).unsqueeze(0))
    mean_error = (quantized @ refitted[0].T - exact @ target[0].T).mean(dim=0)
    torch.testing.assert_close(mean_error, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-9)


class Narrow(nn.Module):
    """A CNN deep enough for upstream int8 error to build up: stem, two inverted blocks, head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(*[nn.Sequential(
            nn.Conv2d(16, 48, 1), nn.BatchNorm2d(48), nn.ReLU6(),
            nn.Conv2d(48, 48, 3, padding=1, groups=48), nn.BatchNorm2d(48), nn.ReLU6(),
            nn.Conv2d(48, 16, 1), nn.BatchNorm2d(16)) for _ in range(2)])
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        y = self.stem(x)
        for block in self.blocks:
            y = y + block(y)
        return self.head(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


def _images(count: int, seed: int) -> torch.Tensor:
    coarse = torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)


def _target(reconstruct: bool, **options):
    base = get_target("cpu-int8")
    pipeline = tuple(PassSpec(spec.name, {**spec.options, **options}) if spec.name == "reconstruct" else spec
                     for spec in base.pipeline if reconstruct or spec.name != "reconstruct")
    return dataclasses.replace(base, pipeline=pipeline)


def _compile(reconstruct: bool, threads: int | str = "auto", **options):
    torch.manual_seed(0)
    model = randomize_batch_norm(Narrow())
    return model, compile(model, _target(reconstruct, **options), _images(1, 0),
                          calibration_data=[_images(32, 1), _images(32, 2)], threads=threads)


@pytest.fixture(scope="module")
def compiled_pair():
    return _compile(True), _compile(False)


def test_registered_last_in_cpu_int8_with_no_layer_float_by_default():
    assert REGISTRY["reconstruct"] is Reconstruct
    names = [spec.name for spec in get_target("cpu-int8").pipeline]
    assert names[-2:] == ["insert_qdq", "reconstruct"] and "quant_sensitivity" not in names
    fallback = [spec.name for spec in with_float_fallback("cpu-int8", 0.04).pipeline]
    assert fallback.index("gptq") < fallback.index("quant_sensitivity") < fallback.index("bias_correction")


def _integers(compiled) -> dict[str, torch.Tensor]:
    """(module path, kind) -> the integers the graph dequantises."""
    gm, found = compiled.graph_module, {}
    for node in gm.graph.nodes:
        if node.target is DEQUANTIZE_PER_CHANNEL:
            user = next(iter(node.users))
            found[(ir.module_path(user), node.meta[meta.QUANT_PARAMS]["kind"])] = ir.get_attribute(
                gm, node.args[0].target)
    return found


def test_only_integers_change_and_the_ledger_says_which(compiled_pair):
    (_, compiled), (_, plain) = compiled_pair
    stats = compiled.report.entry("reconstruct").stats
    rows = {row["module_path"]: row for row in stats["layers"]}
    assert stats["samples"] == 64 and len(rows) == 8  # stem, 3 convs x 2 blocks, head
    assert stats["refitted"] == sum(row["chosen"] != "kept" for row in rows.values()) >= 1
    for row in rows.values():
        assert row["held_out_sqnr_db"]["after"] >= row["held_out_sqnr_db"]["before"]
    after, before = _integers(compiled), _integers(plain)
    assert set(after) == set(before)
    for (path, kind), value in after.items():
        assert value.dtype == before[(path, kind)].dtype
        if rows[path]["chosen"] == "kept":
            assert torch.equal(value, before[(path, kind)]), path
    changed = [path for path, row in rows.items() if row["chosen"].startswith("least squares")]
    assert all(not torch.equal(after[(path, "weight")], before[(path, "weight")]) for path in changed)
    assert all(after[(path, "weight")].abs().max() <= 127 for path in rows)
    quantisers = [node.args[1:] for node in compiled.graph_module.graph.nodes
                  if node.target is torch.ops.fxpress.quantize_dequantize.default]
    assert quantisers == [node.args[1:] for node in plain.graph_module.graph.nodes
                          if node.target is torch.ops.fxpress.quantize_dequantize.default]


def test_lowers_the_output_error_on_held_out_images(compiled_pair):
    (model, refitted), (_, plain) = compiled_pair
    images = _images(64, 9)
    with torch.no_grad():
        reference = model(images).double()

    def noise(compiled):
        return float((compiled.simulate(images).double() - reference).pow(2).mean())

    assert noise(refitted) < 0.9 * noise(plain)


def test_onnx_runtime_agrees_with_the_simulation(compiled_pair):
    (_, compiled), _ = compiled_pair
    images = _images(8, 5)
    np.testing.assert_allclose(compiled(images).numpy(), compiled.simulate(images).numpy(), rtol=0, atol=1e-5)


def test_the_result_does_not_depend_on_the_machines_thread_count():
    _, one = _compile(True, threads=1)
    _, two = _compile(True, threads=2)
    assert one.onnx.SerializeToString() == two.onnx.SerializeToString()


def test_missing_calibration_data_is_a_typed_error():
    with pytest.raises(CalibrationDataError):
        compile(Narrow().eval(), _target(True), _images(1, 0))


@pytest.mark.parametrize("options,message", [({"samples": 0}, "samples"), ({"batch_size": 1.5}, "batch_size"),
                                             ({"ridge": [0.1, -1]}, "ridge"), ({"ridge": "large"}, "ridge"),
                                             ({"gptq_damping": 1.0}, "gptq_damping")])
def test_bad_options_are_pass_errors(options, message):
    with pytest.raises(PassError, match=message):
        _compile(True, **options)


def test_too_few_samples_for_a_held_out_half_leave_the_model_alone():
    _, compiled = _compile(True, batch_size=64)
    stats = compiled.report.entry("reconstruct").stats
    assert "2 sample batches" in stats["skipped"]
