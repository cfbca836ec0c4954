"""From model to optimised IR: capture, the eager reference, and the target's passes."""

from __future__ import annotations

import copy
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from compiler import probe
from compiler.capture import Captured, DynamicDims, capture, check_model, normalize_inputs
from compiler.errors import CalibrationDataError, CaptureError, FallbackError, TargetError
from compiler.pass_base import Pass, PassContext
from compiler.pass_manager import PassManager
from compiler.pruning_options import with_passes
from compiler.report import Ledger
from compiler.targets import Target, get_target
from compiler.tracing_errors import ModuleTracker, user_source_line

logger = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    """The optimised IR with everything known about how it was obtained."""

    graph_module: fx.GraphModule
    captured: Captured
    target: Target
    ledger: Ledger
    inputs: tuple[torch.Tensor, ...]
    reference: tuple[torch.Tensor, ...]
    lossy: bool = False  # a pass changed the outputs on purpose (pruning, quantisation)


def registry(package: str) -> dict:
    """``passes.REGISTRY`` or ``backends.REGISTRY`` (compiler reaches them only through these)."""
    return importlib.import_module(package).REGISTRY


def build_passes(target: Target) -> list[Pass]:
    """Instantiate the target's pipeline, refusing unknown passes and options."""
    passes = registry("passes")
    built = []
    for spec in target.pipeline:
        if spec.name not in passes:
            known = ", ".join(sorted(passes))
            raise TargetError(f"target {target.name!r} names unknown pass {spec.name!r}; known passes: {known}")
        built.append(passes[spec.name](**dict(spec.options)))
    return built


