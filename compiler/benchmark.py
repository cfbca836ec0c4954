"""Inference benchmarking: latency percentiles, throughput and memory, side by side in one process.

Runners are timed in rotation (one call of each per round), so machine noise hits every runner
alike and the ratios between them are meaningful even on a busy host.
"""

from __future__ import annotations

import os
import resource
import sys
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
    """Warm every runner up, then time ``runs`` rounds of one call each, in rotation."""
    for runner in runners.values():
        for _ in range(warmup):
            runner()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(runs):
        for name, runner in runners.items():
            started = time.perf_counter()
            runner()
            samples[name].append(time.perf_counter() - started)
        if progress is not None:
            progress(1)
    return [summarize(name, batch, values) for name, values in samples.items()]


def ratios(stats: list[LatencyStats], reference: str) -> dict[str, float]:
    """p50 of ``reference`` divided by each other runner's p50 at the same batch (>1: faster)."""
    by_runner = {item.runner: item for item in stats}
    base = by_runner.get(reference)
    if base is None:
        return {}
    return {name: item.p50_ms / base.p50_ms for name, item in by_runner.items() if name != reference}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def thread_settings(onnxruntime_threads: int) -> dict[str, object]:
    """Everything that decides how many threads the runners use."""
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "onnxruntime_intra_op_threads": onnxruntime_threads or "default (one per physical core)",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
