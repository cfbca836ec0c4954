"""A streaming histogram with a fixed number of bins over a range that grows by exact re-binning.

Memory is O(bins) whatever the number of tensors observed and whatever their batch size or
sequence length: values are counted, never stored.

The grid. Bin edges are integer multiples of a bin width that is a power of two, and the
histogram holds ``bins`` consecutive bins ``start .. start + bins - 1`` (global grid indices).
Zero is always covered (the observed range is widened to include it, as every quantisation range
does), so zero is always a bin edge, and the histogram of ``|x|`` is an exact fold of this one.

Growth. The width is always the smallest power of two at which the values seen so far fit in
``bins`` bins (fitting is monotone: the grid at width ``2w`` is the grid at ``w`` with pairs of
bins merged, so a range that fits at ``w`` fits at ``2w``). When new values do not fit, the width
is doubled ``k`` times and old bin ``g`` moves to new bin ``floor(g / 2**k)``. Every old bin lies
entirely inside one new bin, so counts move without being split or interpolated.

Why that is correct. After any sequence of updates the counts are exactly the histogram of every
value observed, on a grid that depends only on the smallest and largest value observed. The same
data therefore gives the same histogram, bit for bit, whether it comes in one batch or ten
thousand, in any order. Dividing by a power of two is exact in binary floating point, so the bin
of a value is exact too. The price of power-of-two widths is resolution: the occupied span covers
between about half and all of the bins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SMALLEST_WIDTH = 2.0**-64  # the width while every value seen is zero
_LARGEST_SHIFT = 62  # floor(g / 2**k) for |g| <= bins is the same for every k >= 62


@dataclass(frozen=True)
class Histogram:
    """An immutable histogram on the zero-anchored grid: bin ``i`` is ``[(start + i) * width, ...)``.

    Attributes:
        counts: float64 counts, one per bin.
        start: global grid index of the first bin (``<= 0`` for a signed histogram).
        width: bin width, a power of two.
        zeros: how many of the counted values were exactly zero (they are also in ``counts``).
    """

    counts: np.ndarray
    start: int
    width: float
    zeros: float = 0.0

    @property
    def total(self) -> float:
        """Number of values counted."""
        return float(self.counts.sum())

    @property
    def zero_index(self) -> int:
        """Local index of the bin edge at zero (the first bin of non-negative values)."""
        return -self.start

    def edge(self, index: int | np.ndarray) -> float | np.ndarray:
        """Value of local bin edge ``index`` (edge ``i`` is the lower edge of bin ``i``)."""
        return (self.start + index) * self.width

    def centers(self) -> np.ndarray:
        """Centre of every bin."""
        return (self.start + np.arange(self.counts.size) + 0.5) * self.width

    def occupied(self) -> tuple[int, int]:
        """Local (first, stop) bin indices of the non-empty bins, widened to include the zero edge."""
        nonzero = np.flatnonzero(self.counts)
        if nonzero.size == 0:
            return self.zero_index, self.zero_index
        return min(int(nonzero[0]), self.zero_index), max(int(nonzero[-1]) + 1, self.zero_index)

    def folded(self) -> Histogram:
        """The histogram of ``|x|``: bin ``g < 0`` covers ``[g w, (g + 1) w)``, so ``|x|`` is in bin ``-g - 1``."""
        grid = self.start + np.arange(self.counts.size)
        folded_index = np.where(grid >= 0, grid, -grid - 1)
        counts = np.bincount(folded_index, weights=self.counts, minlength=int(folded_index.max()) + 1)
        return Histogram(counts, 0, self.width, self.zeros)


class StreamingHistogram:
    """A histogram with ``bins`` bins whose range grows with the data (see the module docstring).

    Args:
        bins: number of bins; memory is this many float64 counts and three scalars.
    """

    def __init__(self, bins: int = 2048):
        if bins < 16:
            raise ValueError(f"a histogram needs at least 16 bins, got {bins}")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.float64)
        self.start = 0
        self.width = 0.0  # 0 until the first value
        self.zeros = 0.0
        self.low = self.high = 0.0  # smallest and largest value seen, widened to include 0

    def add(self, values: np.ndarray | torch.Tensor) -> None:
        """Count finite float64 ``values``; grow and re-bin first if they fall outside the histogram."""
        values = torch.as_tensor(values)
        if values.numel() == 0:
            return
        low, high = torch.aminmax(values)
        self.low = min(self.low, float(low))
        self.high = max(self.high, float(high))
        if self.width == 0.0:
            self.width = _fitting_width(self.low, self.high, self.bins, SMALLEST_WIDTH)
            self.start = math.floor(self.low / self.width)
        elif not self._covers(self.low, self.high):
            self._regrid(_fitting_width(self.low, self.high, self.bins, self.width))
        # Dividing by a power of two is exact, so every value lands in its exact bin.
        index = torch.floor(values / self.width).to(torch.int64) - self.start
        self.counts += torch.bincount(index, minlength=self.bins).numpy()
        self.zeros += float(torch.count_nonzero(values == 0.0))

    def snapshot(self) -> Histogram:
        """An immutable copy of the current histogram."""
        return Histogram(self.counts.copy(), self.start, self.width, self.zeros)

    def state_size(self) -> int:
        """Numbers held: the counts and five scalars (start, width, zeros, low, high)."""
        return int(self.counts.size) + 5

    def _covers(self, low: float, high: float) -> bool:
        return math.floor(low / self.width) >= self.start and math.floor(high / self.width) < self.start + self.bins

    def _regrid(self, width: float) -> None:
        """Move every bin onto the grid of ``width`` (``width / self.width`` is a power of two)."""
        shift = min(round(math.log2(width / self.width)), _LARGEST_SHIFT)
        start = math.floor(self.low / width)
        grid = self.start + np.arange(self.bins, dtype=np.int64)
        index = np.floor_divide(grid, np.int64(2) ** shift) - start
        # Bins above the data may be empty ones that now fall past the end: clip them (they add 0).
        index = np.clip(index, 0, self.bins - 1)
        self.counts = np.bincount(index, weights=self.counts, minlength=self.bins)
        self.start, self.width = start, width


def _fitting_width(low: float, high: float, bins: int, smallest: float) -> float:
    """The smallest power-of-two width, at least ``smallest``, at which ``[low, high]`` fits in ``bins``."""
    width = smallest
    if high > low:  # jump close to the answer, then double until it fits
        width = max(width, 2.0 ** math.floor(math.log2((high - low) / bins)))
    while math.floor(high / width) - math.floor(low / width) >= bins:
        width *= 2.0
    return width
