"""compile(..., input_format=...): 8-bit pixel inputs, the normalisation folded into the first conv exactly."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

from compiler import compile
from compiler.errors import InputError, TargetError
from compiler.quant_ops import QUANTIZE_DEQUANTIZE

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _cnn(first: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        first or nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.3, 0.3)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def _pixels(count: int, layout: str = "NCHW", seed: int = 0) -> torch.Tensor:
    pixels = torch.randint(0, 256, (count, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return pixels.permute(0, 2, 3, 1).contiguous() if layout == "NHWC" else pixels


def _reference(model: nn.Module, pixels: torch.Tensor, layout: str) -> torch.Tensor:
    x = pixels.float().permute(0, 3, 1, 2) if layout == "NHWC" else pixels.float()
    x = (x / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x)


def _format(layout: str = "NCHW") -> dict:
    return {"dtype": "uint8", "mean": MEAN, "std": STD, "layout": layout}


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_fp32_artifact_takes_pixels_and_matches_the_normalised_model_at_the_borders_too(layout):
    model, pixels = _cnn(), _pixels(8, layout)
    compiled = compile(model, "cpu-fp32", (pixels[:2],), input_format=_format(layout))
    assert compiled.onnx.graph.input[0].type.tensor_type.elem_type == 2  # uint8
    output, reference = compiled(pixels), _reference(model, pixels, layout)
    assert torch.allclose(output, reference, rtol=1e-4, atol=1e-5)
    assert compiled.report.entry("fold_pixel_normalization").stats == {
        "normalizations": [{"folded": True, "conv": "0"}]}
    ops = collections.Counter(node.op_type for node in compiled.onnx.graph.node)
    assert ops["Sub"] == 0 and ops["Div"] == 0  # no normalisation left at run time


def test_folding_into_the_weights_alone_would_be_wrong_at_the_borders():
    """The fourth channel is what keeps the padded border exact: without it the edge outputs move."""
    model, pixels = _cnn(), _pixels(4)
    conv = model[0]
    scaled = conv.weight / (255 * torch.tensor(STD).view(1, 3, 1, 1))
    offset = -(conv.weight * (torch.tensor(MEAN) / torch.tensor(STD)).view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
    with torch.no_grad():
        naive = nn.functional.conv2d(pixels.float(), scaled, conv.bias + offset, stride=2, padding=1)
        true = conv((pixels.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    assert torch.allclose(naive[..., 1:, 1:], true[..., 1:, 1:], atol=1e-4)
    assert not torch.allclose(naive[..., 0, :], true[..., 0, :], atol=1e-2)


def test_int8_reads_the_pixels_with_an_exact_first_quantiser():
    model, pixels = _cnn(), _pixels(64)
    compiled = compile(model, "cpu-int8", (pixels[:2],), calibration_data=[(pixels,)], input_format=_format())
    quantisers = [node for node in compiled.graph_module.graph.nodes if node.target is QUANTIZE_DEQUANTIZE]
    assert quantisers[0].args[1:] == (1.0, 0, 0, 255)  # scale 1, zero point 0: every pixel exact
    assert compiled.report.fallbacks == []
    drift = torch.nn.functional.cosine_similarity(compiled(pixels[:16]).flatten(),
                                                  _reference(model, pixels[:16], "NCHW").flatten(), dim=0)
    assert drift >= 0.99


def test_a_model_that_does_not_start_with_a_conv_keeps_the_normalisation_as_float_ops():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)

        def forward(self, x):
            return self.conv(x * 2.0)

    model, pixels = _cnn(Scaled()), _pixels(4)
    compiled = compile(model, "cpu-fp32", (pixels[:2],), input_format=_format())
    (row,) = compiled.report.entry("fold_pixel_normalization").stats["normalizations"]
    assert row["folded"] is False and "something other than one conv2d" in row["reason"]
    assert torch.allclose(compiled(pixels), _reference(model, pixels, "NCHW"), rtol=1e-4, atol=1e-5)


def test_a_normalised_float_image_given_to_a_pixel_artifact_is_refused_with_what_to_pass():
    compiled = compile(_cnn(), "cpu-fp32", (_pixels(2),), input_format=_format())
    with pytest.raises(InputError, match="pass the 8-bit pixels themselves"):
        compiled(torch.rand(2, 3, 24, 24))


@pytest.mark.parametrize(("spec", "message"), [
    ({"dtype": "float32", "mean": MEAN, "std": STD}, "dtype"),
    ({"mean": MEAN, "std": STD, "layout": "CHW"}, "layout"),
    ({"mean": MEAN, "std": [0.2, 0.0, 0.2]}, "std"),
    ({"mean": MEAN, "std": STD[:2]}, "one per channel"),
    ({"mean": "imagenet", "std": STD}, "mean"),
    ({"mean": MEAN, "std": STD, "scale": 255}, "unknown key"),
])
def test_a_bad_input_format_is_a_target_error_naming_the_key(spec, message):
    with pytest.raises(TargetError, match=message):
        compile(_cnn(), "cpu-fp32", (_pixels(2),), input_format=spec)


@pytest.mark.parametrize("inputs", [torch.rand(2, 3, 24, 24), torch.zeros(2, 24, 24, 3, dtype=torch.uint8)])
def test_float_or_wrongly_laid_out_examples_are_refused(inputs):
    with pytest.raises(TargetError, match="expected uint8 pixels of shape"):
        compile(_cnn(), "cpu-fp32", (inputs,), input_format=_format("NCHW"))
