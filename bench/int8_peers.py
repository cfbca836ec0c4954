"""fxpress cpu-int8 against the int8 peers, side by side in one process.

For each model, every pipeline is built first, then timed at batch 1 and at batch 16 in blocks
taken in rotation (``compiler.cli.benchmark.time_side_by_side``: medians of interleaved blocks, so
machine noise hits every pipeline alike), then evaluated on the zoo's evaluation data, which is
disjoint from the calibration data.

Classifiers (efficientnet-lite0; optionally digits-cnn, resnet18, mobilenet-v2):

- ``ort-fp32``: plain ``torch.onnx.export`` in ONNX Runtime (static shapes, exported at each batch);
- ``ort-quantize_static``: ONNX Runtime's own quantizer as its docs advise for x86: QDQ,
  per-channel, MinMax, U8S8 (activations QUInt8, weights QInt8), after ``quant_pre_process``;
- ``nncf-ptq``: ``nncf.quantize`` on the same fp32 export with NNCF's documented choices for a
  ReLU CNN on a CPU (preset PERFORMANCE, target device CPU, fast bias correction, every
  calibration sample), run in ONNX Runtime with its own set of graph optimisers (NNCF leaves conv
  biases in float, and only ``WeightBiasQuantization``, which the other sessions turn off for
  fxpress's sake, fuses such convs into integer kernels); evaluated on its batch-1 model, the
  one calibrated one sample at a time as NNCF's examples do (only where ``import nncf`` works);
- ``fxpress cpu-int8``: ``compiler.compile(..., target="cpu-int8", calibration_data=...)`` run
  through its ONNX Runtime model;
- ``pt2e-x86-inductor``: ``torchao.quantization.pt2e`` with ``X86InductorQuantizer``, then
  ``torch.compile`` (efficientnet-lite0 only, and only where ``import torchao`` works).

Columns: p50 latency (ms) at batch 1 and 16, ratio to ``quantize_static`` (< 1: faster; in
brackets the smallest and largest ratio of the interleaved blocks, i.e. the run's noise), top-1
agreement with eager fp32, the same on the decisive crops only (fp32's top-1 probability beats its
top-2 by at least 0.2), top-5 agreement (fp32's top-1 class among the pipeline's top 5), SQNR of
the logits in dB (the measure for the random-weight models), true accuracy where the zoo has
labels (digits-cnn), ``model.onnx`` size and % of fp32. Under the table, for ``quantize_static``
and NNCF, how many convs ONNX Runtime runs in integer kernels (QLinearConv) after optimising.

Sentence encoder (minilm-l6, sequence length 128): ``ort-fp32``, ``ort-quantize_dynamic``
(its defaults) and fxpress cpu-int8; the quality columns are the cosine of each sentence's
embedding to eager fp32's (mean and min) and nearest-neighbour agreement.

A pipeline that cannot be built (cpu-int8 not in this fxpress yet, torchao or nncf missing) prints as
``not available: <reason>`` and the run carries on.

    python -m bench.int8_peers                                    # efficientnet-lite0, minilm-l6
    python -m bench.int8_peers --models digits-cnn resnet18 --eval 500 --calib 256 --json int8.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import io
import json
import logging
import math
import os
import platform
import re
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from backends.onnxruntime import make_session
from backends.onnxruntime.backend import DISABLED_OPTIMIZERS
from compiler.cli.benchmark import block_ratios, peak_rss_mb, plain_export, thread_settings, time_side_by_side

CLASSIFIERS = ("efficientnet-lite0", "digits-cnn", "resnet18", "mobilenet-v2")
ENCODERS = ("minilm-l6",)
BATCHES = (1, 16)
EVAL_CHUNK = 16
SEQ_LEN = 128
#: fp32's top-1 probability beats its top-2 by at least this on a decisive crop.
DECISIVE_MARGIN = 0.2
TOP_K = 5
#: ONNX Runtime's integer convolution kernels (after its QDQ fusions).
INTEGER_CONVS = ("QLinearConv", "NhwcQLinearConv", "ConvInteger")

logger = logging.getLogger("bench.int8_peers")


# --------------------------------------------------------------------------------------------
# The machine


def cpu_isa() -> dict:
    """The CPU's int8-relevant feature flags: ``backends.onnxruntime.isa`` where it exists, else /proc/cpuinfo."""
    with contextlib.suppress(ImportError):
        from backends.onnxruntime.isa import detect_isa, int8_format

        isa = detect_isa()
        return {**isa.to_dict(), "int8_format": int8_format(isa).to_dict()}
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
    interesting = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
    found = tuple(flag for flag in interesting if flag in flags)
    return {"machine": platform.machine().lower(), "vnni": any("vnni" in f or f == "amx_int8" for f in found),
            "flags": found, "source": "/proc/cpuinfo" if cpuinfo.exists() else "unknown"}


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or platform.processor()."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------------------------
# Pipelines


