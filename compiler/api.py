"""The public API: ``compile`` and ``inspect``."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
import torch.utils._pytree as pytree

from compiler import probe
from compiler.artifact import DATA_FILE, MANIFEST_FILE, MODEL_FILE, REPORT_JSON, read_manifest, read_model
from compiler.backend_base import Backend, LoweringRequest, Runner
from compiler.capture import DynamicDims
from compiler.compiled import CompiledModel
from compiler.errors import AccuracyError, ArtifactError, EmulationError, FallbackError, FxpressError
from compiler.input_format import PixelInput, check_pixels, parse_input_format
from compiler.manifest import build_manifest
from compiler.pipeline import PipelineResult, make_backend, registry, run_pipeline
from compiler.pruning_options import compression_passes
from compiler.report import Ledger
from compiler.targets import Target, get_target
from compiler.threads import compile_threads

logger = logging.getLogger(__name__)


def compile(  # noqa: A001 - the product's name for it
    model: torch.nn.Module,
    target: str | Target = "cpu-fp32",
    example_inputs: object = None,
    calibration_data: object = None,
    dump_dir: str | None = None,
    *,
    dynamic_dims: DynamicDims | None = None,
    verify: bool = True,
    model_name: str | None = None,
    strict: bool = False,
    progress: Callable[[str], None] | None = None,
    prune: dict | None = None,
    low_rank: dict | None = None,
    train_data: object = None,
    recover_seconds: float = 180.0,
    recover: dict | None = None,
    threads: int | str = "auto",
    input_format: dict | None = None,
    before_lowering: Callable[[torch.fx.GraphModule], None] | None = None,
) -> CompiledModel:
    """Compile ``model`` for ``target``.

    Args:
        model: a ``torch.nn.Module`` in eval mode.
        target: a name from ``TARGETS`` (``"cpu-fp32"``) or a ``Target``.
        example_inputs: a tensor or tuple of tensors the model accepts.
        calibration_data: sample inputs for targets that calibrate.
        dump_dir: write the IR after every pass there (``00_capture.txt``, ``01_<pass>.txt``, ...).
        dynamic_dims: ``{input index: {dim: (name, min, max)}}``, max None for as far as the model
            allows; default: batch, and sequence for integer rank-2 inputs. The exporter narrows
            each range to what the model accepts (the ledger records it); ``{}`` asks for static
            shapes. Where the requested dims do not trace, capture falls back to batch-only and
            then static shapes, logs a warning and records the fallback.
        verify: check the graph after every pass (on by default).
        model_name: the name used in the ledger.
        strict: raise FallbackError if the ledger records any fallback (a capture fallback fails
            before any pass runs).
        progress: called with a step name as each step (capture, every pass, lowering) finishes.
        prune: pruning before quantisation. Structured: ``{"macs": 0.3}`` or ``{"params": 0.3}`` (the
            fraction to remove) or ``{"latency": 0.7}`` (the share of the unpruned model's latency in the
            target's runtime to reach, measured at ``"latency_batch"``, default the example's batch), with
            ``"importance"`` (``"reconstruction"``, the data-aware default,
            ``"taylor"``, ``"l1"``, ``"l2"``, ``"bn_scale"``), ``"allocation"`` (``"uniform"``, ``"sensitivity"``:
            scores scaled by each group's measured effect on the output, or ``"global"``; default
            sensitivity for a latency budget, uniform otherwise), ``"max_prune"``
            (the most of one group removed, 0.8), ``"protect"`` (fnmatch patterns of layers whose width
            stays), ``"round_to"`` (``"auto"``: the backend's kernel block) and
            ``"reconstruct"`` (``"readers"``, ``"all"`` or False: least-squares re-fit on calibration
            data). Unstructured: ``{"sparsity": 0.5}`` or ``{"threshold": 1e-3}`` (zeroes weights; no
            speed-up on ONNX Runtime).
        low_rank: low-rank factorisation before quantisation (after pruning): ``{"macs": 0.3}`` or
            ``{"params": 0.3}`` (the share of the conv and linear layers' MACs or weights to remove) or
            ``{"energy": 0.95}`` (per layer, the share of its output energy on the calibration data to
            keep), with ``"method"`` (``"activation"``, the output-aware default, or ``"svd"``),
            ``"allocation"`` (``"sensitivity"``, measured per layer, or ``"uniform"``), ``"protect"``
            (fnmatch patterns of layers left whole), ``"round_to"`` (``"auto"``: the backend's kernel
            block), ``"refit"`` (sequential reduced-rank regression on the factorised model's inputs),
            ``"weighting"`` (``"gradient"``: output features weighted by the model output's gradient, or
            ``"none"``), ``"samples"`` and ``"probe_samples"`` (calibration samples read, and those the
            sensitivity is measured on) and ``"savings_only"`` (False also factorises at ranks that save
            nothing: for checks).
        train_data: unlabelled batches for recovery after pruning or factorisation; default: ``calibration_data``.
        recover_seconds: wall-clock budget of distillation recovery after pruning or factorisation (0 skips it).
        recover: more recovery options: ``"augment"`` (``"auto"``: image inputs also drawn mirrored,
            ``"mirror"``, ``"none"``), ``"lr"`` (1e-4), ``"temperature"`` (2), ``"batch_size"`` (16),
            ``"seed"``, ``"schedule"`` (``"cosine"``/``"constant"``), ``"features"`` (intermediate
            points matched, 4), ``"feature_weight"``, ``"feature_cache_mb"`` and ``"max_steps"``.
        threads: PyTorch intra-op threads while compiling: ``"auto"`` (the idle cores, measured at the
            start, at least one: see :mod:`compiler.threads`) or a number; recorded in
            ``report.capture["threads"]``, PyTorch's setting restored afterwards.
        input_format: for image models, ``{"dtype": "uint8", "mean": [...], "std": [...], "layout": "NCHW" |
            "NHWC"}`` (mean and std on the [0, 1] scale): the artifact takes 8-bit pixels, with the
            normalisation folded into the first convolution (:mod:`compiler.input_format`);
            ``example_inputs`` and ``calibration_data`` are then uint8 pixels too.
        before_lowering: called with the optimised IR before it is lowered; an exception it raises
            stops the compile (a search rejects a trial whose simulation already fails its gates).

    Returns:
        A CompiledModel: callable on torch tensors, with ``.report``, ``.onnx`` and ``.save()``.
    """
    backend_target = get_target(target)
    backend = make_backend(backend_target)  # a bad backend option fails now, not after the passes
    pixel_format = parse_input_format(input_format)
    if pixel_format is not None:
        check_pixels(example_inputs if isinstance(example_inputs, tuple) else (example_inputs,), pixel_format,
                     "example_inputs")
        model = PixelInput(model, pixel_format)
    extra = compression_passes(prune, low_rank, recover_seconds, recover)
    if extra and calibration_data is None and train_data is not None:
        calibration_data = train_data  # recovery reads the calibration slot when no other data is given
    with compile_threads(threads) as thread_record:
        return _compile(
            model, target, example_inputs, calibration_data, dump_dir, backend_target, backend, thread_record,
            dynamic_dims=dynamic_dims, verify=verify, model_name=model_name, strict=strict, progress=progress,
            train_data=train_data, extra=extra, before_lowering=before_lowering,
        )


def _compile(model, target, example_inputs, calibration_data, dump_dir, backend_target: Target, backend: Backend,
             thread_record: dict, *, dynamic_dims, verify, model_name, strict, progress, train_data, extra,
             before_lowering=None) -> CompiledModel:
    """``compile`` after its arguments are checked, on the thread count ``thread_record`` chose."""
    result = run_pipeline(
        model, target, example_inputs, calibration_data=calibration_data, dump_dir=dump_dir,
        dynamic_dims=dynamic_dims, verify=verify, model_name=model_name, progress=progress, strict=strict,
        train_data=train_data, extra_passes=extra,
    )
    result.ledger.capture["threads"] = thread_record
    if before_lowering is not None:
        before_lowering(result.graph_module)
    if isinstance(model, PixelInput):
        result.ledger.capture["input_format"] = model.input_format.to_dict()
    if result.target.name != backend_target.name:  # the target handed a Linear-heavy model to another
        backend = make_backend(result.target)
    fallbacks = list(result.ledger.fallbacks)
    if strict and fallbacks:
        raise FallbackError(f"strict mode: {len(fallbacks)} fallback(s) recorded: " + "; ".join(fallbacks))
    output_names = _output_names(len(result.reference))
    lowered = backend.lower(LoweringRequest(
        result.graph_module, result.inputs, result.captured.input_names, output_names,
        result.captured.dynamic_dims,
    ))
    result.ledger.fallbacks.extend(lowered.warnings)
    _check_lowered(result, lowered.runner.run(result.inputs), lowered.info, backend)
    if strict and len(result.ledger.fallbacks) > len(fallbacks):
        raise FallbackError("strict mode: lowering recorded: " + "; ".join(result.ledger.fallbacks[len(fallbacks):]))
    if progress is not None:
        progress("lower")
    manifest = build_manifest(result, output_names, lowered.info, calibration_data)
    return CompiledModel(
        lowered.model, lowered.runner, result.ledger, manifest, result.captured.output_spec,
        result.captured.output_constants, graph_module=result.graph_module, emulator=backend.emulate,
        files=lowered.files,
    )


def inspect(
    model: torch.nn.Module,
    target: str | Target = "cpu-fp32",
    example_inputs: object = None,
    calibration_data: object = None,
    dump_dir: str | None = None,
    *,
    dynamic_dims: DynamicDims | None = None,
    model_name: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Ledger:
    """Run the target's pipeline without lowering and return the ledger (arguments as ``compile``)."""
    return run_pipeline(
        model, target, example_inputs, calibration_data=calibration_data, dump_dir=dump_dir,
        dynamic_dims=dynamic_dims, model_name=model_name, progress=progress,
    ).ledger


def _output_names(count: int) -> tuple[str, ...]:
    return ("output",) if count == 1 else tuple(f"output_{index}" for index in range(count))


def _check_lowered(result: PipelineResult, outputs: tuple[torch.Tensor, ...], info: dict, backend: Backend) -> None:
    drift = probe.drift(outputs, result.reference)
    info["drift"] = drift.to_dict()
    result.ledger.lowering = info
    tolerance = result.target.tolerance
    if tolerance.steps is not None:
        _check_against_simulation(result, outputs, info, backend)
        return
    # A pipeline that changes the outputs on purpose (pruning) is lowered right when the runtime
    # computes what its final IR computes; eager is then the ledger's business, not lowering's.
    reference, against = (_ir_outputs(result), "its optimised IR") if result.lossy else (result.reference, "eager")
    atol = tolerance.atol
    if result.lossy:  # re-fitted weights: fp32 rounding grows with the outputs' scale, so atol does too
        atol *= max(1.0, max(float(tensor.abs().max()) for tensor in reference if tensor.numel()))
    if not probe.within_tolerance(outputs, reference, tolerance.rtol, atol):
        drift = probe.drift(outputs, reference)
        raise AccuracyError(
            f"the {info['backend']} model differs from {against} beyond the target's tolerance "
            f"(rtol={tolerance.rtol}, atol={atol:.3g}): max abs diff {drift.max_abs:.3g}, "
            f"cosine {drift.cosine:.6f}; run inspect() to see each pass's drift"
        )


def _ir_outputs(result: PipelineResult) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return tuple(result.graph_module(*result.inputs))


_SIMULATION_MIN_COSINE = 0.99  # below this, runtime and simulation disagree by more than rounding


def _check_against_simulation(
    result: PipelineResult, outputs: tuple[torch.Tensor, ...], info: dict, backend: Backend,
) -> None:
    """A quantised model must match its torch simulation within the target's steps, not fp32 eager.

    The simulation is the integer emulation (:mod:`backends.onnxruntime.emulation`): the groups ONNX
    Runtime fuses into integer kernels run with those kernels' arithmetic and the layers left in
    float with MLAS's summation orders, so on x86-64 it equals the runtime bit for bit and any
    difference is a lowering that does not compute what the IR says. The float fake-quant
    simulation broke rounding ties differently and, amplified by the layers after each tie,
    agreed within a step on only 89-99% of real models' outputs.
    """
    tolerance = result.target.tolerance
    simulated, simulation = _simulate(result, backend)
    fraction = probe.within_steps(outputs, simulated, tolerance.steps)
    drift = probe.drift(outputs, simulated)
    info["simulation_agreement"] = {
        "simulation": simulation, "within_steps": tolerance.steps, "fraction": fraction, "drift": drift.to_dict(),
    }
    if drift.cosine < _SIMULATION_MIN_COSINE:
        raise AccuracyError(
            f"the {info['backend']} int8 model does not compute what its torch simulation computes (output cosine "
            f"{drift.cosine:.4f}, {fraction:.2%} of elements within {tolerance.steps:g} step); the lowering is wrong "
            "for this model: keep the offending layers in float (float_modules) and report it"
        )
    if fraction < tolerance.fraction:
        # Kernels the emulation does not reproduce (non-x86 builds, a generic Conv, MatMul) round
        # differently, and large weights downstream amplify it: recorded (strict mode refuses it), not fatal.
        result.ledger.fallbacks.append(
            f"the {info['backend']} int8 model agrees with its torch simulation within {tolerance.steps:g} output "
            f"step(s) on {fraction:.2%} of probe elements, below the target's {tolerance.fraction:.2%}"
        )


def _simulate(result: PipelineResult, backend: Backend) -> tuple[tuple[torch.Tensor, ...], str]:
    """The integer emulation of the probe batch; the float simulation, recorded, where the IR defeats it."""
    try:
        return backend.emulate(result.graph_module, *result.inputs), backend.emulation
    except EmulationError as error:
        result.ledger.fallbacks.append(f"integer emulation failed ({error}); compared with the float simulation")
        return probe.run_annotated(result.graph_module, result.inputs), "float simulation"


def load(directory: str | Path) -> CompiledModel:
    """A compiled model from an artifact directory alone: no PyTorch model class, no unpickling.

    Raises:
        ArtifactError: not an artifact, a file changed or truncated (SHA-256 mismatch), an
            external-data path outside the directory, or a model the runtime cannot load.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    model = read_model(directory, manifest)
    target = manifest.get("target", {})
    backends = registry("backends")
    if target.get("backend") not in backends:
        raise ArtifactError(f"{directory}: unknown backend {target.get('backend')!r} in the manifest")
    backend = backends[target["backend"]](**target.get("backend_options", {}))
    output_spec = _output_spec(directory, manifest)
    runner = _load_runner(directory, backend, model)
    report = _report(directory, manifest)
    constants = {int(index): value for index, value in manifest.get("output_constants", {}).items()}
    files = {name: (directory / name).read_bytes() for name in manifest.get("files", {}) if name not in _OWN_FILES}
    return CompiledModel(model, runner, report, manifest, output_spec, constants, files=files)


_OWN_FILES = frozenset({MODEL_FILE, DATA_FILE})  # written from the model itself, not as extra files


def _report(directory: Path, manifest: dict) -> Ledger:
    """The ledger saved with the artifact, or an empty one when report.json is absent."""
    path = directory / REPORT_JSON
    if not path.is_file():
        return Ledger(model=manifest.get("model", ""), target=manifest.get("target", {}).get("name", ""))
    try:
        return Ledger.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ArtifactError(f"{path} is not a readable fxpress report ({type(error).__name__}: {error})") from error


def _output_spec(directory: Path, manifest: dict) -> pytree.TreeSpec:
    """The output structure recorded in the manifest; a missing or garbled one is an ArtifactError."""
    try:
        return pytree.treespec_loads(manifest["output_structure"])
    except (KeyError, TypeError, ValueError, NotImplementedError) as error:
        message = f"{directory / MANIFEST_FILE} has no readable output_structure ({type(error).__name__})"
        raise ArtifactError(f"{message}; recompile the model") from error


def _load_runner(directory: Path, backend: Backend, model: onnx.ModelProto) -> Runner:
    """The backend's runner; a model the runtime refuses is an ArtifactError naming the file."""
    try:
        return backend.load(model)
    except FxpressError:
        raise
    except Exception as error:  # noqa: BLE001 - runtimes raise their own exception types
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise ArtifactError(f"{directory / MODEL_FILE} cannot be loaded by the runtime: {first_line}") from error
