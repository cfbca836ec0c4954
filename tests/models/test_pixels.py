"""The image zoo's 8-bit pixel view: uint8 crops, the same crops as the float data, and their normalisation."""

from __future__ import annotations

import pytest
import torch

import models
from models.images import HALF_NORMALISATION, IMAGENET_NORMALISATION, PhotoCropData, crops, normalise


@pytest.mark.parametrize("normalisation", [HALF_NORMALISATION, IMAGENET_NORMALISATION])
def test_pixels_are_the_float_crops_rounded_to_8_bits(normalisation):
    data = PhotoCropData(normalisation)
    (pixels,), (floats,) = data.evaluation(6, pixels=True), data.evaluation(6)
    assert pixels.dtype == torch.uint8 and pixels.shape == (6, 3, 224, 224)
    assert torch.equal(pixels, (crops(6, data.evaluation_seed) * 255).round().to(torch.uint8))
    renormalised = normalise(pixels.float() / 255, normalisation)
    worst_step = 0.5 / 255 / min(normalisation[1])  # half an 8-bit step, on the normalised scale
    assert (renormalised - floats).abs().max() <= worst_step + 1e-6
    assert not torch.equal(renormalised, floats)  # the float data are the continuous crops
    assert torch.equal(data.calibration(2, pixels=True)[0], data.calibration(3, pixels=True)[0][:2])


def test_image_models_say_their_pixel_format_and_others_none():
    assert models.load("efficientnet-lite0").input_format == {
        "dtype": "uint8", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "layout": "NCHW"}
    assert PhotoCropData(IMAGENET_NORMALISATION).input_format["mean"] == [0.485, 0.456, 0.406]
    assert models.load("digits-cnn").input_format is None
