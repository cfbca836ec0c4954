"""Dynamic input dimensions: what is asked for, the ladder down to static shapes, what export found.

A requested dimension is a ``Dim.DYNAMIC`` hint with the widest range wanted, so the exporter
itself narrows it to what the model allows (a BERT's sequence stops at its position table) and
fails only where the model fixes the size. The ladder then drops to the batch dimensions alone,
then to static shapes; each rung below the first is a recorded fallback with a logged warning
that names the ``dynamic_dims`` that would ask for it directly.

Export never traces a dimension at size 0 or 1 (it specialises on them), so it reports a minimum
of 2; :func:`check_smallest_sizes` runs the captured graph and eager with every dynamic dimension
at size 1 before the artifact claims that size.
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.utils._pytree as pytree
from torch.export import Dim

from compiler import meta, probe

logger = logging.getLogger(__name__)

# {input index: {dim index: (name, min, max)}}; max None means unbounded.
DynamicDims = dict[int, dict[int, tuple[str, int, int | None]]]


def default_dynamic_dims(inputs: tuple[torch.Tensor, ...]) -> DynamicDims:
    """Batch dynamic everywhere; sequence dynamic for integer inputs of rank 2."""
    dims: DynamicDims = {}
    for index, tensor in enumerate(inputs):
        dims[index] = {0: ("batch", 1, None)} if tensor.dim() >= 1 else {}
        if tensor.dim() == 2 and not tensor.is_floating_point() and tensor.dtype != torch.bool:
            dims[index][1] = ("sequence", 1, None)
    return dims


_BATCH_ONLY = ", batch dynamic only"
_STATIC = ", static shapes"


def shape_ladder(requested: DynamicDims) -> list[tuple[str, DynamicDims]]:
    """(front-end suffix, dims) from the requested dims down to static shapes, without repeats."""
    batch_only = {index: {dim: spec for dim, spec in dims.items() if dim == 0} for index, dims in requested.items()}
    rungs = [("", requested)]
    if batch_only != requested:
        rungs.append((_BATCH_ONLY, batch_only))
    if any(batch_only.values()):
        rungs.append((_STATIC, {}))
    return rungs


def export_with_dims(model: torch.nn.Module, inputs: tuple, dims: DynamicDims):
    """Non-strict ``torch.export`` with every requested dim a ``Dim.DYNAMIC`` hint within its range.

    Size-1 dims are widened to 2 first, because export specialises dimensions of size 0 and 1.
    The inputs are copies: export marks the tensors it traces as dynamic, and a static rung
    traced with the same tensors would inherit the marks of the rung above it.
    """
    trace_inputs = tuple(tensor.clone() for tensor in widen_inputs(inputs, dims))
    per_input = tuple(
        {dim: Dim.DYNAMIC(min=low, max=high) if high else Dim.DYNAMIC(min=low)
         for dim, (_, low, high) in dims.get(index, {}).items()}
        or None
        for index in range(len(inputs))
    )
    dynamic_shapes = _shapes_for_signature(model, per_input)
    return torch.export.export(model, trace_inputs, dynamic_shapes=dynamic_shapes, strict=False)


def _shapes_for_signature(model: torch.nn.Module, per_input: tuple) -> tuple | None:
    """``dynamic_shapes`` laid out as ``forward``'s parameters: inputs caught by ``*args`` are one entry."""
    if not any(per_input):
        return None
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return per_input
    for position, parameter in enumerate(parameters):
        if parameter.kind is parameter.VAR_POSITIONAL:
            return (*per_input[:position], tuple(per_input[position:]))
    return per_input


def widen_inputs(inputs: tuple[torch.Tensor, ...], dims: DynamicDims) -> tuple[torch.Tensor, ...]:
    """Inputs with every dynamic dimension of size 1 doubled, for tracing (see ``_export``)."""
    return tuple(_widen(tensor, dims.get(index, {})) for index, tensor in enumerate(inputs))


def _widen(tensor: torch.Tensor, dims: dict[int, tuple]) -> torch.Tensor:
    for dim in dims:
        if tensor.shape[dim] == 1:
            tensor = torch.cat([tensor, tensor], dim=dim)
    return tensor


def resolved_dims(program, dims: DynamicDims) -> DynamicDims:
    """The dims that really stayed dynamic, with the ranges export found for them.

    Dims that share a name (the batch of every input) are one dimension: its range is the
    intersection of theirs. A lower bound of 2 that comes only from export's refusal to trace
    sizes 0 and 1 is given back as the requested minimum; :func:`check_smallest_sizes` checks it.
    """
    placeholders = [
        spec.arg.name for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"
    ]
    values = {node.name: node.meta.get(meta.VAL) for node in program.graph.nodes if node.op == "placeholder"}
    found: dict[str, tuple[int, int | None]] = {}
    where: list[tuple[int, int, str]] = []
    for index, name in enumerate(placeholders):
        for dim, (dim_name, low, high) in dims.get(index, {}).items():
            size = values[name].shape[dim]
            if not isinstance(size, torch.SymInt):
                continue
            export_low, export_high = _range_of(program, size)
            low = low if export_low <= 2 else max(low, export_low)
            high = export_high if high is None else min(high, export_high or high)
            previous_low, previous_high = found.get(dim_name, (low, high))
            found[dim_name] = (max(low, previous_low), _smaller(high, previous_high))
            where.append((index, dim, dim_name))
    resolved: DynamicDims = {index: {} for index in range(len(placeholders))}
    for index, dim, dim_name in where:
        resolved[index][dim] = (dim_name, *found[dim_name])
    return resolved


