"""Clipping-range searches over a histogram: percentile, KL divergence (entropy) and MSE, for 8 bits.

Each function takes a :class:`~passes.quant.histogram.Histogram` of the observed values and
returns ``(low, high)``. Symmetric searches work on the histogram of ``|x|`` (an exact fold, since
zero is a bin edge) and return ``(-t, t)``; the observer then trims the side the data never
reached. Candidate clipping points are bin edges, so a result is exact to one bin width.

- Percentile: the value below which ``p`` percent of the observations lie, interpolated linearly
  inside its bin (the values in a bin are taken as spread evenly across it).
- Entropy: TensorRT's calibration (Migacz, "8-bit Inference with TensorRT", GTC 2017), as in
  MXNet's ``_get_optimal_threshold`` and ONNX Runtime's entropy calibrator. For each candidate
  window of at least ``levels`` bins, the reference ``P`` is the window's counts with the clipped
  tails added to its end bins, and ``Q`` is the window quantised to ``levels`` levels (each level's
  count spread evenly over the bins of ``P`` that are non-empty). The window minimising
  ``KL(P || Q)`` wins. ``Q``'s zeros are floored at ``1e-4`` counts (MXNet's smoothing), so clipped
  mass costs a finite, size-dependent penalty. Symmetric: 128 levels over ``[0, t]`` of ``|x|``.
  Asymmetric: 256 levels; the windows (two free ends) are searched along a trimming path that
  removes a bin from whichever tail has so far lost less mass, which passes through every window
  with balanced tail mass, where the optimum lies for all but pathological histograms.
  One deliberate change from TensorRT: exact zeros are left out. Every candidate grid holds zero
  exactly, so they lose nothing; kept in, the spike of a ReLU output's zeros dominates the first
  level of ``Q`` and drives the search to windows far too narrow (half-normal data clipped at 2
  sigma instead of about 4).
- MSE: the expected squared error of quantising the histogram's values, taken as spread evenly
  across each bin, onto an 8-bit grid. The grid is what a scale and zero point can express:
  ``step * [-127, 127]`` with ``step = t / 127`` (symmetric), ``step * [-z, 255 - z]`` with an
  integer zero point ``z`` (asymmetric), so zero is always on it. A value inside rounds to the
  nearest grid point: its mean squared error over a bin ``[l, r]`` has a closed form (the integral
  of the squared distance to the nearest integer is ``1/12`` per period plus a cubic), so exact
  zeros cost nothing and values much smaller than a step cost their square, not ``step**2 / 12``.
  A value outside is clipped to the grid's end; with prefix sums of ``n``, ``n*c`` and ``n*c**2``
  (``c`` the bin centres) that costs O(1) per candidate. Candidates: every upper bin edge as ``t``
  (symmetric); every span of a whole number of bins, each with all 256 zero points (asymmetric).
  A coarse pass over 256 of them and a fine pass around its minimum find the least cost (the cost
  is smooth in the clipping point at the scale of a few bins). The range is the chosen grid's ends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from passes.quant.histogram import Histogram

SYMMETRIC_LEVELS = 128  # int8 symmetric: 128 non-negative levels for |x|
ASYMMETRIC_LEVELS = 256  # 8 bits over [low, high]
STEPS = 255  # steps between the 256 levels of an 8-bit grid
SYMMETRIC_STEPS = 127  # a symmetric 8-bit grid is t / 127 * [-127, 127]
_ROWS = 128  # candidates evaluated at once by the MSE search (bounds its temporary arrays)
_COARSE = 256  # candidates of the MSE search's first, coarse pass
_SMOOTHING = 1e-4  # counts given to an empty bin of Q (MXNet's value)


def percentile_range(histogram: Histogram, percentile: float, symmetric: bool) -> tuple[float, float]:
    """The ``(100 - p, p)`` percentiles, or ``(-t, t)`` with ``t`` the ``p``-th percentile of ``|x|``."""
    fraction = percentile / 100.0
    if symmetric:
        magnitude = quantile(histogram.folded(), fraction)
        return -magnitude, magnitude
    return quantile(histogram, 1.0 - fraction), quantile(histogram, fraction)


def quantile(histogram: Histogram, fraction: float) -> float:
    """The value below which ``fraction`` of the counts lie, interpolated linearly inside its bin."""
    cumulative = np.cumsum(histogram.counts)
    target = fraction * cumulative[-1]
    index = min(int(np.searchsorted(cumulative, target, side="left")), cumulative.size - 1)
    below = cumulative[index - 1] if index > 0 else 0.0
    count = histogram.counts[index]
    inside = (target - below) / count if count > 0 else 0.0
    return float(histogram.edge(index + min(max(inside, 0.0), 1.0)))


def entropy_range(histogram: Histogram, symmetric: bool) -> tuple[float, float]:
    """The window minimising ``KL(P || Q)`` (see the module docstring)."""
    histogram = _without_zeros(histogram)
    if symmetric:
        folded = histogram.folded()
        _, stop = folded.occupied()
        windows = [(0, end) for end in range(SYMMETRIC_LEVELS, stop + 1)]
        best = _least_divergent(folded.counts, windows, SYMMETRIC_LEVELS)
        magnitude = float(folded.edge(best[1] if best else stop))
        return -magnitude, magnitude
    windows = _trimming_path(histogram, ASYMMETRIC_LEVELS)
    best = _least_divergent(histogram.counts, windows, ASYMMETRIC_LEVELS) or histogram.occupied()
    return float(histogram.edge(best[0])), float(histogram.edge(best[1]))


def _without_zeros(histogram: Histogram) -> Histogram:
    """The histogram without its exact zeros: every grid holds zero exactly, so they lose nothing."""
    counts = _rounded_counts(histogram, 0, histogram.counts.size)
    return replace(histogram, counts=np.maximum(counts, 0.0), zeros=0.0)


def _least_divergent(counts: np.ndarray, windows: list[tuple[int, int]], levels: int) -> tuple[int, int] | None:
    """The window of least divergence, or None when there is no window (too few occupied bins)."""
    if not windows:
        return None
    cumulative = np.concatenate(([0.0], np.cumsum(counts)))
    divergences = [_divergence(counts, cumulative, start, stop, levels) for start, stop in windows]
    return windows[int(np.argmin(divergences))]


def _divergence(counts: np.ndarray, cumulative: np.ndarray, start: int, stop: int, levels: int) -> float:
    """``KL(P || Q)`` for the window ``[start, stop)`` of ``counts`` quantised to ``levels`` levels."""
    window = counts[start:stop]
    reference = window.copy()
    reference[0] += cumulative[start]  # the clipped tails land on the window's end bins
    reference[-1] += cumulative[-1] - cumulative[stop]
    nonzero = reference > 0
    level = np.arange(window.size) * levels // window.size
    level_counts = np.bincount(level, weights=window, minlength=levels)
    level_bins = np.bincount(level, weights=nonzero, minlength=levels)
    quantised = np.where(nonzero, level_counts[level] / np.maximum(level_bins[level], 1.0), 0.0)
    if not quantised.any():  # the window holds nothing of its own: Q does not exist (MXNet: infinite)
        return float("inf")
    quantised = np.maximum(quantised, _SMOOTHING)
    p = reference[nonzero] / reference.sum()
    q = quantised[nonzero] / quantised[nonzero].sum()
    return float(np.sum(p * np.log(p / q)))


def _trimming_path(histogram: Histogram, minimum_bins: int) -> list[tuple[int, int]]:
    """Windows from the occupied range inward, trimming the tail that has lost less mass; zero stays inside."""
    counts, zero = histogram.counts, histogram.zero_index
    start, stop = histogram.occupied()
    left_mass = right_mass = 0.0
    windows = []
    while stop - start >= minimum_bins:
        windows.append((start, stop))
        trim_left = start < zero and (stop <= zero or left_mass + counts[start] <= right_mass + counts[stop - 1])
        if trim_left:
            left_mass += counts[start]
            start += 1
        else:
            right_mass += counts[stop - 1]
            stop -= 1
    return windows


def mse_range(histogram: Histogram, symmetric: bool) -> tuple[float, float]:
    """The range of least expected squared quantisation error (see the module docstring)."""
    if symmetric:
        magnitude = _symmetric_mse_threshold(histogram.folded())
        return -magnitude, magnitude
    return _asymmetric_mse_range(histogram)


def _symmetric_mse_threshold(folded: Histogram) -> float:
    """Best ``t`` among the upper bin edges of the histogram of ``|x|``; the grid is ``t / 127 * [-127, 127]``."""
    stop = folded.occupied()[1]
    edges = folded.edge(np.arange(stop + 1))
    moments = _prefix_moments(folded.counts[:stop], folded.centers()[:stop])
    rounded = _rounded_counts(folded, 0, stop)

    def cost(candidates: np.ndarray) -> np.ndarray:
        rows = candidates + 1  # the threshold is edges[rows]: bins below it round, bins above clip
        rounding = _rounding_error(edges, edges[rows] / SYMMETRIC_STEPS, rounded, folded.width)
        inside = np.arange(stop)[None, :] < rows[:, None]
        clipped = _clipping_cost(moments[:, -1:] - moments[:, rows], edges[rows], folded.width)
        return (rounding * inside).sum(axis=1) + clipped

    return float(edges[1 + _coarse_to_fine(stop, cost)])


def _asymmetric_mse_range(histogram: Histogram) -> tuple[float, float]:
    """Best 8-bit grid ``step * [-z, 255 - z]`` over steps ``k * width / 255`` and zero points ``z``."""
    first, stop = histogram.occupied()
    edges, centers = histogram.edge(np.arange(first, stop + 1)), histogram.centers()[first:stop]
    moments = _prefix_moments(histogram.counts[first:stop], centers)
    rounded = _rounded_counts(histogram, first, stop)
    zero_points = np.arange(STEPS + 1, dtype=np.float64)
    steps = np.arange(1, stop - first + 3) * histogram.width / STEPS  # spans of 1 .. all + 2 bins

    def grid_costs(step: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rounding = np.cumsum(_rounding_error(edges, step, rounded, histogram.width), axis=1)
        rounding = np.concatenate((np.zeros((step.size, 1)), rounding), axis=1)
        lows, highs = -zero_points[None, :] * step[:, None], (STEPS - zero_points)[None, :] * step[:, None]
        below, above = np.searchsorted(centers, lows, "left"), np.searchsorted(centers, highs, "right")
        cost = np.take_along_axis(rounding, above, 1) - np.take_along_axis(rounding, below, 1)
        cost += _clipping_cost(moments[:, below], lows, histogram.width)
        cost += _clipping_cost(moments[:, -1:, None] - moments[:, above], highs, histogram.width)
        return cost, lows, highs

    best = _coarse_to_fine(steps.size, lambda rows: grid_costs(steps[rows])[0].min(axis=1))
    cost, lows, highs = grid_costs(steps[best : best + 1])
    zero_point = int(np.argmin(cost[0]))
    return float(lows[0, zero_point]), float(highs[0, zero_point])


def _coarse_to_fine(count: int, cost: Callable[[np.ndarray], np.ndarray]) -> int:
    """Index in ``0 .. count - 1`` of least cost: every ``stride``-th candidate, then all near the best.

    The MSE is a smooth function of the clipping point at the scale of a few bins, so the fine pass
    over the neighbourhood of the coarse minimum finds the minimum of all candidates.
    """
    stride = max(1, count // _COARSE)
    coarse = np.arange(0, count, stride)
    best = int(coarse[int(np.argmin(_in_chunks(cost, coarse)))])
    fine = np.arange(max(0, best - stride + 1), min(count, best + stride))
    return int(fine[int(np.argmin(_in_chunks(cost, fine)))])


def _in_chunks(cost: Callable[[np.ndarray], np.ndarray], candidates: np.ndarray) -> np.ndarray:
    """``cost`` of ``candidates``, ``_ROWS`` at a time (bounds the temporary arrays)."""
    return np.concatenate([cost(candidates[index : index + _ROWS]) for index in range(0, candidates.size, _ROWS)])


def _rounded_counts(histogram: Histogram, first: int, stop: int) -> np.ndarray:
    """Counts of bins ``first..stop`` that round: exact zeros are on every grid and never do."""
    counts = histogram.counts[first:stop].copy()
    if first <= histogram.zero_index < stop:
        counts[histogram.zero_index - first] -= histogram.zeros
    return counts


def _rounding_error(edges: np.ndarray, steps: np.ndarray, counts: np.ndarray, width: float) -> np.ndarray:
    """Row per step, column per bin: ``counts`` times the mean of ``(x - step * round(x / step))**2``.

    ``x`` is uniform in its bin, so the mean is ``step**3 * (S(r / step) - S(l / step)) / width``
    with ``S`` the integral of the squared distance to the nearest integer.
    """
    integral = _sawtooth_integral(edges[None, :] / steps[:, None])
    return steps[:, None] ** 3 * np.diff(integral, axis=1) / width * counts[None, :]


def _sawtooth_integral(u: np.ndarray) -> np.ndarray:
    """``S(u)``: the integral of ``(v - round(v))**2`` from ``-1/2`` to ``u`` (``1/12`` per period)."""
    periods = np.floor(u + 0.5)
    remainder = u - periods  # in [-1/2, 1/2)
    return periods / 12.0 + (remainder**3 + 0.125) / 3.0


def _prefix_moments(counts: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Row ``p``, column ``i``: the sum over bins before ``i`` of ``counts * centers**p`` (p = 0, 1, 2)."""
    terms = np.stack([counts * centers**power for power in range(3)])
    return np.concatenate((np.zeros((3, 1)), np.cumsum(terms, axis=1)), axis=1)


def _clipping_cost(moments: np.ndarray, edges: np.ndarray, width: float) -> np.ndarray:
    """Squared error of moving the values with these moments onto ``edges``: ``sum n (c - e)**2``.

    The ``width**2 / 12`` per value is the spread of values around their bin's centre.
    """
    count, first, second = moments
    return second - 2.0 * edges * first + edges**2 * count + count * width**2 / 12.0
