"""Checks of one calibration tensor against its example input, each failure a one-line error.

A value must be a tensor on the CPU, of the example input's kind of dtype (floating point,
integer, boolean, complex: the expected dtype is named), of its rank, not empty; static
dimensions must have the example's size and dynamic ones stay within their ``(min, max)``, equal
across the inputs that share the dimension's name (all of them share the batch dimension);
floating values must be finite. A tensor of the right kind but another dtype (float64 for
float32, int32 for int64) is converted to the example's dtype, and refused when its values do
not survive the conversion (overflow to Inf, integers that do not fit).

Errors are ``CalibrationDataError`` and name the batch (its index in iteration order) and the
input, so that the user can find the offending tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compiler.errors import CalibrationDataError

Batch = tuple[torch.Tensor, ...]
DynamicDims = dict[int, dict[int, tuple[str, int, int | None]]]  # as compiler.capture.DynamicDims


@dataclass(frozen=True)
class InputSpec:
    """What calibration data must look like for one input: the example input and its dynamic dims."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    dynamic: dict[int, tuple[str, int, int | None]]  # dim -> (name, min, max); max None is unbounded


def input_specs(example_inputs: tuple[torch.Tensor, ...], input_names: tuple[str, ...],
                dynamic_dims: DynamicDims) -> tuple[InputSpec, ...]:
    """One :class:`InputSpec` per example input."""
    if len(input_names) != len(example_inputs):
        raise ValueError(f"{len(input_names)} input names for {len(example_inputs)} example inputs")
    return tuple(
        InputSpec(name, tensor.dtype, tuple(tensor.shape), dict(dynamic_dims.get(index, {})))
        for index, (name, tensor) in enumerate(zip(input_names, example_inputs, strict=True))
    )


def batch_error(index: int, name: str | None, problem: str) -> CalibrationDataError:
    """``calibration batch <index>, input '<name>': <problem>`` (without the input when ``name`` is None)."""
    where = f"calibration batch {index}" + (f", input {name!r}" if name is not None else "")
    return CalibrationDataError(f"{where}: {problem}")


def checked_tensor(value: object, index: int, spec: InputSpec) -> torch.Tensor:
    """``value`` if it is a CPU tensor of the right kind, rank and shape with finite values."""
    if not isinstance(value, torch.Tensor):
        hint = "; convert it with torch.as_tensor" if hasattr(value, "__array__") else ""
        raise batch_error(index, spec.name, f"is a {type(value).__name__}, not a tensor{hint}")
    if value.device.type != "cpu":
        raise batch_error(index, spec.name, f"is on {value.device}; calibration runs on the CPU: move it with .cpu()")
    if _kind(value.dtype) != _kind(spec.dtype):
        kind = _kind(spec.dtype)
        problem = f"has dtype {value.dtype}; expected {'an' if kind[0] in 'aeiou' else 'a'} {kind} tensor "
        raise batch_error(index, spec.name, problem + f"({spec.dtype}, like the example input)")
    _check_shape(value, index, spec)
    if value.is_floating_point() or value.is_complex():
        _check_finite(value, index, spec)
    return value.detach() if value.requires_grad else value


def _kind(dtype: torch.dtype) -> str:
    """The kind of dtype that must match: boolean, floating-point, complex or integer."""
    if dtype == torch.bool:
        return "boolean"
    if dtype.is_floating_point:
        return "floating-point"
    return "complex" if dtype.is_complex else "integer"


def _check_shape(value: torch.Tensor, index: int, spec: InputSpec) -> None:
    """Rank, emptiness, then the size of every dimension."""
    if value.dim() != len(spec.shape):
        problem = f"has rank {value.dim()} (shape {tuple(value.shape)}); expected rank {len(spec.shape)} like the "
        raise batch_error(index, spec.name, problem + f"example input {spec.shape}")
    if value.numel() == 0:
        raise batch_error(index, spec.name, f"is empty (shape {tuple(value.shape)}); every batch needs values")
    for dim, size in enumerate(value.shape):
        problem = _dimension_problem(dim, size, spec)
        if problem:
            raise batch_error(index, spec.name, problem)


def _dimension_problem(dim: int, size: int, spec: InputSpec) -> str:
    """Why ``size`` is wrong for dimension ``dim``, or "" when it is right."""
    if dim not in spec.dynamic:
        if size == spec.shape[dim]:
            return ""
        dynamic = ", ".join(f"{d} ({name!r})" for d, (name, _, _) in sorted(spec.dynamic.items())) or "none"
        return (f"dimension {dim} has size {size} but is static: it must be {spec.shape[dim]} like the example "
                f"input {spec.shape} (dynamic dimensions: {dynamic})")
    name, low, high = spec.dynamic[dim]
    if size >= low and (high is None or size <= high):
        return ""
    return f"dimension {dim} ({name!r}) has size {size}, outside its range {low}..{'' if high is None else high}"


def _check_finite(value: torch.Tensor, index: int, spec: InputSpec) -> None:
    """Refuse NaN and Inf, counting each."""
    finite = torch.isfinite(value)
    if bool(finite.all()):
        return
    nan = int(torch.isnan(value).sum())
    infinite = int((~finite).sum()) - nan
    raise batch_error(index, spec.name, f"holds {nan} NaN and {infinite} Inf value(s); remove or replace them")


def converted(tensor: torch.Tensor, index: int, spec: InputSpec) -> torch.Tensor:
    """``tensor`` in the example's dtype; refuse values the conversion would change beyond rounding."""
    result = tensor.to(spec.dtype)
    if result.is_floating_point() and not bool(torch.isfinite(result).all()):
        problem = f"has values beyond the largest {spec.dtype}, {torch.finfo(spec.dtype).max:g}: "
        raise batch_error(index, spec.name, problem + "it cannot be converted")
    if not result.is_floating_point() and not torch.equal(result.to(tensor.dtype), tensor):
        raise batch_error(index, spec.name, f"has values that do not fit {spec.dtype}: it cannot be converted")
    return result


def check_shared_dims(batch: Batch, index: int, specs: tuple[InputSpec, ...]) -> None:
    """Inputs that share a dynamic dimension's name (all the batch dims) must agree on its size."""
    seen: dict[str, tuple[str, int]] = {}
    for spec, tensor in zip(specs, batch, strict=True):
        for dim, (dim_name, _, _) in spec.dynamic.items():
            first_input, size = seen.setdefault(dim_name, (spec.name, tensor.shape[dim]))
            if size != tensor.shape[dim]:
                problem = f"dimension {dim} ({dim_name!r}) has size {tensor.shape[dim]} but {size} in input "
                raise batch_error(index, spec.name, problem + f"{first_input!r}; inputs sharing it must agree")
