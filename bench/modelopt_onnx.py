"""NVIDIA ModelOpt ONNX int8 PTQ on CPU: the ModelOpt side of the TensorRT-placement comparison.

ModelOpt (``modelopt.onnx.quantization.quantize``) places Q/DQ for TensorRT: on the activation and
weight of Conv/Gemm/MatMul, on the skip input of a residual Add only, none on LayerNorm or GELU,
none on GEMV or small GEMMs; the attention MatMuls (BMM1, BMM2) get Q/DQ in int8 mode unless the
sequence is longer than 512 or ``disable_mha_qdq`` is set (``find_nodes_from_mha_to_exclude``).
Here it runs on CPU: calibration through ONNX Runtime's CPU provider (``calibration_eps=["cpu"]``),
every non-quantised op kept in fp32 (``high_precision_dtype="fp32"``; the default ``fp16`` would
cast them).

The fp32 ONNX is what a user gets from ``torch.onnx.export`` (``compiler.cli.benchmark.plain_export``,
the export ``bench.int8_peers`` gives its ONNX Runtime peers), with the batch dimension dynamic
(``compiler.dynamic_shapes.export_with_dims`` traces it first); ``fp32_onnx(..., static_batch=N)``
exports at a fixed batch instead, as ``bench.int8_peers.export_fp32`` does.

The comparison with fxpress (placement, lint findings, quality) is ``bench.trt_peers``.

The calibration batch matters beyond speed: ModelOpt reads a dynamic dimension as 1 unless
``calibration_shapes`` says otherwise, and its GEMV check (``find_nodes_from_matmul_to_exclude``)
then sees M = 1 at a classifier's final Gemm and leaves it in float. ``modelopt_int8(...,
calibration_batch=N)`` passes ``calibration_shapes`` with batch N.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from bench.int8_peers import (
    EVAL_CHUNK,
    _static_predictor,
    classifier_quality,
    embedding_quality,
    export_fp32,
)

MODELS = ("resnet18", "mobilenet-v2", "efficientnet-lite0", "minilm-l6")
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
PASS_THROUGH = ("BatchNormalization", "Relu")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")

logger = logging.getLogger("bench.modelopt_onnx")


# --------------------------------------------------------------------------------------------
# Export and quantisation


def fp32_onnx(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], *, static_batch: int | None = None) -> bytes:
    """The fp32 ONNX a user gets from ``torch.onnx.export``, batch dynamic unless ``static_batch``.

    Dynamic: ``compiler.dynamic_shapes.export_with_dims`` traces the model with dimension 0 of every
    input dynamic, and ``plain_export`` exports that program with the exporter's defaults.
    Static: ``bench.int8_peers.export_fp32`` at ``static_batch`` (the first rows of ``inputs``,
    repeated if there are fewer).
    """
    from compiler.cli.benchmark import plain_export
    from compiler.dynamic_shapes import export_with_dims
    from compiler.quiet import quiet_torch

    if static_batch is not None:
        rows = tuple(t[torch.arange(static_batch) % t.shape[0]].contiguous() for t in inputs)
        return export_fp32(model, {static_batch: rows})[static_batch]
    dims = {index: {0: ("batch", 1, None)} for index in range(len(inputs))}
    with quiet_torch(), torch.no_grad():
        program = export_with_dims(model, inputs, dims)
    return plain_export(program, inputs)


def input_names(model: onnx.ModelProto) -> list[str]:
    """The graph inputs that are not initializers, in order."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [value.name for value in model.graph.input if value.name not in initializers]


def calibration_shapes(model: onnx.ModelProto, batch: int) -> str:
    """ModelOpt's ``calibration_shapes`` spec (``name:16x3x224x224,...``): every symbolic dim set to ``batch``."""
    specs = []
    inputs = {value.name: value for value in model.graph.input}
    for name in input_names(model):
        dims = [str(dim.dim_value) if dim.HasField("dim_value") else str(batch)
                for dim in inputs[name].type.tensor_type.shape.dim]
        specs.append(f"{name}:{'x'.join(dims)}")
    return ",".join(specs)


