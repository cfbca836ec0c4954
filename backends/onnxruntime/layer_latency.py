"""Measured latency of single convolutions and linear layers in ONNX Runtime, and of whole IRs.

Latency-driven pruning (``prune={"latency": r}``) needs to know what a layer costs *in time* at a
given width, which MACs do not say: ONNX Runtime's blocked (NCHWc) convolutions run a width that is
not a multiple of their block in the next block's time, and a depthwise convolution at high
resolution is bound by memory, not arithmetic. :class:`LayerTimer` builds a one-node ONNX model for
each layer shape asked (random weights, the session options the backend uses), times it, and keeps
the result in memory and in a JSON table on disk, one per CPU, ONNX Runtime version and thread
count, so each shape is measured once per machine. :meth:`LayerTimer.compare` times whole IRs side
by side (exported as the backend exports them), which is how the pruning pass checks the latency
it predicted from the table.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.fx as fx
from onnx import TensorProto, helper

from backends.onnx.export import ExportRequest, export_onnx
from backends.onnxruntime.backend import DISABLED_OPTIMIZERS, make_session, session_options
from compiler.layer_shapes import LayerShape
from compiler.timing import time_side_by_side
from models.cache import cache_dir

logger = logging.getLogger(__name__)

_MIN_RUNS = 5
_MIN_SECONDS = 0.03  # time at least this long per shape, so tiny layers are not one timer tick
_OPSET = 18


class LayerTimer:
    """Times layer shapes once per machine (memory and disk cache) and whole IRs side by side."""

    def __init__(self, threads: int = 0, table_path: Path | None = None):
        self.threads = threads
        self.table_path = table_path or _default_table_path(threads)
        self.table: dict[str, float] = _read_table(self.table_path)
        self.measured = 0  # shapes timed by this timer (the rest came from the table)
        self._dirty = False

    def seconds(self, shape: LayerShape) -> float:
        """Median seconds of one run of ``shape`` (measured on first request, then from the table)."""
        key = shape.key()
        if key not in self.table:
            self.table[key] = _time_layer(shape, self.threads)
            self.measured += 1
            self._dirty = True
        return self.table[key]

    def save(self) -> None:
        """Write the table to disk (atomically); failing to only costs re-measuring later."""
        if not self._dirty:
            return
        try:
            self.table_path.parent.mkdir(parents=True, exist_ok=True)
            descriptor, temporary = tempfile.mkstemp(dir=self.table_path.parent, suffix=".tmp")
            with os.fdopen(descriptor, "w") as handle:
                json.dump(self.table, handle)
            os.replace(temporary, self.table_path)
            self._dirty = False
        except OSError as error:
            logger.warning("could not write the layer latency table %s: %s", self.table_path.name, error)

    def compare(self, models: dict[str, fx.GraphModule], inputs: tuple[torch.Tensor, ...],
                runs: int = 30) -> dict[str, float]:
        """Median seconds per run of each IR, exported to ONNX and timed side by side in rotation."""
        runners = {}
        for name, gm in models.items():
            session = make_session(_exported(gm, inputs), "all", self.threads)
            feed = {spec.name: value.detach().numpy() for spec, value in zip(session.get_inputs(), inputs, strict=True)}
            runners[name] = _runner(session, feed)
        stats = time_side_by_side(runners, int(inputs[0].shape[0]), warmup=3, runs=runs)
        return {item.runner: item.p50_ms / 1e3 for item in stats}


def _runner(session: ort.InferenceSession, feed: dict):
    return lambda: session.run(None, feed)


def _exported(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> bytes:
    names = tuple(f"input_{index}" for index in range(len(inputs)))
    outputs = len(next(node for node in gm.graph.nodes if node.op == "output").args[0])
    request = ExportRequest(gm, inputs, names, tuple(f"output_{i}" for i in range(outputs)), {}, _OPSET)
    return export_onnx(request).SerializeToString()


def _time_layer(shape: LayerShape, threads: int) -> float:
    """Median kernel seconds of ``shape``, from ONNX Runtime's profiler.

    The layer's own kernels only: a session of one conv converts its input to the blocked (NCHWc)
    layout and back, which a conv inside a model does not pay (measured on EfficientNet-Lite0's
    first layers, the conversions doubled or tripled the time of a conv alone).
    """
    model, feed = _layer_model(shape)
    with tempfile.TemporaryDirectory() as directory:
        options = session_options("all", threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(directory) / "layer")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                       disabled_optimizers=list(DISABLED_OPTIMIZERS))
        session.run(None, feed)
        runs, started = 0, time.perf_counter()
        while runs < _MIN_RUNS or time.perf_counter() - started < _MIN_SECONDS:
            session.run(None, feed)
            runs += 1
        events = json.loads(Path(session.end_profiling()).read_text())
    return _kernel_seconds(events)


def _kernel_seconds(events: list[dict]) -> float:
    """Sum over the layer's nodes of each node's median kernel time, layout conversions left out."""
    durations: dict[str, list[float]] = {}
    for event in events:
        op = event.get("args", {}).get("op_name", "")
        kernel = event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time")
        if kernel and not op.startswith("Reorder"):
            durations.setdefault(event["name"], []).append(event["dur"] / 1e6)
    return sum(statistics.median(values[1:] or values) for values in durations.values())


def _layer_model(shape: LayerShape) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    generator = np.random.default_rng(0)
    if shape.op == "conv":
        per_group = shape.in_channels // shape.groups
        weight = generator.standard_normal((shape.out_channels, per_group, *shape.kernel), dtype=np.float32)
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=shape.groups, kernel_shape=list(shape.kernel),
                                strides=list(shape.stride), dilations=list(shape.dilation),
                                pads=[*shape.padding, *shape.padding])
        x_shape = [shape.rows, shape.in_channels, shape.height, shape.width]
    else:
        weight = generator.standard_normal((shape.out_channels, shape.in_channels), dtype=np.float32)
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
        x_shape = [shape.rows, shape.in_channels]
    bias = generator.standard_normal(shape.out_channels, dtype=np.float32)
    graph = helper.make_graph(
        [node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(weight, "w"), onnx.numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 8
    return model, {"x": generator.standard_normal(x_shape, dtype=np.float32)}


def _default_table_path(threads: int) -> Path:
    cpu = _cpu_name().replace(" ", "_").replace("/", "_")[:80] or platform.machine()
    return cache_dir() / "latency" / f"{cpu}-ort{ort.__version__}-threads{threads or os.cpu_count()}.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _read_table(path: Path) -> dict[str, float]:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {key: float(value) for key, value in table.items()} if isinstance(table, dict) else {}
