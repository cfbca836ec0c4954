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
(``compiler.dynamic_shapes.export_with_dims`` traces it first); ``--static-batch N`` exports at a
fixed batch instead, as ``bench.int8_peers.export_fp32`` does.

For each zoo model the baseline reports:

- the Q/DQ sites: Conv/Gemm/MatMul nodes and how many read both inputs from a DequantizeLinear;
  residual Adds (one input from a Conv, possibly through BatchNormalization/Relu) and which of
  their inputs come from a DQ; the op types with no DQ input; opset, zero-point dtype, and
  whether the weight scales are per channel with an explicit ``axis``;
- quality against eager fp32 on the evaluation samples, run by ONNX Runtime with graph
  optimisations off (``ORT_DISABLE_ALL``: an exact emulation of the QDQ semantics): top-1
  agreement and SQNR of the logits for classifiers, the cosine of each sentence embedding to
  eager's for minilm-l6;
- the time ModelOpt took to quantise.

The calibration batch matters beyond speed: ModelOpt reads a dynamic dimension as 1 unless
``calibration_shapes`` says otherwise, and its GEMV check (``find_nodes_from_matmul_to_exclude``)
then sees M = 1 at a classifier's final Gemm and leaves it in float. ``--calib-batch N`` passes
``calibration_shapes`` with batch N.

    python -m bench.modelopt_onnx --models resnet18 mobilenet-v2 efficientnet-lite0 minilm-l6
    python -m bench.modelopt_onnx --models resnet18 --method max --calib-batch 16 --json modelopt.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch

from bench.int8_peers import (
    EVAL_CHUNK,
    SEQ_LEN,
    _finite,
    _static_predictor,
    classifier_quality,
    eager_outputs,
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
    with _modelopt_output(verbose) as kept:
        quantize(str(source), calibration_data=data, output_path=str(output), **options)
    seconds = time.perf_counter() - started
    facts = {"seconds": seconds, "modelopt": modelopt.__version__, "onnxruntime": ort.__version__,
             "options": options, "calibration_samples": int(next(iter(data.values())).shape[0]),
             "warnings": list(kept)}
    return onnx.load(str(output)), facts


# --------------------------------------------------------------------------------------------
# Where the Q/DQ went


class _Graph:
    """Producers, constants and op types of an ONNX graph, for walking it backwards."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes = list(model.graph.node)
        self.producer = {name: node for node in self.nodes for name in node.output}
        self.constants = {tensor.name: tensor for tensor in model.graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = node.attribute[0].t

    def op(self, name: str) -> str | None:
        node = self.producer.get(name)
        return node.op_type if node is not None else None

    def from_dq(self, name: str) -> bool:
        return self.op(name) == "DequantizeLinear"

    def is_constant(self, name: str) -> bool:
        """A constant, or a Q/DQ chain over one (a weight)."""
        while name not in self.constants and self.op(name) in QDQ_OPS:
            name = self.producer[name].input[0]
        return name in self.constants

    def weight_storage(self, name: str) -> str:
        """How the weight behind a DQ input is stored: ``INT8``, or ``FLOAT via Q`` for a float Q->DQ pair."""
        through_q = self.op(name) == "QuantizeLinear"
        while name not in self.constants and self.op(name) in QDQ_OPS:
            name = self.producer[name].input[0]
        stored = onnx.TensorProto.DataType.Name(self.constants[name].data_type) if name in self.constants else "?"
        return f"{stored} via Q" if through_q else stored

    def reaches_conv(self, name: str) -> bool:
        """Whether ``name`` is a Conv's output, possibly through BatchNormalization/Relu and Q/DQ."""
        while self.op(name) in (*PASS_THROUGH, *QDQ_OPS):
            name = self.producer[name].input[0]
        return self.op(name) == "Conv"


def _weighted_sites(graph: _Graph) -> dict:
    sites = {}
    for op_type in WEIGHTED_OPS:
        nodes = [node for node in graph.nodes if node.op_type == op_type]
        both = [node for node in nodes if all(graph.from_dq(name) for name in node.input[:2])]
        sites[op_type] = {"nodes": len(nodes), "both_inputs_dq": len(both),
                          "float": [node.name for node in nodes if node not in both]}
    return sites


def _residual_adds(graph: _Graph) -> dict:
    """Adds of two activations, one of them a Conv's output: which inputs come from a DQ."""
    adds = [node for node in graph.nodes if node.op_type == "Add" and len(node.input) == 2
            and not any(graph.is_constant(name) for name in node.input)
            and any(graph.reaches_conv(name) for name in node.input)]
    counts = Counter(sum(graph.from_dq(name) for name in node.input) for node in adds)
    return {"adds": len(adds), "one_input_dq": counts[1], "both_inputs_dq": counts[2], "no_input_dq": counts[0]}


def _weight_scales(graph: _Graph) -> dict:
    """The DQs feeding a weight input: per-channel (1-D scale longer than 1), with an explicit axis, storage."""
    weight_dqs = []
    for node in graph.nodes:
        if node.op_type in WEIGHTED_OPS and len(node.input) > 1 and graph.from_dq(node.input[1]) \
                and graph.is_constant(node.input[1]):
            weight_dqs.append(graph.producer[node.input[1]])
    per_channel = [node for node in weight_dqs
                   if node.input[1] in graph.constants and math.prod(graph.constants[node.input[1]].dims) > 1]
    with_axis = [node for node in per_channel if any(attr.name == "axis" for attr in node.attribute)]
    stored = Counter(graph.weight_storage(node.input[0]) for node in weight_dqs)
    return {"weight_dqs": len(weight_dqs), "per_channel": len(per_channel), "explicit_axis": len(with_axis),
            "stored_as": dict(stored)}


def qdq_sites(model: onnx.ModelProto) -> dict:
    """Where a QDQ model's Q/DQ nodes are, and what runs in float.

    ``float_op_types`` counts, per op type, the nodes (other than Q/DQ, Constant and ops on
    constants only) with no input from a DequantizeLinear.
    """
    graph = _Graph(model)
    zero_points = Counter(onnx.TensorProto.DataType.Name(graph.constants[node.input[2]].data_type)
                          for node in graph.nodes if node.op_type in QDQ_OPS and len(node.input) > 2
                          and node.input[2] in graph.constants)
    float_ops = Counter(node.op_type for node in graph.nodes
                        if node.op_type not in (*QDQ_OPS, "Constant")
                        and not any(graph.from_dq(name) for name in node.input if name)
                        and not all(graph.is_constant(name) for name in node.input if name))
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "weighted": _weighted_sites(graph), "residual_adds": _residual_adds(graph),
            "quantize_linear": sum(node.op_type == "QuantizeLinear" for node in graph.nodes),
            "dequantize_linear": sum(node.op_type == "DequantizeLinear" for node in graph.nodes),
            "zero_point_dtypes": dict(zero_points), "weights": _weight_scales(graph),
            "float_op_types": dict(float_ops.most_common())}