class _Records(logging.Handler):
    """Keeps the messages of WARNING and above, once each."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().strip()
        if message not in self.messages:
            self.messages.append(message)


@contextlib.contextmanager
def _modelopt_output(verbose: bool):
    """Collect ModelOpt's warnings; unless ``verbose``, swallow its stdout/stderr (log, ORT prints, tqdm).

    ``quantize`` reconfigures the ``modelopt.onnx`` logger on every call (a handler on the
    ``sys.stdout`` of that moment, propagation on), so the collecting handler sits on its parent
    ``modelopt``, whose propagation to the root logger is cut while quiet.
    """
    records, parent = _Records(), logging.getLogger("modelopt")
    previous = parent.propagate
    parent.addHandler(records)
    parent.propagate = verbose
    buffer = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.ExitStack() as stack:
            warnings.simplefilter("always")
            if not verbose:
                stack.enter_context(contextlib.redirect_stdout(buffer))
                stack.enter_context(contextlib.redirect_stderr(buffer))
            yield records.messages
        for item in caught:
            message = f"{item.category.__name__}: {str(item.message).strip().splitlines()[0][:300]}"
            if message not in records.messages:
                records.messages.append(message)
    finally:
        parent.removeHandler(records)
        parent.propagate = previous
        child = logging.getLogger("modelopt.onnx")
        for handler in list(child.handlers):  # the handler quantize bound to our buffer
            if getattr(handler, "stream", None) is buffer:
                child.removeHandler(handler)


def modelopt_int8(fp32: onnx.ModelProto | bytes, calibration: dict[str, np.ndarray], *, method: str = "entropy",
                  workdir: Path, calibration_batch: int | None = None,
                  verbose: bool = False) -> tuple[onnx.ModelProto, dict]:
    """ModelOpt int8 PTQ of an fp32 ONNX model, calibrated on CPU; the quantised model and facts about the run.

    Calls ``modelopt.onnx.quantization.quantize(onnx_path, quantize_mode="int8",
    calibration_data=calibration, calibration_method=method, calibration_eps=["cpu"],
    high_precision_dtype="fp32")``. ``calibration`` maps each graph input name to all its samples
    stacked on dimension 0; ModelOpt splits them into steps of the model's batch, which it reads
    from the ONNX input shape (a symbolic dim counts as 1) unless ``calibration_batch`` is given
    (then passed as ``calibration_shapes``). The calibration batch also decides which Gemm/MatMul
    ModelOpt calls GEMV (M = 1) and leaves in float.

    No CPU workaround is needed with the base package (``nvidia-modelopt`` without ``[onnx]``)
    plus onnx, onnx-graphsurgeon, onnxslim and CPU onnxruntime: the cupy and tensorrt imports are
    optional, and ``calibration_eps=["cpu"]`` keeps CUDA and TensorRT out of calibration.

    Args:
        fp32: the fp32 model (opset >= 19 is not needed: ModelOpt upgrades to 19 for int8).
        calibration: input name -> calibration samples (all of them, batch first).
        method: "entropy" (ModelOpt's default) or "max" (MinMax with symmetric activations).
        workdir: an existing folder for the model files ModelOpt reads and writes.
        calibration_batch: samples per calibration step; None leaves it to ModelOpt.
        verbose: let ModelOpt log at INFO and print; otherwise its output is swallowed and
            only its warnings are kept, in the facts.

    Returns:
        The quantised model, and facts: ``seconds``, ``modelopt`` and ``onnxruntime`` versions,
        the ``options`` passed, ``calibration_samples`` and ``warnings``.
    """
    import modelopt
    import onnxruntime as ort
    from modelopt.onnx.quantization import quantize

    if method not in ("entropy", "max"):
        raise ValueError(f"method must be 'entropy' or 'max', not {method!r}")
    model = fp32 if isinstance(fp32, onnx.ModelProto) else onnx.load_from_string(fp32)
    workdir = Path(workdir)
    source, output = workdir / "fp32.onnx", workdir / "fp32.quant.onnx"
    onnx.save(model, str(source))
    options = {"quantize_mode": "int8", "calibration_method": method, "calibration_eps": ["cpu"],
               "high_precision_dtype": "fp32", "log_level": "INFO" if verbose else "WARNING"}
    if calibration_batch is not None:
        options["calibration_shapes"] = calibration_shapes(model, calibration_batch)
    data = {name: np.ascontiguousarray(array) for name, array in calibration.items()}
    started = time.perf_counter()
    with _modelopt_output(verbose) as kept, _ort_quantization_restored():
        quantize(str(source), calibration_data=data, output_path=str(output), **options)
    seconds = time.perf_counter() - started
    facts = {"seconds": seconds, "modelopt": modelopt.__version__, "onnxruntime": ort.__version__,
             "options": options, "calibration_samples": int(next(iter(data.values())).shape[0]),
             "warnings": list(kept)}
    return onnx.load(str(output)), facts


@contextlib.contextmanager
def _ort_quantization_restored():
    """Undo ModelOpt's in-process patches of ONNX Runtime's quantisation tools when it returns.

    ``modelopt.onnx.quantization`` replaces methods of ORT's calibrators and quantizers
    (``ort_patching.patch_ort_modules``) and leaves them replaced; ORT's own ``quantize_static``
    later in the same process then calibrates nothing ("Quantization parameters are not specified
    for param input_0"), as the pruning pass's latency model found.
    """
    from onnxruntime.quantization import base_quantizer, calibrate, qdq_quantizer

    owners = [calibrate.MinMaxCalibrater, calibrate.HistogramCalibrater, calibrate.HistogramCollector,
              calibrate.CalibraterBase, qdq_quantizer.QDQQuantizer, base_quantizer.BaseQuantizer]
    saved = [(owner, dict(vars(owner))) for owner in owners]
    create_calibrator = calibrate.create_calibrator
    try:
        yield
    finally:
        for owner, attributes in saved:
            for name in set(vars(owner)) - set(attributes):
                delattr(owner, name)
            for name, value in attributes.items():
                if vars(owner).get(name) is not value and name not in ("__dict__", "__weakref__"):
                    setattr(owner, name, value)
        calibrate.create_calibrator = create_calibrator


def evaluate(model: onnx.ModelProto, evaluation: tuple[torch.Tensor, ...], reference: torch.Tensor,
             encoder: bool, batch: int = EVAL_CHUNK) -> dict:
    """Quality against eager fp32, run by ONNX Runtime with graph optimisations off, in chunks of ``batch``."""
    from backends.onnxruntime import make_session

    predict = _static_predictor(make_session(model, level="disable"), batch)
    actual = predict(evaluation)
    return embedding_quality(reference, actual) if encoder else classifier_quality(reference, actual, None)


