"""Helpers shared by the benchmark scripts: sessions, interleaved timing, table output."""

from __future__ import annotations

import contextlib
import io
import statistics
import time

import numpy as np
import onnxruntime as ort
import torch


def session(model_bytes: bytes, threads: int = 0) -> ort.InferenceSession:
    """A CPU session with all graph optimisations, as a deployment would open it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def feed(sess: ort.InferenceSession, inputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    """Inputs by the session's input names, in order."""
    return {spec.name: tensor.numpy() for spec, tensor in zip(sess.get_inputs(), inputs, strict=True)}


def plain_export(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> bytes:
    """What a user gets from a plain ``torch.onnx.export`` (dynamo exporter, its defaults)."""
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(model, inputs, dynamo=True)
    return program.model_proto.SerializeToString()


def interleaved_medians(runners: dict[str, callable], runs: int, warmup: int = 5) -> dict[str, float]:
    """Median seconds per call of each runner, timed alternately so drift hits all alike."""
    for runner in runners.values():
        for _ in range(warmup):
            runner()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(runs):
        for name, runner in runners.items():
            started = time.perf_counter()
            runner()
            samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in samples.items()}


def table(rows: list[list[str]], header: list[str]) -> str:
    """Fixed-width text table."""
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)
