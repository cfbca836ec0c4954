"""Inference benchmarking: latency percentiles, throughput and memory, side by side in one process.

Runners are timed in rotation (one call of each per round), so machine noise hits every runner
alike and the ratios between them are meaningful even on a busy host.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable, Sequence

import numpy as np

from compiler.timing import LatencyStats, block_ratios, ratios, summarize, time_side_by_side

__all__ = ["LatencyStats", "block_ratios", "ratios", "summarize", "time_side_by_side"]


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


def _sessions_for(workload, inputs: tuple, compare: bool, threads: int) -> dict[str, Callable[[], object]]:
    """The runners to time: fxpress's ONNX model, and with ``compare`` two baselines.

    The baselines are eager PyTorch and a plain ``torch.onnx.export`` of the same model (at this
    batch, static shapes: its strongest form) in ONNX Runtime.
    """
    import torch

    from backends.onnxruntime import make_session

    workload.compiled.check_inputs(inputs)  # a size the artifact does not accept is an InputError (exit 2)
    ours = make_session(workload.compiled.onnx, "all", threads)
    ours_feed = _feed(ours, inputs)
    runners = {"fxpress": lambda: ours.run(None, ours_feed)}
    if compare:
        model = workload.source.model
        plain = make_session(plain_export(model, inputs), "all", threads)
        plain_feed = _feed(plain, inputs)

        def eager() -> object:
            with torch.no_grad():
                return model(*inputs)

        runners["eager"] = eager
        runners["onnxruntime"] = lambda: plain.run(None, plain_feed)
    return runners


def _feed(session, inputs: tuple) -> dict[str, np.ndarray]:
    return {spec.name: tensor.numpy() for spec, tensor in zip(session.get_inputs(), inputs, strict=True)}


def plain_export(model, inputs: tuple) -> bytes:
    """What a user gets from a plain ``torch.onnx.export`` (dynamo exporter, its defaults)."""
    import contextlib
    import io

    import torch

    from compiler.quiet import quiet_torch

    with quiet_torch(), contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(model, inputs, dynamo=True)
    return program.model_proto.SerializeToString()


def run_benchmark(workload, batches: Sequence[int], *, runs: int, warmup: int, compare: bool, threads: int,
                  progress: Callable[[int], None] | None = None) -> dict:
    """Latency and throughput of every runner at every batch size, with ratios and memory."""
    import torch

    from compiler.errors import UsageError

    if compare and workload.source is None:
        raise UsageError("--compare needs the original model: pass --model NAME (a zoo name or file.py:factory)")
    if threads:
        torch.set_num_threads(threads)
    results, comparisons = [], []
    for batch in batches:
        inputs = workload.inputs(batch)
        stats = time_side_by_side(_sessions_for(workload, inputs, compare, threads), batch,
                                  warmup=warmup, runs=runs, progress=progress)
        results += stats
        comparisons.append({"batch": batch, "speedup_vs": ratios(stats, "fxpress")})
    return {
        "model": workload.name, "runs": runs, "warmup": warmup,
        "results": [item.to_dict() for item in results], "comparisons": comparisons,
        "peak_rss_mb": peak_rss_mb(), "threads": thread_settings(threads),
        "samples_ms": {f"{item.runner}@{item.batch}": item.samples_ms for item in results},
    }


def render_benchmark(report: dict) -> str:
    """The benchmark as a text table, then the ratios."""
    header = ["runner", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "samples/s"]
    rows = [[r["runner"], str(r["batch"]), f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}",
             f"{r['mean_ms']:.2f}", f"{r['throughput']:.1f}"] for r in report["results"]]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    lines = [f"fxpress bench: {report['model']}, {report['runs']} timed runs after {report['warmup']} warm-up"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
              for row in [header, ["-" * w for w in widths], *rows]]
    for comparison in report["comparisons"]:
        for name, speedup in comparison["speedup_vs"].items():
            lines.append(f"batch {comparison['batch']}: fxpress is {speedup:.2f}x the speed of {name} (p50 ratio)")
    threads = report["threads"]
    lines.append(f"peak RSS {report['peak_rss_mb']:.0f} MiB; torch threads {threads['torch_threads']}, "
                 f"onnxruntime intra-op threads {threads['onnxruntime_intra_op_threads']}")
    return "\n".join(lines)


def plot_benchmark(report: dict, path: str) -> None:
    """The latency distributions: an HTML page with inline SVG charts when ``path`` ends in ``.html``, else a PNG."""
    if path.lower().endswith((".html", ".htm")):
        _write_latency_page(report, path)
    else:
        _plot_png(report, path)


def _write_latency_page(report: dict, path: str) -> None:
    """A self-contained page (no matplotlib needed): every run as a dot, box, median, and the percentile table."""
    from compiler.errors import UsageError
    from compiler.report_html import render_latency_html

    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(render_latency_html(report))
    except OSError as error:
        raise UsageError(f"--plot: cannot write {path}: {error.strerror}; choose a writable path") from error


def _plot_png(report: dict, path: str) -> None:
    """Box plots of the latency distributions, one panel per batch size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        from compiler.errors import UsageError

        raise UsageError("--plot needs matplotlib: pip install 'fxpress[plot]'") from error
    batches = sorted({item["batch"] for item in report["results"]})
    figure, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for axis, batch in zip(axes[0], batches, strict=True):
        names = [item["runner"] for item in report["results"] if item["batch"] == batch]
        axis.boxplot([report["samples_ms"][f"{name}@{batch}"] for name in names], tick_labels=names)
        axis.set_title(f"{report['model']}, batch {batch}")
        axis.set_yscale("log")  # outliers of one runner must not flatten the others' boxes
        axis.set_ylabel("latency (ms, log scale)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
