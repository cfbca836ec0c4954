"""Image models compiled to take the 8-bit pixels a decoder produces (``compile(..., input_format=...)``).

The user's model takes normalised float images, ``(pixels / 255 - mean) / std`` per channel.
With an input format, fxpress compiles ``PixelInput(model)`` instead: its input is the uint8
image (NCHW, or NHWC as decoders lay pixels out), cast to float, moved to NCHW, then normalised
by one IR op, ``fxpress::normalize_pixels``, which the ``fold_pixel_normalization`` pass folds
into the first convolution exactly (borders included) so that no normalisation runs at run time
and the first quantiser sees integers. ``mean`` and ``std`` are on the [0, 1] pixel scale
(torchvision's convention: ImageNet is mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compiler.errors import TargetError
from compiler.quant_ops import NAMESPACE

LAYOUTS = ("NCHW", "NHWC")
PIXEL_MAX = 255.0
_KEYS = ("dtype", "mean", "std", "layout")


@dataclass(frozen=True)
class InputFormat:
    """8-bit pixels in ``layout``, normalised per channel by ``(p / 255 - mean) / std`` for the model."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str = "NCHW"
    dtype: str = "uint8"

    @property
    def channels(self) -> int:
        """The image's channel count."""
        return len(self.mean)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, as the manifest and the ledger record it."""
        return {"dtype": self.dtype, "mean": list(self.mean), "std": list(self.std), "layout": self.layout}


def parse_input_format(spec: dict | InputFormat | None) -> InputFormat | None:
    """Check an ``input_format`` mapping; every fault names its key and what to give instead."""
    if spec is None or isinstance(spec, InputFormat):
        return spec
    if not isinstance(spec, dict):
        raise TargetError(f"input_format must be a dict with keys {', '.join(_KEYS)}, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(_KEYS))
    if unknown:
        raise TargetError(f"input_format: unknown key(s) {', '.join(unknown)}; known: {', '.join(_KEYS)}")
    if spec.get("dtype", "uint8") != "uint8":
        raise TargetError(f"input_format['dtype'] must be 'uint8' (8-bit pixels), got {spec.get('dtype')!r}")
    layout = spec.get("layout", "NCHW")
    if layout not in LAYOUTS:
        raise TargetError(f"input_format['layout'] must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    mean, std = (_floats(spec, key) for key in ("mean", "std"))
    if len(mean) != len(std):
        raise TargetError(f"input_format: mean has {len(mean)} values and std {len(std)}; give one per channel")
    if any(value <= 0 for value in std):
        raise TargetError(f"input_format['std'] must be positive per channel, got {list(std)}")
    return InputFormat(mean, std, layout)


def _floats(spec: dict, key: str) -> tuple[float, ...]:
    values = spec.get(key)
    if not isinstance(values, (list, tuple)) or not values or not all(
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            for value in values):
        raise TargetError(f"input_format[{key!r}] must be a non-empty list of finite numbers, one per channel "
                          f"(on the [0, 1] pixel scale), got {values!r}")
    return tuple(float(value) for value in values)


@torch.library.custom_op(f"{NAMESPACE}::normalize_pixels", mutates_args=())
def normalize_pixels(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel (axis 1) of float NCHW pixels in [0, 255]."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean_tensor = torch.tensor(mean, dtype=x.dtype).reshape(shape)
    std_tensor = torch.tensor(std, dtype=x.dtype).reshape(shape)
    return (x / PIXEL_MAX - mean_tensor) / std_tensor


@normalize_pixels.register_fake
def _(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    return torch.empty_like(x)


NORMALIZE_PIXELS = torch.ops.fxpress.normalize_pixels.default


class PixelInput(nn.Module):
    """The user's model behind 8-bit pixel input: cast, move to NCHW, normalise, run.

    Module paths in the ledger stay the user's (``fxpress_path_prefix`` is cut by the capture).
    """

    fxpress_path_prefix = "model."

    def __init__(self, model: nn.Module, input_format: InputFormat):
        super().__init__()
        self.model, self.input_format = model, input_format
        self.train(model.training)  # the user's mode: compile refuses training mode with the user's message

    def forward(self, pixels: torch.Tensor) -> Any:
        """Normalised float NCHW images from ``pixels``, then the model."""
        x = pixels.to(torch.float32)
        if self.input_format.layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        return self.model(normalize_pixels(x, list(self.input_format.mean), list(self.input_format.std)))


def check_pixels(inputs: tuple, input_format: InputFormat, what: str) -> None:
    """Refuse example or calibration inputs that are not one uint8 image batch in the declared layout."""
    if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
        raise TargetError(f"{what}: with input_format the model takes one uint8 image batch, got {len(inputs)} "
                          "inputs")
    pixels = inputs[0]
    channel_axis = 1 if input_format.layout == "NCHW" else 3
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[channel_axis] != input_format.channels:
        raise TargetError(
            f"{what}: expected uint8 pixels of shape {_layout_shape(input_format)}, got {pixels.dtype} "
            f"{tuple(pixels.shape)}; pass the decoder's 8-bit images, not normalised floats")


def _layout_shape(input_format: InputFormat) -> str:
    c = input_format.channels
    return f"(N, {c}, H, W)" if input_format.layout == "NCHW" else f"(N, H, W, {c})"