# --------------------------------------------------------------------------------------------
# One model


def evaluate(model: onnx.ModelProto, evaluation: tuple[torch.Tensor, ...], reference: torch.Tensor,
             encoder: bool, batch: int = EVAL_CHUNK) -> dict:
    """Quality against eager fp32, run by ONNX Runtime with graph optimisations off, in chunks of ``batch``."""
    from backends.onnxruntime import make_session

    predict = _static_predictor(make_session(model, level="disable"), batch)
    actual = predict(evaluation)
    return embedding_quality(reference, actual) if encoder else classifier_quality(reference, actual, None)


def baseline_model(name: str, calib: int, eval_count: int, *, method: str = "entropy",
                   calibration_batch: int | None = None, static_batch: int | None = None) -> dict:
    """Export, quantise with ModelOpt, describe the Q/DQ sites and measure quality, for one zoo model."""
    import models

    zoo = models.load(name)
    encoder = zoo.task == "embedding"
    options = {"seq_len": SEQ_LEN} if encoder else {}
    calibration = tuple(zoo.calibration_data(calib, **options))
    evaluation = tuple(zoo.eval_data(eval_count, **options))
    started = time.perf_counter()
    fp32 = onnx.load_from_string(fp32_onnx(zoo.model, tuple(t[:2] for t in calibration), static_batch=static_batch))
    export_s = time.perf_counter() - started
    names = input_names(fp32)
    data = {key: tensor.numpy() for key, tensor in zip(names, calibration, strict=True)}
    with tempfile.TemporaryDirectory(prefix="modelopt-") as tmp:
        quantized, facts = modelopt_int8(fp32, data, method=method, workdir=Path(tmp),
                                         calibration_batch=calibration_batch)
    reference = eager_outputs(zoo.model, evaluation)
    quality = evaluate(quantized, evaluation, reference, encoder, static_batch or EVAL_CHUNK)
    fp32_quality = evaluate(fp32, evaluation, reference, encoder, static_batch or EVAL_CHUNK)
    return {"model": name, "kind": zoo.task, "export_s": export_s, "fp32_opset": fp32.opset_import[0].version,
            "modelopt": facts, "sites": qdq_sites(quantized), "quality": quality, "fp32_onnx_quality": fp32_quality,
            "calibration_samples": calib, "evaluation_samples": eval_count, "seq_len": SEQ_LEN if encoder else None}


def run_baseline(names, calib: int = 256, eval: int = 500, *, method: str = "entropy",
                 calibration_batch: int | None = None, static_batch: int | None = None) -> dict:
    """ModelOpt int8 on each named zoo model: Q/DQ sites, quality against eager fp32, quantise time."""
    import modelopt
    import onnxruntime as ort

    results = []
    for name in names:
        logger.info("%s: export, quantise, evaluate", name)
        results.append(baseline_model(name, calib, eval, method=method, calibration_batch=calibration_batch,
                                      static_batch=static_batch))
        print(render_one(results[-1]), flush=True)
    return {"versions": {"modelopt": modelopt.__version__, "onnxruntime": ort.__version__, "torch": torch.__version__,
                         "onnx": onnx.__version__},
            "method": method, "calibration_batch": calibration_batch, "static_batch": static_batch,
            "results": results}