def eager_reference(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The model's own flat tensor outputs on ``inputs``, run twice to expose nondeterminism."""
    runs = []
    for _ in range(2):
        tracker = ModuleTracker(model)
        try:
            with tracker, torch.no_grad():
                outputs = model(*inputs)
        except Exception as error:
            where = f"module {tracker.failed_path!r}" if tracker.failed_path else "the model"
            source = user_source_line(error)
            raise CaptureError(
                f"{where} fails on the example inputs: {type(error).__name__}: {error}"
                f"{f' at {source}' if source else ''}. Check the example inputs' shapes and dtypes",
                module_path=tracker.failed_path, source=source,
            ) from error
        runs.append(tuple(leaf for leaf in pytree.tree_leaves(outputs) if isinstance(leaf, torch.Tensor)))
    if not runs[0]:
        raise CaptureError("the model returns no tensors; fxpress compiles models with tensor outputs")
    if not probe.within_tolerance(runs[1], runs[0], rtol=0.0, atol=0.0):
        logger.warning("the model is not deterministic: two eager runs differ")
    return runs[0]


def run_pipeline(
    model: torch.nn.Module,
    target: str | Target,
    example_inputs: object,
    *,
    calibration_data: object = None,
    dump_dir: str | None = None,
    dynamic_dims: DynamicDims | None = None,
    verify: bool = True,
    model_name: str | None = None,
    progress: Callable[[str], None] | None = None,
    strict: bool = False,
    train_data: object = None,
    extra_passes: tuple = (),
    after_pass: Callable[[int, str, fx.GraphModule, bool], None] | None = None,
) -> PipelineResult:
    """Capture ``model`` and run the target's passes with verification and a ledger.

    With ``strict``, a capture that fell back (shapes down the ladder) raises FallbackError before
    any pass runs. ``after_pass`` sees the IR after capture and after each pass (:class:`PassManager`).
    """
    target = get_target(target)
    build_passes(target)  # unknown passes and options fail before the model is traced
    inputs = normalize_inputs(example_inputs)
    check_model(model, inputs)
    reference = eager_reference(model, inputs)
    captured = capture(model, inputs, dynamic_dims)
    if strict and captured.fallbacks:
        raise FallbackError("strict mode: capture recorded a fallback: " + "; ".join(captured.fallbacks))
    if progress is not None:
        progress("capture")
    target, choice = choose_target(target, captured.graph_module, inputs)
    target = with_passes(target, tuple(extra_passes))
    passes = build_passes(target)
    ledger = Ledger(model=model_name or type(model).__name__, target=target.name, capture=_capture_record(captured))
    if choice is not None:
        ledger.capture["target_choice"] = choice
    ledger.fallbacks.extend(captured.fallbacks)
    calibrates = any(getattr(p, "needs_calibration", False) for p in passes)
    if calibration_data is not None and not calibrates and choice is None:
        ledger.fallbacks.append(f"calibration data given but target {target.name!r} does not calibrate; ignored")
    context = PassContext(inputs, inputs, None, target.name)
    backend = make_backend(target)
    context.channel_multiple = backend.channel_multiple()
    context.layer_timer = backend.layer_timer("int8" if target.quant_policy else "float32")  # what its kernels run
    if target.quant_policy:
        context.quant_policy = _quant_policy(target, ledger)
    if calibrates:
        users = [p.name for p in passes if getattr(p, "needs_calibration", False)]
        context.calibration_data = _validated(calibration_data, inputs, captured, target, users)
        ledger.capture["calibration"] = context.calibration_data.summary()
    if any(getattr(p, "needs_teacher", False) for p in passes):
        context.teacher = copy.deepcopy(captured.graph_module)
    if train_data is not None:
        context.train_data = _validated(train_data, inputs, captured, target)
        ledger.capture["train_data"] = context.train_data.summary()
    manager = PassManager(passes, verify=verify, dump_dir=dump_dir, progress=progress, after_pass=after_pass)
    gm = manager.run(captured.graph_module, context, reference, ledger)
    lossy = any(not pass_.exact for pass_ in passes)
    return PipelineResult(gm, captured, target, ledger, inputs, reference, lossy)


def choose_target(target: Target, gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> tuple[Target, dict | None]:
    """The target to compile for: ``target``, or its ``linear_heavy_target`` for a Linear-heavy model.

    Returns the target and, when the target offers a choice, a record of it for the ledger.
    """
    if target.linear_heavy_target is None:
        return target, None
    share = probe.linear_mac_share(gm, inputs)
    chosen = get_target(target.linear_heavy_target) if share >= target.linear_heavy_share else target
    record = {"requested": target.name, "chosen": chosen.name, "linear_mac_share": round(share, 4),
              "threshold": target.linear_heavy_share}
    overrides = [key for key in ("float_modules", "float_prefix") if target.quant_policy.get(key)]
    if chosen is not target and overrides:
        raise TargetError(
            f"{' and '.join(overrides)} would keep layers of a static int8 model in float, but {target.name} hands "
            f"this model ({100 * share:.0f}% of its MACs in Linear/matmul ops) to {chosen.name}, which quantises every "
            f"Linear at run time; drop them, or keep it static: compile(..., target=dataclasses.replace("
            f"get_target({target.name!r}), linear_heavy_target=None))")
    if chosen is not target:
        logger.info("target %s: %.0f%% of MACs are in Linear/matmul ops, compiling for %s",
                    target.name, 100 * share, chosen.name)
    return chosen, record


def _quant_policy(target: Target, ledger: Ledger):
    """The target's placement policy, built by its backend for this machine (both recorded)."""
    backend = make_backend(target)
    policy = backend.quant_policy(dict(target.quant_policy))
    if hardware := backend.hardware():
        ledger.capture["isa"] = hardware
    ledger.capture["quant_policy"] = policy.to_dict()
    return policy


def make_backend(target: Target):
    """The target's backend from ``backends.REGISTRY`` with its options; TargetError if unknown or badly set."""
    backends = registry("backends")
    if target.backend not in backends:
        raise TargetError(f"target {target.name!r} names unknown backend {target.backend!r}")
    return backends[target.backend](**dict(target.backend_options))


def _validated(calibration_data: object, inputs: tuple[torch.Tensor, ...], captured: Captured, target: Target,
               users: list[str] | None = None):
    """Validated calibration batches, before any pass runs; a clear error when none were given."""
    if calibration_data is None:
        readers = f" (read by {', '.join(users)})" if users else ""
        raise CalibrationDataError(
            f"target {target.name!r} needs calibration_data{readers}: an iterable of a few hundred "
            "representative inputs shaped like the example inputs (tensors, tuples or dicts)"
        )
    validate = importlib.import_module("passes.quant.calibration_data").validate_calibration_data
    return validate(calibration_data, inputs, captured.input_names, captured.dynamic_dims)


def _capture_record(captured: Captured) -> dict:
    return {
        "front_end": captured.front_end,
        "seconds": captured.seconds,
        "attempts": captured.attempts,
        "inputs": list(captured.input_names),
        "dynamic_dims": {
            captured.input_names[index]: {str(dim): list(spec) for dim, spec in dims.items()}
            for index, dims in captured.dynamic_dims.items()
        },
        "probed_bounds": captured.probed_bounds,
    }
