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

``precision="int8"`` times what ``cpu-int8`` runs instead: each layer wrapped in the QDQ pattern ONNX
Runtime fuses into ``QLinearConv``/``QGemm`` (uint8 activations, int8 per-channel weights, int32
bias), only the integer kernel counted; whole IRs are quantised with ONNX Runtime's own
``quantize_static`` before they are compared. Integer kernels scale differently from float ones:
measured on EfficientNet-Lite0 at batch 16, a uniform -30% MAC cut ran the float model at 0.74x and
the int8 model at 0.82x. Timed alone, int8 layers come near their time inside the model: a 1x1 conv
16->96 at 112x112 took 2.4-3.0 ms alone (two runs) and 2.36 ms inside it, a depthwise 3x3 stride 2
at 96 channels 1.85-2.67 ms alone and 1.87 inside. An int8 target needs its own table.
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
from backends.onnxruntime.backend import make_session
from compiler.layer_shapes import LayerShape
from compiler.quiet import quiet_torch
from compiler.timing import time_side_by_side
from models.cache import cache_dir

logger = logging.getLogger(__name__)

_MIN_RUNS = 5
_MIN_SECONDS = 0.03  # time at least this long per shape, so tiny layers are not one timer tick
_OPSET = 18
PRECISIONS = ("float32", "int8")
_NOT_THE_LAYER = ("Reorder", "Transpose", "QuantizeLinear", "DequantizeLinear")  # layout and (de)quantisation


class LayerTimer:
    """Times layer shapes once per machine (memory and disk cache) and whole IRs side by side.

    ``precision`` is ``"float32"`` (float kernels) or ``"int8"`` (ONNX Runtime's integer kernels);
    each has its own table.
    """

    def __init__(self, threads: int = 0, table_path: Path | None = None, precision: str = "float32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.threads, self.precision = threads, precision
        self.table_path = table_path or _default_table_path(threads, precision)
        self.table: dict[str, float] = _read_table(self.table_path)
        self.measured = 0  # shapes timed by this timer (the rest came from the table)
        self._dirty = False

    def seconds(self, shape: LayerShape) -> float:
        """Median seconds of one run of ``shape`` (measured on first request, then from the table)."""
        key = shape.key()
        if key not in self.table:
            self.table[key] = _time_layer(shape, self.threads, self.precision)
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
        """Median seconds per run of each IR, exported to ONNX (int8: quantised) and timed side by side."""
        runners = {}
        for name, gm in models.items():
            model = _exported(gm, inputs)
            if self.precision == "int8":
                model = _quantized(model, inputs)
            session = make_session(model, "all", self.threads)
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


def _quantized(model: bytes, inputs: tuple[torch.Tensor, ...]) -> bytes:
    """``model`` in QDQ int8 by ONNX Runtime's ``quantize_static`` (per-channel, min-max on ``inputs``).

    Only for timing: its placement differs from cpu-int8's (no float layers), its kernels do not.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    names = [value.name for value in onnx.load_from_string(model).graph.input]

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{name: value.detach().numpy() for name, value in zip(names, inputs, strict=True)}])

        def get_next(self):
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory() as directory, quiet_torch(("root",)):
        source, target = Path(directory) / "float.onnx", Path(directory) / "int8.onnx"
        source.write_bytes(model)
        quantize_static(source, target, _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return target.read_bytes()


def _time_layer(shape: LayerShape, threads: int, precision: str) -> float:
    """Median kernel seconds of ``shape``, from ONNX Runtime's profiler.

    The layer's own kernels only: a session of one conv converts its input to the blocked (NCHWc)
    layout and back, which a conv inside a model does not pay (measured on EfficientNet-Lite0's
    first layers, the conversions doubled or tripled the time of a conv alone).
    """
    model, feed = _layer_model(shape, precision)
    with tempfile.TemporaryDirectory() as directory:
        session = make_session(model, "all", threads, profile_prefix=str(Path(directory) / "layer"))
        session.run(None, feed)
        runs, started = 0, time.perf_counter()
        while runs < _MIN_RUNS or time.perf_counter() - started < _MIN_SECONDS:
            session.run(None, feed)
            runs += 1
        events = json.loads(Path(session.end_profiling()).read_text())
    return _kernel_seconds(events)


def _kernel_seconds(events: list[dict]) -> float:
    """Sum over the layer's nodes of each node's median kernel time, without layout changes or (de)quantising.

    Inside a model, int8 layers pass int8 tensors to each other in the channels-last layout.
    """
    durations: dict[str, list[float]] = {}
    for event in events:
        op = event.get("args", {}).get("op_name", "")
        kernel = event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time")
        if kernel and not op.startswith(_NOT_THE_LAYER):
            durations.setdefault(event["name"], []).append(event["dur"] / 1e6)
    return sum(statistics.median(values[1:] or values) for values in durations.values())


def _layer_model(shape: LayerShape, precision: str = "float32") -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A one-layer model of ``shape`` (random weights) and its input; int8: in the QDQ pattern ONNX Runtime fuses."""
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
    nodes, initializers = [node], [onnx.numpy_helper.from_array(weight, "w"), onnx.numpy_helper.from_array(bias, "b")]
    if precision == "int8":
        nodes, initializers = _qdq_wrapped(node, weight, bias)
    graph = helper.make_graph(
        nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 8
    return model, {"x": generator.standard_normal(x_shape, dtype=np.float32)}


def _qdq_wrapped(node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray):
    """``node`` between Q/DQ pairs: uint8 input and output, int8 per-channel weight, int32 bias, as cpu-int8 emits."""
    from_array = onnx.numpy_helper.from_array
    x_scale, w_scale = 0.05, np.abs(weight).reshape(len(weight), -1).max(1) / 127
    initializers = [
        from_array(np.clip(np.round(weight / w_scale.reshape(-1, *[1] * (weight.ndim - 1))), -127, 127)
                   .astype(np.int8), "w_q"),
        from_array(w_scale.astype(np.float32), "w_scale"), from_array(np.zeros(len(weight), np.int8), "w_zero"),
        from_array(np.round(bias / (x_scale * w_scale)).astype(np.int32), "b_q"),
        from_array((x_scale * w_scale).astype(np.float32), "b_scale"),
        from_array(np.zeros(len(weight), np.int32), "b_zero"),
        from_array(np.array(x_scale, np.float32), "a_scale"), from_array(np.array(128, np.uint8), "a_zero"),
    ]
    dequantized = helper.make_node(node.op_type, ["x_dq", "w", "b"], ["y_float"], name="layer")
    dequantized.attribute.extend(node.attribute)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zero"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "a_scale", "a_zero"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=0),
        helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zero"], ["b"], axis=0),
        dequantized,
        helper.make_node("QuantizeLinear", ["y_float", "a_scale", "a_zero"], ["y_q"]),
        helper.make_node("DequantizeLinear", ["y_q", "a_scale", "a_zero"], ["y"]),
    ]
    return nodes, initializers


def _default_table_path(threads: int, precision: str) -> Path:
    cpu = _cpu_name().replace(" ", "_").replace("/", "_")[:80] or platform.machine()
    kind = "" if precision == "float32" else f"-{precision}"
    return cache_dir() / "latency" / f"{cpu}-ort{ort.__version__}-threads{threads or os.cpu_count()}{kind}.json"


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