@dataclass
class Pipeline:
    """One way of running the model: a runner per batch size, a predictor for evaluation, a size.

    Attributes:
        name: the row's name.
        runners: batch -> a no-argument call on that batch's fixed inputs (what is timed).
        predict: inputs (tuple of tensors, any batch) -> output tensor, for evaluation.
        size_bytes: bytes of the serialised model.onnx (None where there is no ONNX model).
        build_s: seconds to build it (export, quantise or compile).
        status: "ok", or why the row has no numbers.
        notes: anything worth printing under the table.
    """

    name: str
    runners: dict[int, Callable[[], object]] = field(default_factory=dict)
    predict: Callable[[tuple[torch.Tensor, ...]], torch.Tensor] | None = None
    size_bytes: int | None = None
    build_s: float = 0.0
    status: str = "ok"
    notes: list[str] = field(default_factory=list)


def unavailable(name: str, reason: str) -> Pipeline:
    """A row that prints its reason instead of numbers."""
    return Pipeline(name, status=f"not available: {reason}")


def _reason(error: BaseException) -> str:
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


def _pad(inputs: tuple[torch.Tensor, ...], batch: int) -> tuple[tuple[torch.Tensor, ...], int]:
    """Inputs padded along dim 0 to ``batch`` by repeating the last row; also the real count."""
    count = inputs[0].shape[0]
    if count == batch:
        return inputs, count
    return tuple(torch.cat([t, t[-1:].expand(batch - count, *t.shape[1:])]) for t in inputs), count


def _chunks(inputs: tuple[torch.Tensor, ...], size: int):
    total = inputs[0].shape[0]
    for start in range(0, total, size):
        yield tuple(t[start:start + size] for t in inputs)


def _feed(session, inputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    return {spec.name: np.ascontiguousarray(t.numpy()) for spec, t in zip(session.get_inputs(), inputs, strict=True)}


def _static_predictor(session, batch: int) -> Callable[[tuple[torch.Tensor, ...]], torch.Tensor]:
    """Evaluation through a static-batch session: chunks of ``batch``, the last one padded."""
    def predict(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        outputs = []
        for chunk in _chunks(inputs, batch):
            padded, count = _pad(chunk, batch)
            outputs.append(torch.from_numpy(np.asarray(session.run(None, _feed(session, padded))[0]))[:count])
        return torch.cat(outputs)
    return predict


def ort_static_pipeline(name: str, models_by_batch: dict[int, bytes], timing_inputs: dict[int, tuple],
                        open_session: Callable[[bytes], object] = make_session,
                        evaluate_batch: int | None = None) -> Pipeline:
    """ONNX Runtime sessions for static-shape models, one per batch; evaluation at ``evaluate_batch`` (the largest)."""
    sessions = {batch: open_session(model) for batch, model in models_by_batch.items()}
    pipeline = Pipeline(name, size_bytes=len(models_by_batch[min(models_by_batch)]))
    for batch, session in sessions.items():
        feed = _feed(session, timing_inputs[batch])
        pipeline.runners[batch] = lambda session=session, feed=feed: session.run(None, feed)
    evaluate_batch = max(sessions) if evaluate_batch is None else evaluate_batch
    pipeline.predict = _static_predictor(sessions[evaluate_batch], evaluate_batch)
    return pipeline


def integer_convs(model: bytes, workdir: Path, disabled_optimizers: tuple[str, ...] = DISABLED_OPTIMIZERS) -> str:
    """How many of ``model``'s convs ONNX Runtime runs in integer kernels once it has optimised the graph.

    A conv it does not fuse runs in float between DequantizeLinear and QuantizeLinear.
    """
    path = workdir / "optimized.onnx"
    make_session(model, optimized_path=str(path), disabled_optimizers=disabled_optimizers)
    fused = collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node
                                if node.op_type in INTEGER_CONVS)
    convs = sum(node.op_type in ("Conv", *INTEGER_CONVS) for node in onnx.load_from_string(model).graph.node)
    kernels = ", ".join(f"{count} {op}" for op, count in fused.most_common()) or "none"
    return f"{sum(fused.values())} of {convs} convs in integer kernels ({kernels})"


def export_fp32(model: torch.nn.Module, timing_inputs: dict[int, tuple]) -> dict[int, bytes]:
    """What a user gets from a plain ``torch.onnx.export`` at each batch (static shapes)."""
    return {batch: plain_export(model, inputs) for batch, inputs in timing_inputs.items()}


class _Reader:
    """A CalibrationDataReader over calibration batches, padded to a static batch."""

    def __init__(self, session_inputs: list[str], calibration: tuple[torch.Tensor, ...], batch: int):
        self._names, self._calibration, self._batch = session_inputs, calibration, batch
        self._iterator = None
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iterator, None)

    def rewind(self) -> None:
        chunks = _chunks(self._calibration, self._batch)  # the last one padded: repeated rows do not move MinMax
        self._iterator = (_padded_feed(self._names, chunk, self._batch) for chunk in chunks)


