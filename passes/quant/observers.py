"""Streaming observers: they see a tensor's values batch after batch and give its quantisation range.

Every observer holds O(1) numbers (O(bins) for histograms, O(channels) per channel), whatever the
number of batches and whatever their batch size or sequence length, because it keeps statistics,
never activations. Per-tensor observers accept tensors of any shape, and the shape may change from
one call to the next.

- :class:`MinMaxObserver`: the exact smallest and largest value.
- :class:`HistogramObserver`: a :class:`~passes.quant.histogram.StreamingHistogram` (exact
  re-binning, identical whatever the batching); its range is the full observed range.
- :class:`PercentileObserver`, :class:`EntropyObserver` (TensorRT's KL divergence),
  :class:`MSEObserver`: clip the histogram with the searches of :mod:`passes.quant.clipping`.
- :class:`PerChannelMinMaxObserver`: a range per slice along one axis, for weights.

Ranges. A range never extends past what was observed, and it always includes zero (zero must be
exactly representable: padding, ReLU outputs and masked positions are exact zeros). A range
narrower than ``MINIMUM_WIDTH`` (a constant zero tensor, or nearly) is widened by
:func:`widen_range`, so the scales computed from it are never zero.

Non-finite values (NaN, +-Inf, e.g. ``-inf`` attention masks) cannot be represented by any range:
they are skipped and counted in ``non_finite`` so that the calibrate pass can report them.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import torch

from compiler.errors import TargetError
from passes.quant import clipping
from passes.quant.histogram import Histogram, StreamingHistogram

MINIMUM_WIDTH = 2.0**-23  # float32 epsilon: 8-bit scales from a widened range are >= 2**-23 / 255
_CHUNK = 1 << 20  # elements converted to float64 at a time: bounds the transient memory of observe


def widen_range(low: float, high: float) -> tuple[float, float]:
    """Include zero; widen a range narrower than ``MINIMUM_WIDTH`` so that it has a non-zero width.

    Each side that saw values of its sign becomes ``-MINIMUM_WIDTH`` or ``+MINIMUM_WIDTH``; a tensor
    that was all zeros gets ``(0, MINIMUM_WIDTH)``. A symmetric scheme's ``max(|low|, |high|)`` and
    an asymmetric scheme's ``high - low`` are then both at least ``MINIMUM_WIDTH``.
    """
    low, high = min(low, 0.0) + 0.0, max(high, 0.0) + 0.0  # + 0.0 turns -0.0 into 0.0
    if high - low >= MINIMUM_WIDTH:
        return low, high
    low = -MINIMUM_WIDTH if low < 0.0 else 0.0
    high = MINIMUM_WIDTH if high > 0.0 or low == 0.0 else 0.0
    return low, high


class Observer:
    """Base class of the observers: ``observe`` tensors, then ask for their ``range``.

    Subclasses set ``name`` (their ``make_observer`` name), record their constructor arguments
    in ``options``, keep their state in ``_observe_values`` and choose the clipping range in
    ``_clipping_range`` (per-tensor), or override ``observe`` and ``range`` (per-channel).

    Attributes:
        minimum: smallest finite value observed (``inf`` before any).
        maximum: largest finite value observed (``-inf`` before any).
        count: number of finite values observed.
        non_finite: number of NaN and +-Inf values skipped.
        options: the constructor's options (JSON-able), for the ledger and the manifest.
    """

    name: ClassVar[str] = ""

    def __init__(self):
        self.options: dict[str, Any] = {}
        self.minimum, self.maximum = math.inf, -math.inf
        self.count = self.non_finite = 0

    def observe(self, tensor: torch.Tensor, sample_limit: int | None = None) -> None:
        """Add the values of ``tensor`` (any shape, any real dtype) to the statistics.

        Args:
            tensor: the values.
            sample_limit: when the tensor holds more finite values than this, the extremes and the
                count still use all of them but the histogram of a histogram observer counts an
                evenly strided sample of about this many (the clipping search needs the shape of
                the distribution, not every value).
        """
        for chunk, stride, (low, high) in _finite_chunks(tensor, self, sample_limit):
            self.minimum = min(self.minimum, float(low))
            self.maximum = max(self.maximum, float(high))
            self.count += chunk.numel()
            self._observe_values(chunk[::stride] if stride > 1 else chunk)

    def range(self) -> tuple[float, float]:
        """The quantisation range ``(low, high)``: within the observed values, with zero, non-zero width.

        Raises:
            ValueError: when no finite value has been observed yet.
        """
        if self.count == 0:
            raise ValueError(
                f"{type(self).__name__} has observed no finite value "
                f"({self.non_finite} non-finite skipped); call observe() with data before range()"
            )
        low, high = self._clipping_range()
        low = max(low, min(self.minimum, 0.0))
        high = min(high, max(self.maximum, 0.0))
        return widen_range(low, high)

    def state_size(self) -> int:
        """How many numbers the observer holds; constant in the number and size of observed tensors."""
        return 4 + sum(value.state_size() for value in vars(self).values() if hasattr(value, "state_size"))

    def _observe_values(self, values: torch.Tensor) -> None:
        """Update subclass state with finite ``values`` (1-D, non-empty, float32 or float64)."""

    def _clipping_range(self) -> tuple[float, float]:
        """The range before trimming to the observed values and widening; the full range by default."""
        return self.minimum, self.maximum

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


class MinMaxObserver(Observer):
    """The exact smallest and largest observed values."""

    name = "minmax"


class HistogramObserver(Observer):
    """A histogram of fixed size over a range that grows by exact re-binning; range = full range.

    Args:
        bins: number of histogram bins (memory is O(bins)).
    """

    name = "histogram"

    def __init__(self, bins: int = 2048):
        super().__init__()
        self.options["bins"] = bins
        self._histogram = StreamingHistogram(bins)

    def histogram(self) -> Histogram:
        """A copy of the histogram of everything observed so far."""
        return self._histogram.snapshot()

    def _observe_values(self, values: torch.Tensor) -> None:
        self._histogram.add(values.double())


class PercentileObserver(HistogramObserver):
    """Clip to the ``(100 - p, p)`` percentiles, or to the ``p``-th percentile of ``|x|`` when symmetric.

    Args:
        percentile: in (50, 100]; 100 keeps the full range.
        symmetric: search one threshold for ``|x|``.
        bins: number of histogram bins.
    """

    name = "percentile"

    def __init__(self, percentile: float = 99.99, symmetric: bool = False, bins: int = 2048):
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        super().__init__(bins)
        self.options.update(percentile=percentile, symmetric=symmetric)

    def _clipping_range(self) -> tuple[float, float]:
        return clipping.percentile_range(self.histogram(), self.options["percentile"], self.options["symmetric"])


class EntropyObserver(HistogramObserver):
    """Clip to the window minimising the KL divergence of its 8-bit quantisation (TensorRT's method).

    Args:
        symmetric: search ``t`` for ``|x|`` with 128 levels (TensorRT); otherwise both ends, 256 levels.
        bins: number of histogram bins, at least 1024 so that windows of 256 levels exist.
    """

    name = "entropy"

    def __init__(self, symmetric: bool = False, bins: int = 2048):
        if bins < 1024:
            raise ValueError(f"the entropy observer needs at least 1024 bins, got {bins}")
        super().__init__(bins)
        self.options["symmetric"] = symmetric

    def _clipping_range(self) -> tuple[float, float]:
        return clipping.entropy_range(self.histogram(), self.options["symmetric"])


class MSEObserver(HistogramObserver):
    """Clip to the range minimising the expected squared error of 8-bit quantisation.

    Args:
        symmetric: search ``t`` for ``(-t, t)``; otherwise every ``(low, high)`` pair.
        bins: number of histogram bins.
    """

    name = "mse"

    def __init__(self, symmetric: bool = False, bins: int = 2048):
        super().__init__(bins)
        self.options["symmetric"] = symmetric

    def _clipping_range(self) -> tuple[float, float]:
        return clipping.mse_range(self.histogram(), self.options["symmetric"])


class PerChannelMinMaxObserver(Observer):
    """Minimum and maximum of every slice along ``axis`` (the output channels of a weight).

    ``range()`` returns two float32 tensors of one value per channel, each with zero and widened
    by :func:`widen_range`'s rule. The number of channels is fixed by the first tensor; the other
    dimensions may vary.

    Args:
        axis: the channel axis; negative counts from the end.
    """

    name = "minmax_per_channel"

    def __init__(self, axis: int = 0):
        super().__init__()
        self.options["axis"] = axis
        self.channel_minimum: torch.Tensor | None = None
        self.channel_maximum: torch.Tensor | None = None

    def observe(self, tensor: torch.Tensor) -> None:
        """Add the values of ``tensor``, one statistic per index along ``axis``."""
        rows = _channel_rows(tensor, self.options["axis"], self.channel_minimum)
        finite = torch.isfinite(rows)
        self.non_finite += int((~finite).sum())
        self.count += int(finite.sum())
        low = torch.where(finite, rows, math.inf).amin(dim=1)
        high = torch.where(finite, rows, -math.inf).amax(dim=1)
        if self.channel_minimum is None:
            self.channel_minimum, self.channel_maximum = low, high
        else:
            self.channel_minimum = torch.minimum(self.channel_minimum, low)
            self.channel_maximum = torch.maximum(self.channel_maximum, high)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(low, high)`` as float32 tensors, with zero and a non-zero width.

        Raises:
            ValueError: before any observation, or when a channel has no finite value.
        """
        if self.channel_minimum is None:
            raise ValueError("PerChannelMinMaxObserver has observed nothing; call observe() before range()")
        empty = torch.nonzero(self.channel_minimum > self.channel_maximum).flatten().tolist()
        if empty:
            raise ValueError(f"channel(s) {empty[:10]} along axis {self.options['axis']} hold no finite value")
        low = torch.clamp(self.channel_minimum, max=0.0)
        high = torch.clamp(self.channel_maximum, min=0.0)
        narrow = high - low < MINIMUM_WIDTH
        low = torch.where(narrow & (low < 0), -MINIMUM_WIDTH, low)
        high = torch.where(narrow & ((high > 0) | (low == 0)), MINIMUM_WIDTH, high)
        return low.float(), high.float()

    def state_size(self) -> int:
        """Two numbers per channel plus the counters."""
        return 2 + (0 if self.channel_minimum is None else 2 * self.channel_minimum.numel())


OBSERVERS: dict[str, type[Observer]] = {
    cls.name: cls for cls in (MinMaxObserver, PercentileObserver, EntropyObserver, MSEObserver)
}


def make_observer(name: str, **options: Any) -> Observer:
    """Build the per-tensor observer registered as ``name`` with ``options``.

    Raises:
        TargetError: for an unknown name (the error lists the known ones), an unknown option or a
            bad option value.
    """
    cls = OBSERVERS.get(name)
    if cls is None:
        raise TargetError(f"unknown observer {name!r}; known observers: {', '.join(sorted(OBSERVERS))}")
    parameters = list(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        raise TargetError(
            f"observer {name!r} has no option(s) {', '.join(unknown)}; its options: {', '.join(parameters) or 'none'}"
        )
    try:
        return cls(**options)
    except ValueError as error:
        raise TargetError(f"observer {name!r}: {error}") from error


def _finite_chunks(tensor: torch.Tensor, observer: Observer, sample_limit: int | None = None):
    """Yield ``(values, stride, (low, high))``: the finite values of ``tensor``, piece by piece, and their extremes.

    Pieces hold at most ``_CHUNK * stride`` values (float32, or float64 for integer tensors);
    ``stride`` samples about ``sample_limit`` values over the whole tensor.

    Non-finite values are counted on ``observer.non_finite`` and skipped. A piece whose minimum
    and maximum are finite holds no NaN or infinity (``aminmax`` propagates NaN), so the
    elementwise check runs only on pieces that have one: one pass over the data instead of three.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{type(observer).__name__}.observe() takes a tensor, got {type(tensor).__name__}")
    if tensor.is_complex():
        raise TypeError(f"{type(observer).__name__}.observe() cannot range complex values ({tensor.dtype})")
    flat = tensor.detach().reshape(-1)
    stride = max(1, flat.numel() // sample_limit) if sample_limit else 1
    if not flat.dtype.is_floating_point or flat.dtype == torch.float16 or flat.dtype == torch.bfloat16:
        flat = flat.double() if not flat.dtype.is_floating_point else flat.float()
    for chunk in flat.split(_CHUNK * stride):
        values = chunk.cpu()
        if values.numel() == 0:
            continue
        extremes = torch.aminmax(values)
        if not bool(torch.isfinite(torch.stack(extremes)).all()):
            finite = torch.isfinite(values)
            observer.non_finite += int((~finite).sum())
            values = values[finite]
            extremes = torch.aminmax(values) if values.numel() else extremes
        if values.numel():
            yield values, stride, extremes


def _channel_rows(tensor: torch.Tensor, axis: int, known: torch.Tensor | None) -> torch.Tensor:
    """``tensor`` as a float64 matrix of one row per channel; refuse a change in channel count."""
    if not isinstance(tensor, torch.Tensor) or tensor.is_complex():
        raise TypeError(f"PerChannelMinMaxObserver.observe() takes a real tensor, got {type(tensor).__name__}")
    if not -tensor.dim() <= axis < tensor.dim():
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {tensor.dim()}")
    rows = tensor.detach().to("cpu", torch.float64).movedim(axis, 0).reshape(tensor.shape[axis], -1)
    if known is not None and rows.shape[0] != known.numel():
        raise ValueError(f"{rows.shape[0]} channels along axis {axis}; earlier tensors had {known.numel()}")
    if rows.shape[1] == 0:
        raise ValueError(f"a tensor of shape {tuple(tensor.shape)} has no values per channel")
    return rows
