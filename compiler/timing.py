"""Timing runners side by side in one process: latency percentiles and ratios that survive a noisy host.

Runners are timed in rotation (blocks of calls of each in turn), so machine noise hits every
runner alike and the ratios between them are meaningful even on a busy host. Used by the
``benchmark`` command, by the benches, and by backends that check a latency they predicted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class LatencyStats:
    """Latency of one runner at one batch size, in milliseconds."""

    runner: str
    batch: int
    runs: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    throughput: float  # samples per second at the mean latency
    samples_ms: list[float] = field(repr=False, default_factory=list)

    def to_dict(self, with_samples: bool = False) -> dict:
        """JSON-able form (raw samples only when asked)."""
        record = asdict(self)
        if not with_samples:
            record.pop("samples_ms")
        return record


def summarize(runner: str, batch: int, seconds: Sequence[float]) -> LatencyStats:
    """Percentiles and throughput of one runner's timings."""
    values = np.asarray(seconds, dtype=np.float64) * 1e3
    mean = float(values.mean())
    return LatencyStats(
        runner=runner, batch=batch, runs=len(values), mean_ms=mean,
        p50_ms=float(np.percentile(values, 50)), p90_ms=float(np.percentile(values, 90)),
        p99_ms=float(np.percentile(values, 99)), min_ms=float(values.min()),
        throughput=batch / (mean / 1e3), samples_ms=values.tolist(),
    )


def time_side_by_side(
    runners: dict[str, Callable[[], object]],
    batch: int,
    *,
    warmup: int = 10,
    runs: int = 100,
    progress: Callable[[int], None] | None = None,
) -> list[LatencyStats]:
    """Warm every runner up, then time ``runs`` calls of each, in blocks taken in rotation.

    Blocks of about a tenth of the runs, each after a pause and an untimed call, keep one
    runtime's spinning worker threads from landing in another's timings, while drift over the
    whole run still hits every runner alike.
    """
    for runner in runners.values():
        for _ in range(warmup):
            runner()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    block = _block_size(runs)
    for start in range(0, runs, block):
        count = min(block, runs - start)
        for name, runner in runners.items():
            _settle(runner)
            for _ in range(count):
                began = time.perf_counter()
                runner()
                samples[name].append(time.perf_counter() - began)
        if progress is not None:
            progress(count)
    return [summarize(name, batch, values) for name, values in samples.items()]


def _settle(runner: Callable[[], object]) -> None:
    """Let the previous runner's worker threads stop spinning, then make one untimed call.

    ONNX Runtime's and OpenMP's thread pools spin for a while after a call; without the pause the
    runner timed next pays for the one timed before it, which skews the ratios by up to 2x.
    """
    time.sleep(0.05)
    runner()


def ratios(stats: list[LatencyStats], reference: str) -> dict[str, float]:
    """Each other runner's p50 divided by ``reference``'s, at one batch (>1: reference is faster)."""
    by_runner = {item.runner: item for item in stats}
    base = by_runner.get(reference)
    if base is None:
        return {}
    return {name: item.p50_ms / base.p50_ms for name, item in by_runner.items() if name != reference}


def _block_size(runs: int) -> int:
    """Runs per block of :func:`time_side_by_side`: about a tenth of them."""
    return max(1, runs // 10)


def block_ratios(stats: list[LatencyStats], reference: str) -> dict[str, list[float]]:
    """Per block of :func:`time_side_by_side`, each runner's median over ``reference``'s, in run order.

    Blocks are timed in rotation, so block ``i`` of two runners saw the same machine state; their
    spread says how far the overall p50 ratio can be trusted (a ratio between the smallest and the
    largest block ratio is within the noise of the run).
    """
    by_runner = {item.runner: item.samples_ms for item in stats}
    base = by_runner.get(reference)
    if base is None:
        return {}
    block = _block_size(len(base))

    def medians(samples: list[float]) -> list[float]:
        return [float(np.median(samples[start:start + block])) for start in range(0, len(samples), block)]

    base_medians = medians(base)
    return {name: [mine / theirs for mine, theirs in zip(medians(samples), base_medians, strict=True)]
            for name, samples in by_runner.items() if name != reference}
