"""What an artifact accepts as inputs, read from its manifest, and the check of a call against it.

A compiled or loaded model checks every call here before the runtime sees it, so a wrong call
gets an :class:`~compiler.errors.InputError` naming the input, the dimension, what was given and
what the artifact accepts, instead of a runtime's message about its own internals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from compiler.errors import InputError


@dataclass(frozen=True)
class InputSpec:
    """One input of an artifact: its name, dtype, example shape and the dims that may vary."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    dynamic: dict[int, tuple[str, int, int | None]]  # dim -> (name, min, max); max None: unbounded

    @classmethod
    def from_record(cls, record: dict) -> InputSpec:
        """From one entry of the manifest's ``inputs``."""
        dynamic = {int(dim): (spec[0], int(spec[1]), None if spec[2] is None else int(spec[2]))
                   for dim, spec in record.get("dynamic_dims", {}).items()}
        return cls(record["name"], record["dtype"], tuple(record["shape"]), dynamic)

    def describe(self) -> str:
        """The accepted shape, e.g. ``(batch 1..512, 3, 224, 224)``."""
        return "(" + ", ".join(self._describe_dim(dim) for dim in range(len(self.shape))) + ")"

    def _describe_dim(self, dim: int) -> str:
        if dim not in self.dynamic:
            return str(self.shape[dim])
        name, low, high = self.dynamic[dim]
        return f"{name} {low}..{high}" if high is not None else f"{name} >= {low}"


def specs_from_manifest(manifest: dict) -> list[InputSpec] | None:
    """The input specs a manifest records; None for a manifest without them."""
    records = manifest.get("inputs")
    if not isinstance(records, list):
        return None
    return [InputSpec.from_record(record) for record in records]


def check_inputs(specs: Sequence[InputSpec], inputs: Sequence[object]) -> None:
    """Raise InputError for the first way ``inputs`` fall outside what ``specs`` accept."""
    if len(inputs) != len(specs):
        names = ", ".join(spec.name for spec in specs)
        raise InputError(f"the model takes {len(specs)} input(s) ({names}), got {len(inputs)}; call it with "
                         f"({names})", given=len(inputs), accepted=len(specs))
    sizes: dict[str, tuple[str, int]] = {}
    for spec, value in zip(specs, inputs, strict=True):
        _check_one(spec, value)
        _check_shared(spec, value, sizes)


def _check_one(spec: InputSpec, value: object) -> None:
    if not isinstance(value, torch.Tensor):
        raise InputError(f"input {spec.name!r} must be a torch.Tensor, got {type(value).__name__}",
                         input_name=spec.name, given=type(value).__name__, accepted="torch.Tensor")
    dtype = str(value.dtype).removeprefix("torch.")
    if dtype != spec.dtype:
        # A float image given to an artifact compiled for 8-bit pixels is a normalised image, not pixels.
        hint = ("pass the 8-bit pixels themselves: the artifact normalises them" if spec.dtype == "uint8"
                and value.is_floating_point() else f"convert it with .to(torch.{spec.dtype})")
        raise InputError(f"input {spec.name!r} has dtype {dtype}; the artifact accepts {spec.dtype} ({hint})",
                         input_name=spec.name, given=dtype, accepted=spec.dtype)
    if value.dim() != len(spec.shape):
        raise InputError(f"input {spec.name!r} has rank {value.dim()} (shape {tuple(value.shape)}); the artifact "
                         f"accepts rank {len(spec.shape)}: {spec.describe()}", input_name=spec.name,
                         given=tuple(value.shape), accepted=spec.describe())
    for dim, size in enumerate(value.shape):
        _check_dim(spec, dim, size)


def _check_dim(spec: InputSpec, dim: int, size: int) -> None:
    where = f"input {spec.name!r} dimension {dim}"
    if dim not in spec.dynamic:
        if size != spec.shape[dim]:
            raise InputError(
                f"{where} is {size}; the artifact accepts only {spec.shape[dim]} there: {spec.describe()}. "
                "Recompile with that dimension in dynamic_dims to vary it",
                input_name=spec.name, dimension=dim, given=size, accepted=spec.shape[dim])
        return
    name, low, high = spec.dynamic[dim]
    if size < low or (high is not None and size > high):
        accepted = f"{low} to {high}" if high is not None else f"{low} or more"
        raise InputError(f"{where} ({name}) is {size}; the artifact accepts {accepted}: {spec.describe()}",
                         input_name=spec.name, dimension=dim, given=size, accepted=accepted)


def _check_shared(spec: InputSpec, value: torch.Tensor, sizes: dict[str, tuple[str, int]]) -> None:
    """Dimensions with one name (every input's batch) must have one size."""
    for dim, (name, _, _) in spec.dynamic.items():
        size = value.shape[dim]
        first_input, first_size = sizes.setdefault(name, (spec.name, size))
        if size != first_size:
            raise InputError(
                f"input {spec.name!r} dimension {dim} ({name}) is {size} but input {first_input!r} has {name} "
                f"{first_size}; inputs that share the {name} dimension must agree",
                input_name=spec.name, dimension=dim, given=size, accepted=first_size)