def _smaller(first: int | None, second: int | None) -> int | None:
    """The smaller of two upper bounds, None meaning unbounded."""
    bounds = [bound for bound in (first, second) if bound is not None]
    return min(bounds) if bounds else None


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


def ladder_fallback(
    front_end: str, dims: DynamicDims, inputs: tuple[torch.Tensor, ...], input_names: tuple[str, ...],
    error: BaseException,
) -> str:
    """The ledger line for a rung below the first, also logged once as a warning.

    It names what was fixed, why (the exporter's own reason), and the ``dynamic_dims`` that asks
    for these shapes directly, so that a user who accepts them gets no fallback.
    """
    fixed = [
        f"{input_names[index]}{list(tensor.shape)}"
        for index, tensor in enumerate(inputs)
        if set(range(tensor.dim())) - set(dims.get(index, {}))
    ]
    line = (f"capture fell back to {front_end}: the requested dynamic dimensions did not trace ({_reason(error)}); "
            f"fixed at the example sizes: {', '.join(fixed)}")
    logger.warning("%s. To avoid the fallback, make the model trace with those dimensions dynamic, or ask for these "
                   "shapes with dynamic_dims=%r; strict=True (--strict) refuses fallbacks", line, dims)
    return line


def _reason(error: BaseException) -> str:
    """The exporter's first line, with its first bullet (which names the dimension) when it has one."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    bullet = next((line.removeprefix("- ") for line in lines[1:] if line.startswith("- ")), "")
    first = lines[0].split(" For more information")[0]
    return " ".join(filter(None, (first, bullet.split(". ")[0])))[:300]


def check_smallest_sizes(
    model: torch.nn.Module, graph_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], dims: DynamicDims,
) -> tuple[DynamicDims, list[str]]:
    """Dims whose minimum 1 the captured graph really handles, and fallback lines for the others.

    Every dynamic dimension with a minimum of 1 (and an example size above 1) is narrowed to 1 at
    once and the graph compared with eager within the exact passes' 1e-4. Where they differ, or
    either fails, the minimum becomes 2.
    """
    names = {spec[0] for per_input in dims.values() for spec in per_input.values() if spec[1] == 1}
    narrowed = narrow_inputs(inputs, dims, names)
    if narrowed is None:
        return dims, []
    problem = _compare_with_eager(model, graph_module, narrowed)
    if problem is None:
        return dims, []
    raised = {index: {dim: (name, 2 if name in names else low, high) for dim, (name, low, high) in per_input.items()}
              for index, per_input in dims.items()}
    line = (f"the captured graph does not match eager with {', '.join(sorted(names))} of size 1 ({problem}); "
            "the artifact accepts sizes from 2")
    logger.warning("%s", line)
    return raised, [line]


def narrow_inputs(
    inputs: tuple[torch.Tensor, ...], dims: DynamicDims, names: set[str],
) -> tuple[torch.Tensor, ...] | None:
    """``inputs`` with every dim named in ``names`` cut to size 1; None when none is longer than 1."""
    narrowed, changed = [], False
    for index, tensor in enumerate(inputs):
        for dim, (name, _, _) in dims.get(index, {}).items():
            if name in names and tensor.shape[dim] > 1:
                tensor, changed = tensor.narrow(dim, 0, 1), True
        narrowed.append(tensor.clone())
    return tuple(narrowed) if changed else None


def _compare_with_eager(model: torch.nn.Module, graph_module: torch.nn.Module, inputs: tuple) -> str | None:
    """None when the graph matches eager on ``inputs``, else what went wrong, in one line."""
    try:
        with torch.no_grad():
            expected = [leaf for leaf in pytree.tree_leaves(model(*inputs)) if isinstance(leaf, torch.Tensor)]
            actual = [leaf for leaf in pytree.tree_leaves(graph_module(*inputs)) if isinstance(leaf, torch.Tensor)]
    except Exception as error:  # noqa: BLE001 - any failure at size 1 means size 1 is not accepted
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"
    if [tensor.shape for tensor in actual] != [tensor.shape for tensor in expected]:
        return f"output shapes {[tuple(t.shape) for t in actual]} vs eager's {[tuple(t.shape) for t in expected]}"
    if not probe.within_tolerance(tuple(actual), tuple(expected), rtol=1e-4, atol=1e-4):
        return f"outputs differ by up to {probe.drift(tuple(actual), tuple(expected)).max_abs:.3g}"
    return None
