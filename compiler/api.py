"""The public API: ``compile`` and ``inspect``."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from compiler import probe
from compiler.artifact import REPORT_JSON, read_manifest, read_model
from compiler.backend_base import LoweringRequest
from compiler.capture import DynamicDims
from compiler.compiled import CompiledModel
from compiler.errors import AccuracyError, ArtifactError, FallbackError, TargetError
from compiler.manifest import build_manifest
from compiler.pipeline import PipelineResult, registry, run_pipeline
from compiler.report import Ledger
from compiler.targets import Target

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
) -> CompiledModel:
    """Compile ``model`` for ``target``.

    Args:
        model: a ``torch.nn.Module`` in eval mode.
        target: a name from ``TARGETS`` (``"cpu-fp32"``) or a ``Target``.
        example_inputs: a tensor or tuple of tensors the model accepts.
        calibration_data: sample inputs for targets that calibrate.
        dump_dir: write the IR after every pass there (``00_capture.txt``, ``01_<pass>.txt``, ...).
        dynamic_dims: ``{input index: {dim: (name, min, max)}}``; default: batch, and sequence for
            integer rank-2 inputs.
        verify: check the graph after every pass (on by default).
        model_name: the name used in the ledger.
        strict: raise FallbackError if the ledger records any fallback.
        progress: called with a step name as each step (capture, every pass, lowering) finishes.

    Returns:
        A CompiledModel: callable on torch tensors, with ``.report``, ``.onnx`` and ``.save()``.
    """
    result = run_pipeline(
        model, target, example_inputs, calibration_data=calibration_data, dump_dir=dump_dir,
        dynamic_dims=dynamic_dims, verify=verify, model_name=model_name, progress=progress,
    )
    fallbacks = result.ledger.fallbacks
    if strict and fallbacks:
        raise FallbackError(f"strict mode: {len(fallbacks)} fallback(s) recorded: " + "; ".join(fallbacks))
    backends = registry("backends")
    if result.target.backend not in backends:
        raise TargetError(f"target {result.target.name!r} names unknown backend {result.target.backend!r}")
    backend = backends[result.target.backend](**dict(result.target.backend_options))
    output_names = _output_names(len(result.reference))
    lowered = backend.lower(LoweringRequest(
        result.graph_module, result.inputs, result.captured.input_names, output_names,
        result.captured.dynamic_dims,
    ))
    _check_lowered(result, lowered.runner.run(result.inputs), lowered.info)
    if progress is not None:
        progress("lower")
    manifest = build_manifest(result, output_names, lowered.info, calibration_data)
    return CompiledModel(
        lowered.model, lowered.runner, result.ledger, manifest, result.captured.output_spec,
        result.captured.output_constants,
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


def _check_lowered(result: PipelineResult, outputs: tuple[torch.Tensor, ...], info: dict) -> None:
    drift = probe.drift(outputs, result.reference)
    info["drift"] = drift.to_dict()
    result.ledger.lowering = info
    tolerance = result.target.tolerance
    if not probe.within_tolerance(outputs, result.reference, tolerance.rtol, tolerance.atol):
        raise AccuracyError(
            f"the {info['backend']} model differs from eager beyond the target's tolerance "
            f"(rtol={tolerance.rtol}, atol={tolerance.atol}): max abs diff {drift.max_abs:.3g}, "
            f"cosine {drift.cosine:.6f}; run inspect() to see each pass's drift"
        )


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
    runner = backend.load(model)
    report_path = directory / REPORT_JSON
    report = Ledger.from_dict(json.loads(report_path.read_text())) if report_path.is_file() else Ledger(
        model=manifest.get("model", ""), target=target.get("name", ""))
    output_spec = pytree.treespec_loads(manifest["output_structure"])
    constants = {int(index): value for index, value in manifest.get("output_constants", {}).items()}
    return CompiledModel(model, runner, report, manifest, output_spec, constants)
