"""The scikit-learn handwritten digits (1,797 8x8 images), split and shaped for the zoo models.

One stratified, seeded split serves every digits model: the training part trains `digits-cnn`
and feeds calibration, the held-out part feeds evaluation and its labels, so the two never share
an image.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from models.zoo_model import check_count

#: How an image is laid out for a model: 784 floats, 1x28x28, or the native 1x8x8.
Layout = Literal["flat28", "image28", "image8"]

SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.3
UPSAMPLED_SIDE = 28


@dataclasses.dataclass(frozen=True)
class DigitsSplit:
    """The digits as float32 images in [0, 1] (N, 8, 8) with int64 labels (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    held_out_images: np.ndarray
    held_out_labels: np.ndarray


@functools.lru_cache(maxsize=1)
def digits_split() -> DigitsSplit:
    """Returns the seeded 70/30 stratified split of the digits, in the split's shuffled order."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are integers 0..16.
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    train_images, held_out_images, train_labels, held_out_labels = train_test_split(
        images, labels, test_size=HELD_OUT_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    return DigitsSplit(train_images, train_labels, held_out_images, held_out_labels)


def to_layout(images: np.ndarray, layout: Layout) -> torch.Tensor:
    """Converts (N, 8, 8) images to a model's input layout.

    Args:
        images: Float32 images in [0, 1].
        layout: "image8" keeps 1x8x8; "image28" upsamples bilinearly to 1x28x28; "flat28"
            flattens that to 784 values.

    Returns:
        A new float32 tensor with the batch first.
    """
    batch = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).clone()
    if layout == "image8":
        return batch
    upsampled = F.interpolate(
        batch, size=(UPSAMPLED_SIDE, UPSAMPLED_SIDE), mode="bilinear", align_corners=False
    )
    if layout == "image28":
        return upsampled
    return upsampled.flatten(1)


def training_set() -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the whole training split as (1x8x8 images, int64 labels)."""
    split = digits_split()
    return to_layout(split.train_images, "image8"), torch.from_numpy(split.train_labels.copy())


@dataclasses.dataclass(frozen=True)
class DigitsData:
    """Calibration from the training split, evaluation and labels from the held-out split.

    Attributes:
        layout: The input layout of the model the data feed.
    """

    layout: Layout

    def calibration(self, count: int) -> tuple[torch.Tensor, ...]:
        """Returns the first `count` training images (at most 1,257)."""
        images = digits_split().train_images
        check_count(count, len(images), "digits training samples")
        return (to_layout(images[:count], self.layout),)

    def evaluation(self, count: int) -> tuple[torch.Tensor, ...]:
        """Returns the first `count` held-out images (at most 540)."""
        images = digits_split().held_out_images
        check_count(count, len(images), "digits held-out samples")
        return (to_layout(images[:count], self.layout),)

    def labels(self, count: int) -> torch.Tensor:
        """Returns the labels of `evaluation(count)`."""
        labels = digits_split().held_out_labels
        check_count(count, len(labels), "digits held-out samples")
        return torch.from_numpy(labels[:count].copy())