# --------------------------------------------------------------------------------------------
# Output


def _weighted_cell(sites: dict) -> str:
    parts = [f"{op} {s['both_inputs_dq']}/{s['nodes']}" for op, s in sites["weighted"].items() if s["nodes"]]
    return ", ".join(parts)


def _quality_cell(result: dict, key: str = "quality") -> str:
    quality = result[key]
    if result["kind"] == "embedding":
        return f"cos {quality['cosine_mean']:.4f} (min {quality['cosine_min']:.4f})"
    sqnr = quality["sqnr_db"]
    return f"top1 {100 * quality['top1_agreement']:.1f}%, {sqnr:.1f} dB" if math.isfinite(sqnr) else \
        f"top1 {100 * quality['top1_agreement']:.1f}%, inf dB"


def render_one(result: dict) -> str:
    """The details of one model: its floats, weight scales and ModelOpt's warnings."""
    sites, facts = result["sites"], result["modelopt"]
    weights = sites["weights"]
    unquantised = {op: s["float"] for op, s in sites["weighted"].items() if s["float"]}
    lines = [f"== {result['model']}: ModelOpt {facts['modelopt']} int8 "
             f"({facts['options']['calibration_method']}), {facts['seconds']:.1f} s; opset {sites['opset']}; "
             f"Q {sites['quantize_linear']}, DQ {sites['dequantize_linear']}; zero points {sites['zero_point_dtypes']}",
             f"   weight DQs {weights['weight_dqs']}: per-channel {weights['per_channel']}, explicit axis "
             f"{weights['explicit_axis']}, stored as {weights['stored_as']}",
             f"   residual Adds {sites['residual_adds']}",
             f"   ops with no DQ input: {sites['float_op_types']}",
             f"   int8 vs eager: {_quality_cell(result)}; fp32 ONNX (no Q/DQ) vs eager: "
             f"{_quality_cell(result, 'fp32_onnx_quality')}"]
    lines += [f"   float {op}: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
              for op, names in unquantised.items()]
    lines += [f"   modelopt warning: {message[:200]}" for message in facts["warnings"]]
    return "\n".join(lines)


def render(report: dict) -> str:
    """One row per model: Q/DQ sites, quality against eager fp32, ModelOpt's time."""
    header = ["model", "opset", "zp", "weighted ops with both inputs DQ", "residual Add skip-DQ",
              "per-ch axis", "quality vs eager fp32", "quantise s"]
    rows = []
    for result in report["results"]:
        sites = result["sites"]
        adds, weights = sites["residual_adds"], sites["weights"]
        rows.append([result["model"], str(sites["opset"]), "/".join(sites["zero_point_dtypes"]) or "-",
                     _weighted_cell(sites), f"{adds['one_input_dq']}/{adds['adds']}" if adds["adds"] else "-",
                     f"{weights['explicit_axis']}/{weights['weight_dqs']}", _quality_cell(result),
                     f"{result['modelopt']['seconds']:.1f}"])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in [header, ["-" * w for w in widths], *rows]]
    first = report["results"][0] if report["results"] else {}
    title = (f"ModelOpt {report['versions']['modelopt']} int8 ({report['method']}), ONNX Runtime "
             f"{report['versions']['onnxruntime']} ORT_DISABLE_ALL; {first.get('calibration_samples')} calibration, "
             f"{first.get('evaluation_samples')} evaluation samples; calibration batch "
             f"{report['calibration_batch'] or 'ModelOpt default'}; "
             f"{'static batch ' + str(report['static_batch']) if report['static_batch'] else 'dynamic batch'}")
    return "\n".join([title, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--calib", type=int, default=256, help="calibration samples (default 256)")
    parser.add_argument("--eval", type=int, default=500, help="evaluation samples (default 500)")
    parser.add_argument("--method", choices=("entropy", "max"), default="entropy")
    parser.add_argument("--calib-batch", type=int, default=None,
                        help="samples per calibration step, passed as calibration_shapes (default: ModelOpt's, 1 "
                             "for a dynamic batch)")
    parser.add_argument("--static-batch", type=int, default=None, help="export at this fixed batch, not dynamic")
    parser.add_argument("--json", default=None, help="also write every number to this file")
    parser.add_argument("--verbose", action="store_true", help="log progress")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = run_baseline(args.models, args.calib, args.eval, method=args.method,
                          calibration_batch=args.calib_batch, static_batch=args.static_batch)
    print("\n" + render(report), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(_finite({"args": vars(args), **report}), handle, indent=2)


if __name__ == "__main__":
    main()