def _padded_feed(names: list[str], chunk: tuple[torch.Tensor, ...], batch: int) -> dict[str, np.ndarray]:
    """A session feed of ``chunk`` padded to the static ``batch`` by repeating its last row."""
    padded, _ = _pad(chunk, batch)
    return {name: np.ascontiguousarray(t.numpy()) for name, t in zip(names, padded, strict=True)}


def ort_quantize_static(fp32: dict[int, bytes], calibration: tuple[torch.Tensor, ...],
                        workdir: Path) -> dict[int, bytes]:
    """``quant_pre_process`` then ``quantize_static`` (QDQ, per-channel, MinMax, U8S8), per batch."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quantized = {}
    for batch, model in fp32.items():
        source, prepared, output = (workdir / f"{stem}_b{batch}.onnx" for stem in ("fp32", "pre", "qdq"))
        source.write_bytes(model)
        quant_pre_process(str(source), str(prepared))
        names = [value.name for value in onnx.load(str(prepared), load_external_data=False).graph.input]
        quantize_static(
            str(prepared), str(output), _Reader(names, calibration, batch),
            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            # No CalibMaxIntermediateOutputs: in onnxruntime 1.31 it drops every full group of
            # batches unreduced (clear_collected_data without compute_data). MinMax keeps only
            # ReduceMin/ReduceMax outputs per batch, so memory stays small without it.
        )
        quantized[batch] = output.read_bytes()
    return quantized


def ort_quantize_dynamic(fp32: dict[int, bytes], workdir: Path) -> dict[int, bytes]:
    """``quantize_dynamic`` with its defaults, per batch."""
    from onnxruntime.quantization import quantize_dynamic

    quantized = {}
    for batch, model in fp32.items():
        source, output = workdir / f"fp32_b{batch}.onnx", workdir / f"dyn_b{batch}.onnx"
        source.write_bytes(model)
        quantize_dynamic(str(source), str(output))
        quantized[batch] = output.read_bytes()
    return quantized


def nncf_quantize(fp32: dict[int, bytes], calibration: tuple[torch.Tensor, ...]) -> dict[int, bytes]:
    """``nncf.quantize`` per batch, with NNCF's documented choices for a ReLU CNN on a CPU.

    Preset PERFORMANCE (symmetric weights and activations; NNCF's default outside transformers, its
    docs keep MIXED for CNNs with non-ReLU activations), target device CPU, fast bias correction,
    and every calibration sample (``subset_size`` counts dataset items, here batches of ``batch``,
    as NNCF's docs on batched calibration say).
    """
    import nncf

    quantized = {}
    for batch, model in fp32.items():
        proto = onnx.load_from_string(model)
        names = [value.name for value in proto.graph.input]
        items = list(_chunks(calibration, batch))
        dataset = nncf.Dataset(items, functools.partial(_padded_feed, names, batch=batch))
        with contextlib.redirect_stdout(io.StringIO()):  # its progress bars
            result = nncf.quantize(proto, dataset, preset=nncf.QuantizationPreset.PERFORMANCE,
                                   target_device=nncf.TargetDevice.CPU, subset_size=len(items),
                                   fast_bias_correction=True)
        quantized[batch] = result.SerializeToString()
    return quantized


def nncf_pipeline(fp32: dict[int, bytes], calibration: tuple[torch.Tensor, ...], timing_inputs: dict[int, tuple],
                  workdir: Path) -> Pipeline:
    """NNCF post-training quantisation of the fp32 ONNX export, run in ONNX Runtime.

    Its sessions keep ONNX Runtime's own optimisers: NNCF leaves conv biases in float, and only
    ``WeightBiasQuantization`` (which ``make_session`` turns off) lets such convs fuse into integer
    kernels. Evaluation runs the batch-1 model: NNCF's activation ranges average per-item minima
    and maxima, so only batch 1 calibrates as NNCF's examples do (one sample per item).
    """
    row = "nncf-ptq"
    try:
        import nncf
    except Exception as error:  # noqa: BLE001 - any import failure means the row is skipped
        return unavailable(row, f"import nncf failed ({_reason(error)})")
    stock = functools.partial(make_session, disabled_optimizers=())
    started = time.perf_counter()
    quantized = nncf_quantize(fp32, calibration)
    pipeline = ort_static_pipeline(row, quantized, timing_inputs, stock, evaluate_batch=min(quantized))
    pipeline.build_s = time.perf_counter() - started
    smallest = quantized[min(quantized)]
    pipeline.notes.append(f"nncf {nncf.__version__}; ONNX Runtime's own optimisers: "
                          f"{integer_convs(smallest, workdir, ())}; with the bench's sessions "
                          f"(no WeightBiasQuantization): {integer_convs(smallest, workdir)}")
    return pipeline


def fxpress_target(max_float_macs: float | None, name: str = "cpu-int8", static: bool = False,
                   reconstruct: bool = True):
    """A target by name, or cpu-int8 with another float-MAC budget for its sensitivity fallback.

    ``static`` keeps cpu-int8 static even for a Linear-heavy model (which it would hand to
    cpu-int8-dynamic), to show what static int8 gives there; ``reconstruct=False`` drops the
    ``reconstruct`` pass, to show what it buys.
    """
    import dataclasses

    from compiler.targets import get_target, with_float_fallback

    target = get_target(name)
    if static:
        target = dataclasses.replace(target, linear_heavy_target=None)
    if not reconstruct:
        target = dataclasses.replace(target, pipeline=tuple(
            spec for spec in target.pipeline if spec.name != "reconstruct"))
    if max_float_macs is None:
        return target
    return with_float_fallback(target, max_float_macs)


def fxpress_pipeline(name: str, calibration: list[tuple[torch.Tensor, ...]],
                     timing_inputs: dict[int, tuple], max_float_macs: float | None = None,
                     target: str = "cpu-int8", static: bool = False, input_format: dict | None = None,
                     reconstruct: bool = True) -> Pipeline:
    """The public API, target cpu-int8, timed through its ONNX Runtime model.

    With ``input_format`` the artifact takes 8-bit pixels: ``calibration`` and ``timing_inputs``
    are then uint8 pixels, and ``predict`` turns the normalised evaluation images back into the
    pixels they were made from (exactly: see :func:`pixels_of`).
    """
    from compiler import TargetError, compile
    from compiler.cli.model_source import resolve

    row = f"fxpress {target}" + (" uint8-input" if input_format else "") + \
        ("" if max_float_macs is None else f" float<={max_float_macs:.0%} MACs") + (" static" if static else "") + \
        ("" if reconstruct else " no reconstruct")
    source = resolve(name)  # a fresh module: the peers' copy is left untouched
    example = (calibration[0][0][:1],) if input_format else source.example_inputs
    started = time.perf_counter()
    try:
        chosen = fxpress_target(max_float_macs, target, static, reconstruct)
        calibrates = any(spec.name == "calibrate" for spec in chosen.pipeline)
        compiled = compile(source.model, target=chosen, example_inputs=example,
                           calibration_data=calibration if calibrates else None,
                           dynamic_dims=source.dynamic_dims, model_name=name, input_format=input_format)
    except TargetError as error:
        return unavailable(row, _reason(error))
    build_s = time.perf_counter() - started
    options = compiled.manifest.get("target", {}).get("backend_options", {})
    session = make_session(compiled.onnx, options.get("graph_optimization_level", "all"),
                           options.get("intra_op_num_threads", 0))
    pipeline = Pipeline(row, size_bytes=compiled.onnx.ByteSize(), build_s=build_s)
    for batch, inputs in timing_inputs.items():
        feed = _feed(session, inputs)
        pipeline.runners[batch] = lambda feed=feed: session.run(None, feed)

    def predict(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if input_format:
            inputs = (pixels_of(inputs[0], input_format),)
        return torch.cat([compiled(*chunk) for chunk in _chunks(inputs, EVAL_CHUNK)])

    pipeline.predict = predict
    choice = compiled.report.capture.get("target_choice") or {}
    if choice.get("chosen", choice.get("requested")) != choice.get("requested"):
        pipeline.notes.append(f"compiled as {choice['chosen']}: {choice['linear_mac_share']:.0%} of MACs in "
                              "Linear/matmul ops")
    fallbacks = compiled.report.fallbacks
    if fallbacks:
        pipeline.notes.append(f"{len(fallbacks)} fallback(s): " + "; ".join(fallbacks)[:300])
    return pipeline


def pixels_of(images: torch.Tensor, input_format: dict) -> torch.Tensor:
    """The uint8 pixels that normalised ``images`` were made from: ``to_pixels(x * std + mean)``.

    Exact for images made as ``normalise(pixels / 255)``: the float32 round trip is off by far less
    than half a pixel step.
    """
    from models.images import to_pixels

    mean, std = (torch.tensor(input_format[key]).reshape(1, -1, 1, 1) for key in ("mean", "std"))
    return to_pixels(images * std + mean)


def pt2e_pipeline(zoo, calibration: tuple[torch.Tensor, ...], timing_inputs: dict[int, tuple]) -> Pipeline:
    """PT2E int8 with ``X86InductorQuantizer``, then ``torch.compile`` (Inductor, freezing on)."""
    row = "pt2e-x86-inductor"
    try:
        import torchao  # noqa: F401
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except Exception as error:  # noqa: BLE001 - any import failure means the row is skipped
        return unavailable(row, f"import torchao failed ({_reason(error)})")
    import torch._inductor.config as inductor_config

    started = time.perf_counter()
    inductor_config.freezing = True
    model = zoo.model
    batch_dim = torch.export.Dim("batch", min=1, max=1024)
    dynamic_shapes = tuple({0: batch_dim} for _ in zoo.example_inputs)
    example = tuple(t[:2] for t in calibration)  # batch 1 would be specialised to a constant
    with torch.no_grad():
        exported = torch.export.export(model, example, dynamic_shapes=dynamic_shapes).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for chunk in _chunks(calibration, EVAL_CHUNK):
            prepared(*chunk)
        converted = convert_pt2e(prepared)
        optimized = torch.compile(converted, dynamic=False)  # one static graph per batch, like the ORT peers
        for inputs in timing_inputs.values():  # compile every shape before anything is timed
            optimized(*inputs)
    pipeline = Pipeline(row, build_s=time.perf_counter() - started)

    def call(inputs: tuple[torch.Tensor, ...]):
        with torch.no_grad():
            return optimized(*inputs)

    for batch, inputs in timing_inputs.items():
        pipeline.runners[batch] = lambda inputs=inputs: call(inputs)

    def predict(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        outputs = []
        for chunk in _chunks(inputs, EVAL_CHUNK):
            padded, count = _pad(chunk, EVAL_CHUNK)  # one compiled shape, no recompiles
            outputs.append(call(padded)[:count])
        return torch.cat(outputs)

    pipeline.predict = predict
    pipeline.notes.append(f"torch {torch.__version__}, torchao {torchao.__version__}; no ONNX model, size n/a")
    pipeline.notes.append(_pt2e_coverage(converted))
    return pipeline


def _pt2e_coverage(converted: torch.fx.GraphModule) -> str:
    """How many of the converted graph's convs and linears read a dequantised (int8) weight."""
    weighted = [node for node in converted.graph.nodes
                if node.op == "call_function" and str(node.target).startswith(("aten.conv", "aten.linear"))]
    quantized = [node for node in weighted if isinstance(node.args[1], torch.fx.Node)
                 and "dequantize" in str(node.args[1].target)]
    return f"X86InductorQuantizer quantised the weights of {len(quantized)} of {len(weighted)} convs/linears"


def guarded(name: str, build: Callable[[], Pipeline]) -> Pipeline:
    """Build a pipeline; any failure becomes a 'not available' row, and the run carries on."""
    try:
        return build()
    except Exception as error:  # noqa: BLE001 - one peer failing must not end the run
        logger.debug("%s failed:\n%s", name, traceback.format_exc())
        return unavailable(name, _reason(error))


# --------------------------------------------------------------------------------------------
# Quality measures


def eager_outputs(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(*chunk) for chunk in _chunks(inputs, EVAL_CHUNK)])


