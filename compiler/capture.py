"""Model capture: an ``nn.Module`` and example inputs become the IR, whatever front end works.

Front ends are tried in order and the first that works is recorded:

1. ``torch.fx.symbolic_trace``, then ``torch.export`` of the traced module to reach the ATen
   dialect (symbolic tracing keeps the module hierarchy, so provenance survives);
2. ``torch.export`` (non-strict) of the model itself, for models symbolic tracing cannot follow,
   such as the Hugging Face BERT in all-MiniLM-L6-v2.

Shapes go down a ladder (:mod:`compiler.dynamic_shapes`), each rung below the first a recorded
fallback: the requested dynamic dimensions, then the batch dimensions alone, then static shapes.
The batch dimension is dynamic by default; so is dimension 1 of integer inputs of rank 2 (token
ids and attention masks), as far as the model allows.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from compiler import meta, mutation
from compiler.dynamic_shapes import (
    DynamicDims,
    check_smallest_sizes,
    default_dynamic_dims,
    export_with_dims,
    ladder_fallback,
    resolved_dims,
    shape_ladder,
)
from compiler.errors import CaptureError
from compiler.quiet import quiet_torch
from compiler.shape_bounds import probe_upper_bounds
from compiler.tracing_errors import ModuleTracker, explain_failure

logger = logging.getLogger(__name__)

__all__ = ["Captured", "DynamicDims", "capture", "check_model", "default_dynamic_dims", "normalize_inputs"]


@dataclass
class Captured:
    """The IR with what the rest of the pipeline needs to know about the model's interface."""

    graph_module: fx.GraphModule
    front_end: str
    input_names: tuple[str, ...]
    output_spec: pytree.TreeSpec
    dynamic_dims: DynamicDims
    output_constants: dict[int, object] = field(default_factory=dict)  # flat position -> None, ...
    attempts: list[dict[str, str]] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    probed_bounds: dict[str, dict] = field(default_factory=dict)  # dim name -> {max, table_rows, reason}
    seconds: float = 0.0


