"""Natural-photograph inputs for the ImageNet models: seeded random crops of scikit-image's photos.

Each sample is a square crop whose side is a random 20% to 100% of the photo's short side, at a
random position, flipped horizontally half the time, resized (bilinear, antialiased) to 224x224.
Every sample's parameters come from its own row of a seeded uniform draw, so `crops(n, seed)` is
the first `n` rows of `crops(m, seed)` for any m > n, in every process.

The photos are the colour photographs scikit-image ships in its wheel (no download): astronaut,
chelsea (the cat), coffee, rocket, the left view of stereo_motorcycle and hubble_deep_field.
`cat()` is the same image as `chelsea()`, and the remaining colour images are microscopy,
retina scans or synthetic patterns, so they are left out.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
import torch.nn.functional as F

from models.zoo_model import check_count

IMAGE_SIDE = 224
MIN_CROP_FRACTION = 0.2
#: A bound that keeps an accidental huge request from allocating tens of gigabytes.
MAX_CROPS = 10_000
#: The normalisation EfficientNet-Lite was trained with: (x - 0.5) / 0.5.
HALF_NORMALISATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
#: The torchvision ImageNet normalisation.
IMAGENET_NORMALISATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _load_photos() -> list[np.ndarray]:
    """Returns the scikit-image colour photographs as (H, W, 3) uint8 arrays."""
    from skimage import data

    return [
        data.astronaut(),
        data.chelsea(),
        data.coffee(),
        data.rocket(),
        data.stereo_motorcycle()[0],
        data.hubble_deep_field(),
    ]


@functools.lru_cache(maxsize=1)
def photos() -> tuple[torch.Tensor, ...]:
    """Returns the photos as float32 (3, H, W) tensors in [0, 1], decoded once per process."""
    return tuple(
        torch.from_numpy(photo.copy()).permute(2, 0, 1).float().div(255.0)
        for photo in _load_photos()
    )


def _crop(photo: torch.Tensor, draw: np.ndarray) -> torch.Tensor:
    """Cuts, flips and resizes one crop of a photo.

    Args:
        photo: A (3, H, W) image.
        draw: Four uniforms in [0, 1): crop scale, top, left, flip.

    Returns:
        The (3, IMAGE_SIDE, IMAGE_SIDE) crop.
    """
    height, width = photo.shape[1:]
    scale = MIN_CROP_FRACTION + (1.0 - MIN_CROP_FRACTION) * draw[0]
    side = max(1, round(scale * min(height, width)))
    top = int(draw[1] * (height - side + 1))
    left = int(draw[2] * (width - side + 1))
    crop = photo[:, top : top + side, left : left + side]
    if draw[3] < 0.5:
        crop = crop.flip(-1)
    resized = F.interpolate(
        crop.unsqueeze(0),
        size=(IMAGE_SIDE, IMAGE_SIDE),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    return resized[0].clamp_(0.0, 1.0)


def crops(count: int, seed: int) -> torch.Tensor:
    """Returns `count` random crops in [0, 1] as a float32 (count, 3, 224, 224) batch.

    Args:
        count: How many crops, at most MAX_CROPS.
        seed: The seed of the crop parameters.
    """
    check_count(count, MAX_CROPS, "image crops")
    sources = photos()
    # One row per sample (photo, scale, top, left, flip): a prefix of rows is seed-stable.
    draws = np.random.default_rng(seed).random((count, 5))
    batch = torch.empty(count, 3, IMAGE_SIDE, IMAGE_SIDE)
    for index, draw in enumerate(draws):
        photo = sources[min(int(draw[0] * len(sources)), len(sources) - 1)]
        batch[index] = _crop(photo, draw[1:])
    return batch


def to_pixels(batch: torch.Tensor) -> torch.Tensor:
    """Crops in [0, 1] as the uint8 pixels (round to nearest) an 8-bit image holds."""
    return batch.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def normalise(batch: torch.Tensor, normalisation: tuple[tuple[float, ...], ...]) -> torch.Tensor:
    """Applies a per-channel (x - mean) / std in place and returns the batch."""
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in normalisation)
    return batch.sub_(mean).div_(std)


@dataclasses.dataclass(frozen=True)
class PhotoCropData:
    """Unlabelled natural-photo crops, normalised for one model, or as the 8-bit pixels a decoder gives.

    ``calibration(n)`` and ``evaluation(n)`` return the model's float input (the continuous crops,
    normalised); with ``pixels=True`` the same crops rounded to 8 bits as uint8 NCHW tensors, the
    input of an artifact compiled with ``input_format`` (the model sees ``normalise(pixels / 255)``).

    Attributes:
        normalisation: ((mean per channel), (std per channel)), both on the [0, 1] pixel scale.
        calibration_seed: Seed of the calibration crops.
        evaluation_seed: Seed of the evaluation crops.
    """

    normalisation: tuple[tuple[float, ...], ...]
    calibration_seed: int = 0
    evaluation_seed: int = 1

    @property
    def input_format(self) -> dict:
        """The 8-bit pixel format of these crops, as ``compile(..., input_format=...)`` reads it."""
        mean, std = self.normalisation
        return {"dtype": "uint8", "mean": list(mean), "std": list(std), "layout": "NCHW"}

    def calibration(self, count: int, pixels: bool = False) -> tuple[torch.Tensor, ...]:
        """Returns `count` normalised calibration crops, or their 8-bit pixels."""
        return (self._crops(count, self.calibration_seed, pixels),)

    def evaluation(self, count: int, pixels: bool = False) -> tuple[torch.Tensor, ...]:
        """Returns `count` normalised evaluation crops, or their 8-bit pixels."""
        return (self._crops(count, self.evaluation_seed, pixels),)

    def _crops(self, count: int, seed: int, pixels: bool) -> torch.Tensor:
        batch = crops(count, seed)
        return to_pixels(batch) if pixels else normalise(batch, self.normalisation)

    def labels(self, count: int) -> None:
        """Returns None: the crops carry no labels."""
        check_count(count, MAX_CROPS, "image crops")
        return None