def sqnr_db(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """10 log10(signal power / error power) over all outputs."""
    reference, actual = reference.double(), actual.double()
    noise = float((reference - actual).pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float(reference.pow(2).sum()) / noise)


def classifier_quality(reference: torch.Tensor, actual: torch.Tensor, labels: torch.Tensor | None) -> dict:
    """Agreement with fp32's top-1 (on every crop, on the decisive ones, within the top 5), SQNR, accuracy.

    Decisive crops: fp32's top-1 probability beats its top-2 by at least ``DECISIVE_MARGIN`` (None
    where there are none). Top-5 agreement: fp32's top-1 class is among ``actual``'s top 5.
    """
    expected = reference.argmax(1)
    same = expected == actual.argmax(1)
    decisive = top2_margins(reference) >= DECISIVE_MARGIN
    top_k = actual.topk(min(TOP_K, actual.shape[1]), dim=1).indices
    quality = {
        "top1_agreement": float(same.double().mean()),
        "decisive_agreement": float(same[decisive].double().mean()) if bool(decisive.any()) else None,
        "top5_agreement": float((top_k == expected[:, None]).any(1).double().mean()),
        "sqnr_db": sqnr_db(reference, actual),
    }
    if labels is not None:
        quality["accuracy"] = float((actual.argmax(1) == labels).double().mean())
    return quality


def rounded_to_uint8(inputs: tuple[torch.Tensor, ...], ranges: tuple[tuple[float, float], ...]) -> tuple:
    """Each floating input fake-quantised to a per-tensor uint8 grid over its (low, high) range, 0 included."""
    rounded = []
    for tensor, (low, high) in zip(inputs, ranges, strict=True):
        if not tensor.is_floating_point():
            rounded.append(tensor)
            continue
        low, high = min(low, 0.0), max(high, 0.0)
        scale = (high - low) / 255 if high > low else 1.0
        zero_point = min(255, max(0, round(-low / scale)))
        rounded.append(torch.fake_quantize_per_tensor_affine(tensor.float(), scale, zero_point, 0, 255))
    return tuple(rounded)


def input_rounding_ceiling(model: torch.nn.Module, calibration: tuple[torch.Tensor, ...],
                           evaluation: tuple[torch.Tensor, ...], reference: torch.Tensor) -> dict:
    """Eager fp32 on its evaluation inputs rounded to uint8 over the calibration range.

    A pipeline whose first layer runs in integer kernels quantises the input this way before
    anything else, so its agreement with fp32 can at best approach this one's.
    """
    ranges = tuple((float(t.min()), float(t.max())) if t.is_floating_point() else (0.0, 0.0) for t in calibration)
    rounded = eager_outputs(model, rounded_to_uint8(evaluation, ranges))
    return classifier_quality(reference, rounded, None)


def top2_margins(logits: torch.Tensor) -> torch.Tensor:
    """Per sample, the softmax probability of the top class minus that of the runner-up."""
    top2 = logits.double().softmax(dim=1).topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def embedding_quality(reference: torch.Tensor, actual: torch.Tensor) -> dict:
    reference, actual = reference.double(), actual.double()
    cosine = torch.nn.functional.cosine_similarity(reference, actual, dim=1)

    def neighbours(embeddings: torch.Tensor) -> torch.Tensor:
        unit = torch.nn.functional.normalize(embeddings, dim=1)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(-math.inf)
        return similarity.argmax(1)

    return {
        "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
        "nn_agreement": float((neighbours(reference) == neighbours(actual)).double().mean()),
        "sqnr_db": sqnr_db(reference, actual),
    }


# --------------------------------------------------------------------------------------------
# One model


def bench_model(name: str, args: argparse.Namespace) -> dict:
    import models

    zoo = models.load(name)
    encoder = name in ENCODERS
    options = {"seq_len": args.seq_len} if encoder else {}
    print(f"\n== {name}: {zoo.description}", flush=True)
    pixel_format = zoo.input_format if getattr(args, "pixels", False) and not encoder else None
    if pixel_format:  # 8-bit crops, as a decoder gives them; every float pipeline sees them normalised
        from models.images import normalise

        normalisation = (tuple(pixel_format["mean"]), tuple(pixel_format["std"]))
        pixel_calibration = zoo.calibration_data(args.calib, pixels=True)[0]
        calibration = (normalise(pixel_calibration.float() / 255, normalisation),)
        evaluation = (normalise(zoo.eval_data(args.eval, pixels=True)[0].float() / 255, normalisation),)
    else:
        calibration = tuple(zoo.calibration_data(args.calib, **options))
        evaluation = tuple(zoo.eval_data(args.eval, **options))
    labels = None if encoder else zoo.eval_labels(args.eval)
    timing_inputs = {batch: tuple(t[:batch].contiguous() for t in evaluation) for batch in BATCHES}
    if min(t.shape[0] for t in evaluation) < max(BATCHES):
        raise SystemExit(f"--eval must be at least {max(BATCHES)}")
    calibration_batches = list(_chunks(calibration, EVAL_CHUNK))
    peer = "ort-quantize_dynamic" if encoder else "ort-quantize_static"

    pipelines: list[Pipeline] = []
    with tempfile.TemporaryDirectory(prefix="int8-peers-") as tmp:
        started = time.perf_counter()
        fp32 = export_fp32(zoo.model, timing_inputs)
        fp32_row = ort_static_pipeline("ort-fp32", fp32, timing_inputs)
        fp32_row.build_s = time.perf_counter() - started
        pipelines.append(fp32_row)

        def build_peer() -> Pipeline:
            started = time.perf_counter()
            quantized = ort_quantize_dynamic(fp32, Path(tmp)) if encoder else \
                ort_quantize_static(fp32, calibration, Path(tmp))
            row = ort_static_pipeline(peer, quantized, timing_inputs)
            row.build_s = time.perf_counter() - started
            if not encoder:
                row.notes.append(integer_convs(quantized[min(quantized)], Path(tmp)))
            return row

        pipelines.append(guarded(peer, build_peer))
        if not encoder:
            pipelines.append(guarded("nncf-ptq", lambda: nncf_pipeline(fp32, calibration, timing_inputs, Path(tmp))))
    pixel_timing = {batch: (pixels_of(inputs[0], pixel_format),) for batch, inputs in timing_inputs.items()} \
        if pixel_format else {}
    if getattr(args, "no_reconstruct_row", False) and not encoder:  # what the reconstruct pass buys
        pipelines.append(guarded("fxpress cpu-int8 no reconstruct", lambda: fxpress_pipeline(
            name, calibration_batches, timing_inputs, reconstruct=False)))
        if pixel_format:
            pipelines.append(guarded("fxpress cpu-int8 uint8-input no reconstruct", lambda: fxpress_pipeline(
                name, list(_chunks((pixel_calibration,), EVAL_CHUNK)), pixel_timing, input_format=pixel_format,
                reconstruct=False)))
    for budget in args.float_macs or [None]:
        pipelines.append(guarded("fxpress cpu-int8", lambda budget=budget: fxpress_pipeline(
            name, calibration_batches, timing_inputs, budget)))
        if pixel_format:
            pipelines.append(guarded("fxpress cpu-int8 uint8-input", lambda budget=budget: fxpress_pipeline(
                name, list(_chunks((pixel_calibration,), EVAL_CHUNK)), pixel_timing, budget,
                input_format=pixel_format)))
    if encoder:  # Linear-heavy: cpu-int8 hands it to cpu-int8-dynamic; static shown for comparison
        pipelines.append(guarded("fxpress cpu-int8 static", lambda: fxpress_pipeline(
            name, calibration_batches, timing_inputs, static=True)))
    if name == "efficientnet-lite0":
        if args.no_pt2e:
            pipelines.append(unavailable("pt2e-x86-inductor", "skipped (--no-pt2e)"))
        else:
            pipelines.append(guarded("pt2e-x86-inductor", lambda: pt2e_pipeline(zoo, calibration, timing_inputs)))
    for pipeline in pipelines:
        built = pipeline.status if pipeline.status != "ok" else f"{pipeline.build_s:.1f} s"
        print(f"  built {pipeline.name:<22} {built}", flush=True)

    ready = [p for p in pipelines if p.status == "ok"]
    latency: dict[str, dict[int, float]] = {p.name: {} for p in ready}
    spread: dict[str, dict[int, tuple[float, float]]] = {p.name: {} for p in ready}
    for batch in BATCHES:
        stats = time_side_by_side({p.name: p.runners[batch] for p in ready}, batch,
                                  warmup=args.warmup, runs=args.repeats)
        for item in stats:
            latency[item.runner][batch] = item.p50_ms
        for runner, values in block_ratios(stats, peer).items():
            spread[runner][batch] = (min(values), max(values))

    reference = eager_outputs(zoo.model, evaluation)
    rows = []
    for pipeline in pipelines:
        row = {"pipeline": pipeline.name, "status": pipeline.status, "build_s": pipeline.build_s,
               "size_bytes": pipeline.size_bytes, "notes": pipeline.notes}
        if pipeline.status == "ok":
            for batch in BATCHES:
                row[f"p50_ms_b{batch}"] = latency[pipeline.name][batch]
                base = latency.get(peer, {}).get(batch)
                row[f"ratio_b{batch}"] = latency[pipeline.name][batch] / base if base else None
                row[f"block_ratio_range_b{batch}"] = spread[pipeline.name].get(batch)
            try:
                actual = pipeline.predict(evaluation)
                row.update(embedding_quality(reference, actual) if encoder else
                           classifier_quality(reference, actual, labels))
            except Exception as error:  # noqa: BLE001 - report, carry on
                row["notes"] = [*row["notes"], f"evaluation failed: {_reason(error)}"]
        rows.append(row)
    fp32_size = next(r["size_bytes"] for r in rows if r["pipeline"] == "ort-fp32")
    for row in rows:
        row["size_pct_fp32"] = 100 * row["size_bytes"] / fp32_size if row["size_bytes"] and fp32_size else None
    reference_labels = None if labels is None else float((reference.argmax(1) == labels).double().mean())
    fragility = None
    if not encoder:
        margins = top2_margins(reference)
        fragility = {"uint8_input": input_rounding_ceiling(zoo.model, calibration, evaluation, reference),
                     "margin_below_0.05": float((margins < 0.05).double().mean()),
                     "decisive_crops": int((margins >= DECISIVE_MARGIN).sum()),
                     "median_top1_probability": float(reference.double().softmax(1).amax(1).median())}
    result = {"model": name, "kind": "embedding" if encoder else "classification", "peer": peer,
              "calibration_samples": args.calib, "evaluation_samples": args.eval,
              "seq_len": args.seq_len if encoder else None, "eager_fp32_accuracy": reference_labels, "rows": rows,
              "fragility": fragility}
    print(render(result), flush=True)
    return result


# --------------------------------------------------------------------------------------------
# Output


def _fmt(value, spec: str, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:{spec}}{suffix}"


def _percent(fraction: float | None) -> str:
    return _fmt(None if fraction is None else 100 * fraction, ".1f", "%")


def _ratio(row: dict, batch: int) -> str:
    """``0.98x (0.93-1.04)``: the p50 ratio, and the range of the ratios of the interleaved blocks."""
    ratio, block_range = row.get(f"ratio_b{batch}"), row.get(f"block_ratio_range_b{batch}")
    text = _fmt(ratio, ".2f", "x")
    return text if not block_range else f"{text} ({block_range[0]:.2f}-{block_range[1]:.2f})"


def render(result: dict) -> str:
    encoder = result["kind"] == "embedding"
    peer = result["peer"].removeprefix("ort-")
    header = ["pipeline", "b1 ms", "b16 ms", f"b1 / {peer}", f"b16 / {peer}"]
    if encoder:
        header += ["cos mean", "cos min", "NN agree"]
    else:
        header += ["top1 agree", "decisive agree", "top5 agree", "SQNR dB"] + \
            (["accuracy"] if result["eager_fp32_accuracy"] is not None else [])
    header += ["model.onnx B", "% fp32", "build s"]
    lines, cells = [], []
    for row in result["rows"]:
        if row["status"] != "ok":
            lines.append(f"{row['pipeline']}: {row['status']}")
            continue
        cell = [row["pipeline"], _fmt(row.get("p50_ms_b1"), ".2f"), _fmt(row.get("p50_ms_b16"), ".2f"),
                _ratio(row, 1), _ratio(row, 16)]
        if encoder:
            cell += [_fmt(row.get("cosine_mean"), ".4f"), _fmt(row.get("cosine_min"), ".4f"),
                     _fmt(None if row.get("nn_agreement") is None else 100 * row["nn_agreement"], ".1f", "%")]
        else:
            cell += [_percent(row.get(key)) for key in ("top1_agreement", "decisive_agreement", "top5_agreement")]
            cell.append(_fmt(row.get("sqnr_db"), ".1f"))
            if result["eager_fp32_accuracy"] is not None:
                cell.append(_percent(row.get("accuracy")))
        cell += [_fmt(row["size_bytes"], "d"), _fmt(row.get("size_pct_fp32"), ".1f", "%"), _fmt(row["build_s"], ".1f")]
        cells.append(cell)
        lines += [f"  note ({row['pipeline']}): {note}" for note in row["notes"]]
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, ["-" * w for w in widths], *cells]]
    title = (f"{result['model']}: p50 of interleaved blocks (in brackets: the range of the per-block ratios); "
             f"quality on {result['evaluation_samples']} evaluation "
             f"samples vs eager fp32; {result['calibration_samples']} calibration samples"
             + (f"; seq len {result['seq_len']}" if encoder else ""))
    extra = ([f"eager fp32 accuracy {100 * result['eager_fp32_accuracy']:.1f}%"]
             if result["eager_fp32_accuracy"] is not None else [])
    fragility = result.get("fragility")
    if fragility:
        ceiling = fragility["uint8_input"]
        extra += [f"eager fp32 with its input rounded to uint8 over the calibration range (what an integer first "
                  f"layer sees): top-1 agreement {100 * ceiling['top1_agreement']:.1f}%, "
                  f"{_fmt(ceiling['sqnr_db'], '.1f')} dB",
                  f"evaluation samples whose fp32 top-2 probabilities lie within 0.05: "
                  f"{100 * fragility['margin_below_0.05']:.1f}% (median top-1 probability "
                  f"{fragility['median_top1_probability']:.2f}); decisive crops (top-1 beats top-2 by at least "
                  f"{DECISIVE_MARGIN}): {fragility['decisive_crops']} of {result['evaluation_samples']}"]
    return "\n".join([title, *table, *extra, *lines])


