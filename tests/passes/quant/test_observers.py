"""Observers: exact MinMax, bounded memory, batching-independent histograms, and clipping ranges that
do what each method promises (percentile like numpy's, KL and MSE clip outliers but not uniform data,
MSE as good as a brute-force search of real fake-quantisation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compiler.errors import TargetError
from passes.quant.observers import (
    MINIMUM_WIDTH,
    OBSERVERS,
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    PerChannelMinMaxObserver,
    make_observer,
    widen_range,
)

ALL_SETTINGS = [
    ("minmax", {}),
    ("percentile", {}),
    ("percentile", {"symmetric": True}),
    ("entropy", {}),
    ("entropy", {"symmetric": True}),
    ("mse", {}),
    ("mse", {"symmetric": True}),
]
IDS = [f"{name}{'-symmetric' if options else ''}" for name, options in ALL_SETTINGS]
CLIPPING = [setting for setting in ALL_SETTINGS if setting[0] in ("entropy", "mse")]
CLIPPING_IDS = [f"{name}{'-symmetric' if options else ''}" for name, options in CLIPPING]


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _observed(name: str, options: dict, data: torch.Tensor, batch: int = 10_000):
    observer = make_observer(name, **options)
    for chunk in data.split(batch):
        observer.observe(chunk)
    return observer


def _quantisation_mse(values: np.ndarray, lows: np.ndarray, highs: np.ndarray, symmetric: bool) -> np.ndarray:
    """MSE of real 8-bit quantise-dequantise of ``values`` for each range: ``t / 127 * [-127, 127]``
    (symmetric) or ``step * [-z, 255 - z]`` with ``z = round(-low / step)``."""
    values = values[None, :]
    if symmetric:
        step = (np.maximum(-lows, highs) / 127)[:, None]
        levels = np.clip(np.round(values / step), -127, 127)
    else:
        step = ((highs - lows) / 255)[:, None]
        zero_point = np.round(-lows[:, None] / step)
        levels = np.clip(np.round(values / step) + zero_point, 0, 255) - zero_point
    return ((values - levels * step) ** 2).mean(axis=1)


# --- MinMax and the range rules --------------------------------------------------------------


def test_minmax_is_exact_and_includes_zero():
    data = torch.randn(5000, generator=_generator()) * 3 + 1
    observer = _observed("minmax", {}, data, batch=77)
    assert observer.range() == (float(data.min()), float(data.max()))
    positive = MinMaxObserver()
    positive.observe(torch.tensor([2.0, 5.0]))
    assert positive.range() == (0.0, 5.0)


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (0.0, 0.0, (0.0, MINIMUM_WIDTH)),
        (0.5, 0.5, (0.0, 0.5)),
        (-2.0, -2.0, (-2.0, 0.0)),
        (0.0, 1e-12, (0.0, MINIMUM_WIDTH)),
        (-1e-12, 0.0, (-MINIMUM_WIDTH, 0.0)),
        (-1e-12, 1e-12, (-MINIMUM_WIDTH, MINIMUM_WIDTH)),
        (-3.0, 4.0, (-3.0, 4.0)),
    ],
)
def test_widen_range_includes_zero_and_never_gives_a_zero_width(low, high, expected):
    assert widen_range(low, high) == expected


@pytest.mark.parametrize(("name", "options"), ALL_SETTINGS, ids=IDS)
@pytest.mark.parametrize("value", [0.0, 0.5, -2.0])
def test_constant_input_gives_a_non_zero_range(name, options, value):
    observer = make_observer(name, **options)
    for batch in range(3):
        observer.observe(torch.full((batch + 1, 7), value))
    low, high = observer.range()
    assert low <= 0.0 <= high and high - low >= MINIMUM_WIDTH
    if value == 0.0:
        assert (low, high) == (0.0, MINIMUM_WIDTH)
    else:  # the constant itself is covered to within a bin of the histogram (or exactly)
        assert min(low, high, key=abs) == 0.0 and max(abs(low), abs(high)) == pytest.approx(abs(value), rel=1e-3)


@pytest.mark.parametrize(("name", "options"), ALL_SETTINGS, ids=IDS)
def test_range_before_any_observation_is_a_clear_value_error(name, options):
    observer = make_observer(name, **options)
    with pytest.raises(ValueError, match="observed no finite value"):
        observer.range()
    observer.observe(torch.tensor([float("nan"), float("inf")]))
    with pytest.raises(ValueError, match="2 non-finite skipped"):
        observer.range()


@pytest.mark.parametrize(("name", "options"), ALL_SETTINGS, ids=IDS)
def test_non_finite_values_are_skipped_and_counted(name, options):
    observer = make_observer(name, **options)
    observer.observe(torch.tensor([1.0, float("nan"), -3.0, float("-inf"), float("inf"), 2.0]))
    assert observer.non_finite == 3 and observer.count == 3
    low, high = observer.range()
    assert -3.0 <= low < 0.0 < high <= 2.0


# --- bounded memory, any shape, any batching ---------------------------------------------------


@pytest.mark.parametrize(("name", "options"), ALL_SETTINGS, ids=IDS)
def test_state_does_not_grow_with_the_number_of_observations(name, options):
    generator = _generator()
    few, many = make_observer(name, **options), make_observer(name, **options)
    for observer, batches in ((few, 10), (many, 2_000)):
        for index in range(batches):  # the range keeps growing, so the histogram keeps re-binning
            observer.observe(torch.randn(16, generator=generator) * (1 + index))
    assert few.state_size() == many.state_size()
    if isinstance(many, HistogramObserver):
        assert many.histogram().counts.size == 2048
        assert many.histogram().total == many.count == 2_000 * 16


def test_histogram_keeps_its_bins_after_ten_thousand_batches():
    generator = _generator()
    ten, ten_thousand = HistogramObserver(bins=512), HistogramObserver(bins=512)
    for observer, batches in ((ten, 10), (ten_thousand, 10_000)):
        for _ in range(batches):
            observer.observe(torch.randn(8, generator=generator))
    assert ten.state_size() == ten_thousand.state_size()
    assert ten.histogram().counts.size == ten_thousand.histogram().counts.size == 512


def test_histogram_is_exactly_the_histogram_of_all_values_on_its_grid():
    data = torch.cat([torch.randn(3000, generator=_generator()), torch.tensor([40.0, -7.5])])
    observer = HistogramObserver(bins=256)
    for chunk in data.split(100):  # the outliers come last: every earlier count is re-binned
        observer.observe(chunk)
    histogram = observer.histogram()
    values = data.double().numpy()
    expected = np.bincount((np.floor(values / histogram.width) - histogram.start).astype(int), minlength=256)
    assert np.array_equal(histogram.counts, expected)
    assert np.log2(histogram.width) == int(np.log2(histogram.width))  # a power of two
    assert histogram.edge(0) <= values.min() and values.max() < histogram.edge(256)
    half = histogram.width / 2  # the width is the smallest that fits: at half of it the values need more bins
    assert np.floor(values.max() / half) - np.floor(min(values.min(), 0.0) / half) >= 256


@pytest.mark.parametrize(("name", "options"), ALL_SETTINGS, ids=IDS)
def test_one_batch_or_many_in_any_order_gives_the_same_range(name, options):
    generator = _generator()
    data = torch.cat([torch.randn(20_000, generator=generator), torch.rand(5_000, generator=generator) * 9])
    whole = _observed(name, options, data, batch=data.numel())
    pieces = make_observer(name, **options)
    shuffled = data[torch.randperm(data.numel(), generator=generator)]
    sizes = torch.randint(1, 200, (100,), generator=generator).tolist()
    for chunk in shuffled.split(sizes + [data.numel() - sum(sizes)]):
        pieces.observe(chunk)
    assert pieces.range() == whole.range()
    if isinstance(whole, HistogramObserver):
        assert np.array_equal(pieces.histogram().counts, whole.histogram().counts)


@pytest.mark.parametrize(("name", "options"), ALL_SETTINGS, ids=IDS)
def test_variable_batch_and_sequence_lengths_are_accepted(name, options):
    generator = _generator()
    observer = make_observer(name, **options)
    shapes = [(1, 5, 16), (4, 33, 16), (2, 128, 16), (7, 1, 16), (3, 64)]
    for shape in shapes:
        observer.observe(torch.randn(shape, generator=generator))
    low, high = observer.range()
    assert observer.count == sum(int(np.prod(shape)) for shape in shapes)
    assert -6.0 < low < -1.0 and 1.0 < high < 6.0


def test_integer_and_half_tensors_are_observed_as_values():
    observer = MinMaxObserver()
    observer.observe(torch.tensor([[3, -4]], dtype=torch.int64))
    observer.observe(torch.tensor([7.5], dtype=torch.bfloat16))
    assert observer.range() == (-4.0, 7.5)
    with pytest.raises(TypeError, match="takes a tensor"):
        observer.observe([1.0, 2.0])


# --- what each clipping method promises --------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("percentile", [99.0, 99.9, 99.99])
def test_percentile_matches_numpy_within_a_bin_width(percentile, symmetric):
    data = torch.randn(200_000, generator=_generator()) * 2 + 0.5
    observer = PercentileObserver(percentile=percentile, symmetric=symmetric)
    for chunk in data.split(9_999):
        observer.observe(chunk)
    width = observer.histogram().width
    low, high = observer.range()
    values = data.double().numpy()
    if symmetric:
        assert high == pytest.approx(np.percentile(np.abs(values), percentile), abs=width)
        assert low == -high
    else:
        assert high == pytest.approx(np.percentile(values, percentile), abs=width)
        assert low == pytest.approx(np.percentile(values, 100 - percentile), abs=width)


def test_percentile_interpolates_inside_its_bin():
    """Within a bin the values are taken as spread evenly: on smooth data that is far better than a bin edge."""
    data = torch.randn(200_000, generator=_generator()) * 2 + 0.5
    values = data.double().numpy()
    errors = []
    for percentile in (99.0, 99.5, 99.9, 99.99):
        observer = PercentileObserver(percentile=percentile)
        observer.observe(data)
        low, high = observer.range()
        width = observer.histogram().width
        errors += [abs(high - np.percentile(values, percentile)) / width,
                   abs(low - np.percentile(values, 100 - percentile)) / width]
    assert np.mean(errors) < 0.3


@pytest.mark.parametrize(("name", "options"), CLIPPING, ids=CLIPPING_IDS)
def test_heavy_outliers_are_clipped_and_the_bulk_is_kept(name, options):
    """N(0, 1) plus a few values of 1000: the range ends far below 1000 and holds the bulk.

    KL ignores how far clipped values move, so it clips five outliers in 100,000; its narrowest
    window is one bin per level (here 0.5 wide: 64 for 128 levels, 128 for 256). MSE weighs the
    clipping error (1000 - t)**2 of each outlier against the rounding error of every other value,
    so it clips only when outliers are rarer: one in four million.
    """
    generator = _generator()
    count, outliers = (100_000, 5) if name == "entropy" else (4_000_000, 1)
    data = torch.cat([torch.randn(count, generator=generator), torch.full((outliers,), 1000.0)])
    low, high = _observed(name, options, data[torch.randperm(data.numel(), generator=generator)]).range()
    assert 3.0 < high < 200.0 and low < -3.0
    bulk = data[data.abs() < 1000]
    assert float(((bulk >= low) & (bulk <= high)).float().mean()) > 0.999


@pytest.mark.parametrize(("name", "options"), CLIPPING + [("percentile", {})], ids=CLIPPING_IDS + ["percentile"])
def test_uniform_data_keeps_nearly_its_full_range(name, options):
    data = torch.rand(200_000, generator=_generator()) * 2 - 1
    low, high = _observed(name, options, data).range()
    assert low == pytest.approx(-1.0, abs=0.01) and high == pytest.approx(1.0, abs=0.01)


DISTRIBUTIONS = {
    "normal": lambda generator: torch.randn(5_000, generator=generator),
    "relu": lambda generator: torch.relu(torch.randn(5_000, generator=generator)),
    "skewed": lambda generator: torch.cat(
        [torch.randn(2_500, generator=generator) * 0.1, torch.rand(2_500, generator=generator) * 6]),
    "outliers": lambda generator: torch.cat([torch.randn(5_000, generator=generator), torch.tensor([40.0])]),
}


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("distribution", sorted(DISTRIBUTIONS))
def test_mse_range_is_as_good_as_a_brute_force_search(distribution, symmetric):
    """The MSE of real 8-bit fake-quantisation with our range is no worse than the best of a grid search."""
    data = DISTRIBUTIONS[distribution](_generator())
    low, high = _observed("mse", {"symmetric": symmetric}, data).range()
    values = data.double().numpy()
    smallest, largest = min(values.min(), 0.0), max(values.max(), 0.0)
    if symmetric:
        highs = np.linspace(max(-smallest, largest) / 300, max(-smallest, largest), 300)
        lows = -highs
    else:
        grids = np.meshgrid(np.linspace(smallest, 0.0, 20), np.linspace(0.0, largest, 81)[1:])
        lows, highs = (grid.ravel() for grid in grids)
    best = _quantisation_mse(values, lows, highs, symmetric).min()
    ours = _quantisation_mse(values, np.array([low]), np.array([high]), symmetric)[0]
    assert ours <= best * 1.01


@pytest.mark.parametrize("symmetric", [False, True])
def test_entropy_is_not_fooled_by_the_zeros_of_a_relu(symmetric):
    """Exact zeros are on every grid: they must not pull the KL search to a narrow window."""
    data = torch.relu(torch.randn(100_000, generator=_generator()))
    low, high = _observed("entropy", {"symmetric": symmetric}, data).range()
    assert low == 0.0 and high > 3.0


def test_symmetric_searches_give_a_symmetric_range_when_both_signs_reach_it():
    data = torch.randn(50_000, generator=_generator())
    for name in ("percentile", "entropy", "mse"):
        low, high = _observed(name, {"symmetric": True}, data).range()
        assert low == -high, name


# --- per-channel and the factory ---------------------------------------------------------------


def test_per_channel_minmax_is_exact_per_channel_and_widens_zero_channels():
    weight = torch.randn(4, 3, 5, 5, generator=_generator())
    weight[2] = 0.0
    weight[3] = weight[3].abs() + 0.1
    observer = PerChannelMinMaxObserver(axis=0)
    observer.observe(weight)
    low, high = observer.range()
    assert low.dtype == high.dtype == torch.float32 and low.shape == high.shape == (4,)
    expected_low = weight.flatten(1).amin(1).clamp(max=0.0)
    expected_high = weight.flatten(1).amax(1).clamp(min=0.0)
    assert torch.equal(low[[0, 1, 3]], expected_low[[0, 1, 3]])
    assert torch.equal(high[[0, 1, 3]], expected_high[[0, 1, 3]])
    assert (low[2].item(), high[2].item()) == (0.0, MINIMUM_WIDTH)
    assert low[3].item() == 0.0


def test_per_channel_accepts_any_axis_and_varying_other_dimensions():
    generator = _generator()
    observer = PerChannelMinMaxObserver(axis=-1)
    first, second = torch.randn(2, 7, 3, generator=generator), torch.randn(5, 1, 3, generator=generator) * 10
    observer.observe(first)
    observer.observe(second)
    both = torch.cat([first.reshape(-1, 3), second.reshape(-1, 3)])
    assert torch.equal(observer.range()[1], both.amax(0).clamp(min=0).float())
    assert observer.state_size() == 2 + 2 * 3
    with pytest.raises(ValueError, match="4 channels along axis -1; earlier tensors had 3"):
        observer.observe(torch.randn(2, 4))
    with pytest.raises(ValueError, match="observed nothing"):
        PerChannelMinMaxObserver().range()


def test_make_observer_builds_each_known_observer_with_its_options():
    assert sorted(OBSERVERS) == ["entropy", "minmax", "mse", "percentile"]
    assert type(make_observer("minmax")) is MinMaxObserver
    assert type(make_observer("entropy", symmetric=True)) is EntropyObserver
    mse = make_observer("mse", bins=4096)
    assert type(mse) is MSEObserver and mse.histogram().counts.size == 4096
    percentile = make_observer("percentile", percentile=99.9)
    assert percentile.options == {"bins": 2048, "percentile": 99.9, "symmetric": False}


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("kl", {}, "unknown observer 'kl'; known observers: entropy, minmax, mse, percentile"),
        ("minmax", {"bins": 10}, "observer 'minmax' has no option(s) bins; its options: none"),
        ("percentile", {"percentile": 30}, "observer 'percentile': percentile must be in (50, 100], got 30"),
        ("entropy", {"bins": 256}, "observer 'entropy': the entropy observer needs at least 1024 bins"),
        ("mse", {"symetric": True}, "observer 'mse' has no option(s) symetric; its options: symmetric, bins"),
    ],
)
def test_make_observer_refuses_unknown_names_and_options_with_a_target_error(name, options, message):
    with pytest.raises(TargetError) as error:
        make_observer(name, **options)
    assert message in str(error.value)