def normalize_inputs(example_inputs: object) -> tuple[torch.Tensor, ...]:
    """Turn a tensor or a sequence of tensors into a tuple, refusing anything else."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise CaptureError(
            "example_inputs must be a tensor or a non-empty tuple of tensors, got "
            f"{type(example_inputs).__name__}; pass e.g. example_inputs=(torch.randn(1, 3, 224, 224),)"
        )
    for index, value in enumerate(example_inputs):
        if not isinstance(value, torch.Tensor):
            raise CaptureError(f"example input {index} is a {type(value).__name__}, not a tensor")
    return tuple(example_inputs)


def capture(
    model: torch.nn.Module,
    example_inputs: object,
    dynamic_dims: DynamicDims | None = None,
) -> Captured:
    """Capture ``model`` into the canonical IR.

    Args:
        model: the model, in eval mode.
        example_inputs: a tensor or tuple of tensors the model accepts.
        dynamic_dims: which input dimensions may vary, with the widest range wanted (max None: as
            far as the model allows); defaults to :func:`default_dynamic_dims`. ``{}`` asks for
            static shapes.

    Raises:
        CaptureError: naming the module path and source line that broke tracing.
    """
    inputs = normalize_inputs(example_inputs)
    check_model(model, inputs)
    requested = default_dynamic_dims(inputs) if dynamic_dims is None else dynamic_dims
    started = time.perf_counter()
    attempts: list[dict[str, str]] = []
    errors: list[tuple[str, BaseException, str]] = []
    versions = mutation.tensor_versions(model)
    for front_end, trace, dims in _front_ends(model, requested):
        tracker = ModuleTracker(model)
        try:
            with tracker, quiet_torch():
                program = trace(inputs)
        except Exception as error:  # noqa: BLE001 - every failure is reported, then the next is tried
            attempts.append({"front_end": front_end, "error": _one_line(error)})
            errors.append((front_end, error, tracker.failed_path))
            logger.info("capture: %s failed: %s", front_end, _one_line(error))
            continue
        mutation.refuse_changed_state(model, versions)
        captured = _finish(program, model, inputs, dims, front_end)
        attempts.append({"front_end": front_end, "error": ""})
        captured.attempts = attempts
        if dims is not requested:
            captured.fallbacks.append(ladder_fallback(front_end, dims, inputs, captured.input_names, errors[-1][1]))
        captured.dynamic_dims, smallest = check_smallest_sizes(model, captured.graph_module, inputs,
                                                               captured.dynamic_dims)
        captured.fallbacks.extend(smallest)
        captured.dynamic_dims, captured.probed_bounds = probe_upper_bounds(model, inputs, captured.dynamic_dims)
        captured.seconds = time.perf_counter() - started
        logger.info("capture: %s in %.1f s, dynamic dims %s", front_end, captured.seconds, captured.dynamic_dims)
        return captured
    raise explain_failure(errors, model)


def check_model(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Refuse models and inputs that cannot give a correct inference graph."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    training = [name or "<root>" for name, module in model.named_modules() if module.training]
    if training:
        raise CaptureError(
            f"module {training[0]!r} is in training mode ({len(training)} modules are); "
            "call model.eval() before compiling",
            module_path=training[0],
        )
    tensors = [("parameter", *item) for item in model.named_parameters()]
    tensors += [("buffer", *item) for item in model.named_buffers()]
    for kind, name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            owner = name.rpartition(".")[0]
            raise CaptureError(
                f"{kind} {name!r} of module {owner or '<root>'!r} holds NaN or Inf values; "
                "fix or re-train the model",
                module_path=owner,
            )
    for index, tensor in enumerate(inputs):
        if tensor.dim() >= 1 and tensor.shape[0] == 0:
            raise CaptureError(
                f"example input {index} has batch size 0; give at least one sample"
            )


def _front_ends(model: torch.nn.Module, requested: DynamicDims):
    """(front end, trace(inputs) -> ExportedProgram, dims) in the order to try them.

    Symbolic tracing is tried once, at the first rung: whether it can follow the model does not
    depend on shapes, and the plain export of the lower rungs captures the same graph.
    """
    for rung, (suffix, dims) in enumerate(shape_ladder(requested)):
        if rung == 0:
            yield "torch.fx.symbolic_trace", functools.partial(_fx_then_export, model, dims=dims), dims
        yield f"torch.export{suffix}", functools.partial(export_with_dims, model, dims=dims), dims


def _fx_then_export(model: torch.nn.Module, inputs: tuple, dims: DynamicDims):
    return export_with_dims(fx.symbolic_trace(model), inputs, dims)


def _finish(program, model, inputs, dims: DynamicDims, front_end: str) -> Captured:
    mutation.refuse_state_writes(program)
    program = mutation.functionalize_if_needed(program)
    gm = program.module()
    for submodule in gm.modules():  # the unlifted module refuses .eval(); set the flag itself
        submodule.training = False
    output_spec = plain_containers(gm._out_spec)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    gm.graph._codegen = fx.graph.CodeGen()
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    constants = _strip_constant_outputs(gm)
    _annotate_provenance(gm, getattr(model, "fxpress_path_prefix", ""))
    gm.graph.lint()
    gm.recompile()
    input_names = _input_names(model, [node.name for node in gm.graph.nodes if node.op == "placeholder"])
    return Captured(gm, front_end, input_names, output_spec, resolved_dims(program, dims), constants)


def plain_containers(spec: pytree.TreeSpec) -> pytree.TreeSpec:
    """``spec`` with torch.fx's immutable dicts and lists made plain again.

    Symbolic tracing returns immutable containers; the compiled model returns the original's.
    """
    return pytree.tree_structure(_thaw(pytree.tree_unflatten(list(range(spec.num_leaves)), spec)))


def _thaw(value: object) -> object:
    if isinstance(value, fx.immutable_collections.immutable_dict) or type(value) is dict:
        return {key: _thaw(item) for key, item in value.items()}
    if isinstance(value, fx.immutable_collections.immutable_list) or type(value) is list:
        return [_thaw(item) for item in value]
    if type(value) is tuple:
        return tuple(_thaw(item) for item in value)
    return value


def _strip_constant_outputs(gm: fx.GraphModule) -> dict[int, object]:
    """Leave only tensors in the graph's outputs; return the rest (``None``, ...) by flat position.

    The compiled model puts them back where the model returned them.
    """
    output = gm.graph.output_node()
    flat = list(output.args[0])
    constants = {index: value for index, value in enumerate(flat) if not isinstance(value, fx.Node)}
    output.args = (tuple(value for value in flat if isinstance(value, fx.Node)),)
    return constants


def _annotate_provenance(gm: fx.GraphModule, prefix: str = "") -> None:
    """Module path and class of every node; ``prefix`` (a wrapper's, e.g. ``"model."``) is cut from the paths."""
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            path, class_name = node.target.rpartition(".")[0], ""
        else:
            path, class_name = meta.module_path_from_stack(node.meta.get(meta.NN_MODULE_STACK))
        if prefix and (path + ".").startswith(prefix):
            path = path[len(prefix):]
        node.meta[meta.MODULE_PATH] = path
        node.meta[meta.MODULE_TYPE] = class_name


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _input_names(model: torch.nn.Module, placeholders: list[str]) -> tuple[str, ...]:
    """The names of ``forward``'s parameters (fx renames ``input`` to ``input_1``), else the placeholders'."""
    try:
        parameters = [
            parameter.name for parameter in inspect.signature(model.forward).parameters.values()
            if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return tuple(placeholders)
    return tuple(parameters[: len(placeholders)]) if len(parameters) >= len(placeholders) else tuple(placeholders)