def _finite(value):
    """JSON has no infinity: an infinite SQNR (identical outputs) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["efficientnet-lite0", "minilm-l6"],
                        choices=[*CLASSIFIERS, *ENCODERS])
    parser.add_argument("--eval", type=int, default=500, help="evaluation samples (default 500)")
    parser.add_argument("--calib", type=int, default=256, help="calibration samples (default 256)")
    parser.add_argument("--repeats", type=int, default=60, help="timed runs per pipeline and batch (default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help="sentence encoder sequence length (128)")
    parser.add_argument("--no-reconstruct-row", action="store_true",
                        help="Also compile cpu-int8 without its reconstruct pass (image models), to show what it buys.")
    parser.add_argument("--float-macs", type=float, nargs="+", default=None,
                        help="fxpress rows with these float-MAC budgets for quant_sensitivity (default: the target's)")
    parser.add_argument("--no-pt2e", action="store_true", help="skip the PT2E row (its torch.compile is slow)")
    parser.add_argument("--pixels", action="store_true",
                        help="image models on 8-bit crops (uint8, as decoded): every pipeline sees them normalised, "
                             "and fxpress also compiles a uint8-input artifact that takes the pixels themselves")
    parser.add_argument("--json", default=None, help="also write every number to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import onnxruntime as ort

    isa = cpu_isa()
    machine = {"cpu": cpu_model_name(), "isa": isa, "threads": thread_settings(0), "torch": torch.__version__,
               "onnxruntime": ort.__version__, "onnx": onnx.__version__}
    print(f"fxpress int8 peers: {machine['cpu']}, {os.cpu_count()} cpus; int8 flags "
          f"{', '.join(isa['flags']) or 'none'} (VNNI: {'yes' if isa['vnni'] else 'no'}, from {isa['source']})")
    if "int8_format" in isa:
        print(f"backends.onnxruntime.isa int8 format: {isa['int8_format']['name']} ({isa['int8_format']['reason']})")
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, onnx {onnx.__version__}; "
          f"torch threads {torch.get_num_threads()}, onnxruntime intra-op threads default")
    results = []
    for name in args.models:
        results.append(bench_model(name, args))
    print(f"\npeak RSS {peak_rss_mb():.0f} MiB")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(_finite({"machine": machine, "args": vars(args), "results": results}), handle, indent=2)


if __name__ == "__main__":
    main()
