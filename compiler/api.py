"""The public API: ``compile`` and ``inspect``."""

from __future__ import annotations

import logging

import torch
import torch.utils._pytree as pytree

from compiler import probe
from compiler.artifact import package_versions
from compiler.backend_base import LoweringRequest
from compiler.capture import DynamicDims
from compiler.compiled import CompiledModel
from compiler.errors import AccuracyError, TargetError
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

    Returns:
        A CompiledModel: callable on torch tensors, with ``.report``, ``.onnx`` and ``.save()``.
    """
    result = run_pipeline(
        model, target, example_inputs, calibration_data=calibration_data, dump_dir=dump_dir,
        dynamic_dims=dynamic_dims, verify=verify, model_name=model_name,
    )
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
    manifest = build_manifest(result, output_names, lowered.info)
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
) -> Ledger:
    """Run the target's pipeline without lowering and return the ledger."""
    return run_pipeline(
        model, target, example_inputs, calibration_data=calibration_data, dump_dir=dump_dir,
        dynamic_dims=dynamic_dims, model_name=model_name,
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


def build_manifest(result: PipelineResult, output_names: tuple[str, ...], info: dict) -> dict:
    """What a deployment needs to know about the artifact (no timestamps: it must be reproducible)."""
    captured = result.captured
    inputs = [
        {
            "name": name,
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "shape": list(tensor.shape),
            "dynamic_dims": {str(dim): list(spec) for dim, spec in captured.dynamic_dims.get(index, {}).items()},
        }
        for index, (name, tensor) in enumerate(zip(captured.input_names, result.inputs, strict=True))
    ]
    outputs = [
        {"name": name, "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
        for name, tensor in zip(output_names, result.reference, strict=True)
    ]
    return {
        "format": "fxpress-artifact/1",
        "versions": package_versions(),
        "target": result.target.to_dict(),
        "front_end": captured.front_end,
        "inputs": inputs,
        "outputs": outputs,
        "output_structure": pytree.treespec_dumps(captured.output_spec),
        "opset": info.get("opset"),
        "ir_version": info.get("ir_version"),
    }
