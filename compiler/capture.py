"""Model capture: an ``nn.Module`` and example inputs become the IR, whatever front end works.

Front ends are tried in order and the first that works is recorded:

1. ``torch.fx.symbolic_trace``, then ``torch.export`` of the traced module to reach the ATen
   dialect (symbolic tracing keeps the module hierarchy, so provenance survives);
2. ``torch.export`` (non-strict) of the model itself, for models symbolic tracing cannot follow,
   such as the Hugging Face BERT in all-MiniLM-L6-v2;
3. ``torch.export`` with static shapes: a recorded fallback when no dynamic shape traces.

The batch dimension is dynamic by default; so is dimension 1 of integer inputs of rank 2 (token
ids and attention masks), up to the limit the model itself imposes.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import Dim

from compiler import meta, mutation
from compiler.errors import CaptureError
from compiler.quiet import quiet_torch
from compiler.tracing_errors import ModuleTracker, explain_failure

logger = logging.getLogger(__name__)

# {input index: {dim index: (name, min, max)}}; max None means unbounded.
DynamicDims = dict[int, dict[int, tuple[str, int, int | None]]]


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


def default_dynamic_dims(inputs: tuple[torch.Tensor, ...]) -> DynamicDims:
    """Batch dynamic everywhere; sequence dynamic for integer inputs of rank 2."""
    dims: DynamicDims = {}
    for index, tensor in enumerate(inputs):
        dims[index] = {0: ("batch", 1, None)} if tensor.dim() >= 1 else {}
        if tensor.dim() == 2 and not tensor.is_floating_point() and tensor.dtype != torch.bool:
            dims[index][1] = ("sequence", 1, None)
    return dims


def capture(
    model: torch.nn.Module,
    example_inputs: object,
    dynamic_dims: DynamicDims | None = None,
) -> Captured:
    """Capture ``model`` into the canonical IR.

    Args:
        model: the model, in eval mode.
        example_inputs: a tensor or tuple of tensors the model accepts.
        dynamic_dims: which input dimensions may vary; defaults to :func:`default_dynamic_dims`.

    Raises:
        CaptureError: naming the module path and source line that broke tracing.
    """
    inputs = normalize_inputs(example_inputs)
    check_model(model, inputs)
    dims = default_dynamic_dims(inputs) if dynamic_dims is None else dynamic_dims
    started = time.perf_counter()
    attempts: list[dict[str, str]] = []
    errors: list[tuple[str, BaseException, str]] = []
    versions = mutation.tensor_versions(model)
    for front_end, trace in _front_ends(dims):
        tracker = ModuleTracker(model)
        try:
            with tracker, quiet_torch():
                program, used_dims = trace(model, inputs)
        except Exception as error:  # noqa: BLE001 - every failure is reported, then the next is tried
            attempts.append({"front_end": front_end, "error": _one_line(error)})
            errors.append((front_end, error, tracker.failed_path))
            logger.info("capture: %s failed: %s", front_end, _one_line(error))
            continue
        mutation.refuse_changed_state(model, versions)
        captured = _finish(program, model, inputs, used_dims, front_end)
        attempts.append({"front_end": front_end, "error": ""})
        captured.attempts = attempts
        if front_end.endswith("static shapes"):
            captured.fallbacks.append("dynamic shapes failed to trace; all input shapes are fixed")
        captured.seconds = time.perf_counter() - started
        logger.info("capture: %s in %.1f s", front_end, captured.seconds)
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


def _front_ends(dims: DynamicDims):
    def fx_then_export(model, inputs):
        traced = fx.symbolic_trace(model)
        return _export(traced, inputs, dims)

    def export(model, inputs):
        return _export(model, inputs, dims)

    def export_static(model, inputs):
        return torch.export.export(model, inputs, strict=False), {}

    return (
        ("torch.fx.symbolic_trace", fx_then_export),
        ("torch.export", export),
        ("torch.export, static shapes", export_static),
    )


def _export(model: torch.nn.Module, inputs: tuple, dims: DynamicDims):
    """Non-strict export with the requested dims dynamic.

    Size-1 dims are widened to 2 first, because export specialises dimensions of size 0 and 1.
    """
    trace_inputs = widen_inputs(inputs, dims)
    dynamic_shapes = tuple(
        {dim: Dim(name, min=low, max=high) if high else Dim(name, min=low)
         for dim, (name, low, high) in dims.get(index, {}).items()}
        or None
        for index in range(len(inputs))
    )
    dynamic_shapes = _share_dims(dynamic_shapes)
    program = torch.export.export(model, trace_inputs, dynamic_shapes=dynamic_shapes, strict=False)
    return program, dims


def _share_dims(dynamic_shapes: tuple) -> tuple:
    """Use one ``Dim`` object per name so that inputs agree (all batches are the same batch)."""
    by_name: dict[str, Dim] = {}
    shared = []
    for spec in dynamic_shapes:
        if spec is None:
            shared.append(None)
            continue
        shared.append({dim: by_name.setdefault(value.__name__, value) for dim, value in spec.items()})
    return tuple(shared)


def widen_inputs(inputs: tuple[torch.Tensor, ...], dims: DynamicDims) -> tuple[torch.Tensor, ...]:
    """Inputs with every dynamic dimension of size 1 doubled, for tracing (see ``_export``)."""
    return tuple(_widen(tensor, dims.get(index, {})) for index, tensor in enumerate(inputs))


def _widen(tensor: torch.Tensor, dims: dict[int, tuple]) -> torch.Tensor:
    for dim in dims:
        if tensor.shape[dim] == 1:
            tensor = torch.cat([tensor, tensor], dim=dim)
    return tensor


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
    _annotate_provenance(gm)
    gm.graph.lint()
    gm.recompile()
    input_names = _input_names(model, [node.name for node in gm.graph.nodes if node.op == "placeholder"])
    return Captured(gm, front_end, input_names, output_spec, _resolved_dims(program, dims), constants)


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


def _annotate_provenance(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            node.meta[meta.MODULE_PATH] = node.target.rpartition(".")[0]
            node.meta[meta.MODULE_TYPE] = ""
        else:
            path, class_name = meta.module_path_from_stack(node.meta.get(meta.NN_MODULE_STACK))
            node.meta[meta.MODULE_PATH] = path
            node.meta[meta.MODULE_TYPE] = class_name


def _resolved_dims(program, dims: DynamicDims) -> DynamicDims:
    """The dims that really stayed dynamic, with the ranges export inferred for them."""
    placeholders = [
        spec.arg.name for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"
    ]
    values = {node.name: node.meta.get(meta.VAL) for node in program.graph.nodes if node.op == "placeholder"}
    resolved: DynamicDims = {}
    for index, name in enumerate(placeholders):
        resolved[index] = {}
        for dim, (dim_name, _, _) in dims.get(index, {}).items():
            size = values[name].shape[dim]
            if isinstance(size, torch.SymInt):
                low, high = _range_of(program, size)
                resolved[index][dim] = (dim_name, low, high)
    return resolved


def _range_of(program, size: torch.SymInt) -> tuple[int, int | None]:
    value_range = program.range_constraints.get(size.node.expr)
    if value_range is None:
        return 1, None
    return max(1, _finite_int(value_range.lower) or 1), _finite_int(value_range.upper)


def _finite_int(bound) -> int | None:
    """A sympy range bound as an int, or None when it is infinite (``oo`` or torch's ``int_oo``)."""
    try:
        return int(bound) if bound.is_Integer else None
    except (TypeError, ValueError, AttributeError):
        return None


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
