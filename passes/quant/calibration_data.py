"""Calibration data: whatever the user gives, validated against the example inputs before anything runs.

Forms accepted (``N`` is the model's number of inputs) and how they are told apart:

1. A tensor: one batch of a one-input model.
2. A dict: one batch, keyed by input name.
3. A tuple or list whose elements are all tensors: when ``N == 1``, each tensor is a batch (so
   ``(x,)`` is one batch and ``[x1, x2]`` two: the readings agree wherever both are possible);
   when ``N > 1``, one batch with a tensor per input, in order (a batch of a multi-input model is
   never a lone tensor, so it cannot be a list of batches).
4. Any other iterable (a list of tuples or dicts, a generator, a DataLoader): each element is a
   batch, given as a tensor (``N == 1`` only), a tuple or list of ``N`` tensors, or a dict.

Iteration. A one-pass iterator (``iter(data) is data``: a generator, ``map``, a file reader) is
read once and its batches are kept, so that calibration can go over them again: the result says
``materialised``. Lists and tuples are kept as they are (tensors are not copied). Any other
re-iterable, such as a DataLoader, is not stored: it is read once here to validate it and again
on each pass of calibration, every batch validated again as it comes, so memory holds one batch; a
source that yields a different number of batches on a later pass is refused.

Checks: the form of each batch and its dict keys (missing and extra keys listed), then every
tensor (:mod:`passes.quant.input_checks`: device, kind of dtype, rank, empty, static and dynamic
sizes, NaN and Inf), each failure a one-line ``CalibrationDataError`` naming the batch and the
input. After the last batch: no batch at all is an error, and so are fewer than ``min_samples``
samples (counted along dimension 0 of the first input that has dimensions: the batch dimension
by fxpress's convention). Floating inputs whose every value is the same in all batches are
allowed and listed in ``warnings`` (their observers widen the zero range), as are dtype
conversions.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

from compiler.errors import CalibrationDataError
from passes.quant.input_checks import (
    Batch,
    DynamicDims,
    InputSpec,
    batch_error,
    check_shared_dims,
    checked_tensor,
    converted,
    input_specs,
)

logger = logging.getLogger(__name__)


class CalibrationBatches(Sequence[Batch]):
    """Validated calibration batches, each a tuple of tensors ordered like the example inputs.

    Re-iterable: every ``for`` goes over all batches again. Batches are held in memory, except for
    a re-iterable source such as a DataLoader, which is read again (and each batch validated
    again) on every iteration.

    Attributes:
        input_names: the model's input names, in order.
        samples: samples counted along dimension 0 over all batches.
        origin: type name of what the user gave, e.g. ``"generator"`` or ``"DataLoader"``.
        materialised: a one-pass iterator was read once and its batches are held in memory.
        streamed: a re-iterable source is read again on every iteration instead of being held.
        warnings: one line per fact worth reporting (constant inputs, converted dtypes).
    """

    def __init__(self, specs: tuple[InputSpec, ...], count: int, samples: int, origin: str, *,
                 batches: list[Batch] | None, source: Iterable | None, materialised: bool,
                 warnings: tuple[str, ...]):
        self._specs, self._count, self._batches, self._source = specs, count, batches, source
        self.input_names = tuple(spec.name for spec in specs)
        self.samples, self.origin, self.materialised = samples, origin, materialised
        self.streamed = batches is None
        self.warnings = warnings

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> Batch:
        if self._batches is not None:
            return self._batches[index]
        position = index + self._count if index < 0 else index
        if not 0 <= position < self._count:
            raise IndexError(f"calibration batch {index} out of range for {self._count} batches")
        return next(itertools.islice(iter(self), position, None))

    def __iter__(self) -> Iterator[Batch]:
        if self._batches is not None:
            return iter(self._batches)
        return self._stream()

    def summary(self) -> str:
        """One line for the ledger: batches, samples, where they came from and how they are held."""
        held = "read once, held in memory" if self.materialised else "read again on every pass" if self.streamed else ""
        line = f"{self._count} batch(es), {self.samples} sample(s) from {self.origin}"
        return f"{line} ({held})" if held else line

    def _stream(self) -> Iterator[Batch]:
        validator = _Validator(self._specs)
        for index, raw in enumerate(self._source):
            yield validator.batch(raw, index)
        if validator.count != self._count:
            raise CalibrationDataError(
                f"calibration data ({self.origin}) yielded {validator.count} batch(es) when read again but "
                f"{self._count} when validated; give a list, or an iterable that yields the same batches every time"
            )


def validate_calibration_data(
    calibration_data: object,
    example_inputs: tuple[torch.Tensor, ...],
    input_names: tuple[str, ...],
    dynamic_dims: DynamicDims,
    min_samples: int = 1,
) -> CalibrationBatches:
    """Check ``calibration_data`` against the example inputs; return its batches, re-iterable.

    Args:
        calibration_data: a tensor, a tuple/list/dict of tensors, or an iterable of those (see the
            module docstring for how the forms are told apart).
        example_inputs: the model's example inputs (dtype, rank and static sizes to match).
        input_names: the model's input names, one per example input (dict keys, error messages).
        dynamic_dims: ``{input index: {dim: (name, min, max)}}``; other dimensions are static.
        min_samples: the fewest samples (along dimension 0, over all batches) to accept.

    Raises:
        CalibrationDataError: naming the batch, the input and the problem.
    """
    specs = input_specs(example_inputs, input_names, dynamic_dims)
    if min_samples < 1:
        raise ValueError(f"min_samples must be at least 1, got {min_samples}")
    first_pass, origin, mode = _batch_source(calibration_data, specs)
    validator = _Validator(specs)
    streamed = mode == "re-iterable"
    batches = []
    for index, raw in enumerate(first_pass):
        batch = validator.batch(raw, index)
        if not streamed:  # a re-iterable source is read again on every pass: hold nothing of it
            batches.append(batch)
    del first_pass
    if validator.count == 0:
        raise CalibrationDataError(f"calibration data ({origin}) is empty: it yielded no batch; give at least one")
    if validator.samples < min_samples:
        raise CalibrationDataError(
            f"calibration data holds {validator.samples} sample(s) in {validator.count} batch(es); "
            f"at least {min_samples} are needed: give more data or lower min_samples"
        )
    if mode == "one-pass":
        logger.info("calibration data: a one-pass %s was read once; %d batches held in memory", origin, len(batches))
    return CalibrationBatches(
        specs, validator.count, validator.samples, origin, batches=None if streamed else batches,
        source=calibration_data if streamed else None, materialised=mode == "one-pass", warnings=validator.warnings(),
    )


def _batch_source(data: object, specs: tuple[InputSpec, ...]) -> tuple[Iterable, str, str]:
    """(the raw batches of the first pass, origin, mode): mode is "memory", "one-pass" or "re-iterable"."""
    origin = type(data).__name__
    array = hasattr(data, "__array__") and not _is_tensor(data)
    if data is None or isinstance(data, (str, bytes)) or array:
        raise CalibrationDataError(
            f"calibration data is {'None' if data is None else f'of type {origin}'}; give a tensor, a tuple or "
            "dict of tensors, or an iterable of them, shaped like the example inputs"
            + ("; convert arrays with torch.as_tensor" if array else "")
        )
    if _is_tensor(data) or isinstance(data, Mapping):
        return [data], origin, "memory"
    if isinstance(data, (tuple, list)):
        one_batch = len(specs) > 1 and data and all(_is_tensor(value) for value in data)
        return ([data] if one_batch else data), origin, "memory"
    try:
        iterator = iter(data)
    except TypeError:
        raise CalibrationDataError(
            f"calibration data of type {origin} is neither a tensor, a tuple, a dict nor an iterable"
        ) from None
    return iterator, origin, "one-pass" if iterator is data else "re-iterable"


def _is_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor)


class _Validator:
    """Validates batches one by one and keeps what the end of validation needs (counts, ranges)."""

    def __init__(self, specs: tuple[InputSpec, ...]):
        self.specs = specs
        self.count = self.samples = 0
        self.low: dict[str, float] = {}
        self.high: dict[str, float] = {}
        self.conversions: dict[str, str] = {}

    def batch(self, raw: object, index: int) -> Batch:
        """The validated batch ``raw`` (the ``index``-th), as a tuple ordered like the inputs."""
        values = _batch_values(raw, index, self.specs)
        batch = tuple(self._tensor(value, index, spec) for value, spec in zip(values, self.specs, strict=True))
        check_shared_dims(batch, index, self.specs)
        self.count += 1
        self.samples += _samples(batch)
        return batch

    def warnings(self) -> tuple[str, ...]:
        """Constant floating inputs and dtype conversions, one line each."""
        constant = [
            f"input {name!r} is constant (every value is {self.low[name]:g}) in all {self.count} calibration "
            "batch(es); its observers will widen the zero range"
            for name in self.low if self.low[name] == self.high[name]
        ]
        return tuple(constant + list(self.conversions.values()))

    def _tensor(self, value: object, index: int, spec: InputSpec) -> torch.Tensor:
        tensor = checked_tensor(value, index, spec)
        if tensor.dtype != spec.dtype:
            self.conversions.setdefault(spec.name, (
                f"input {spec.name!r}: calibration data of dtype {tensor.dtype} is converted to {spec.dtype}, "
                "the example input's dtype"
            ))
            tensor = converted(tensor, index, spec)
        if tensor.is_floating_point():
            self.low[spec.name] = min(self.low.get(spec.name, float("inf")), float(tensor.min()))
            self.high[spec.name] = max(self.high.get(spec.name, float("-inf")), float(tensor.max()))
        return tensor


def _batch_values(raw: object, index: int, specs: tuple[InputSpec, ...]) -> list[object]:
    """The values of one batch in input order; refuse a wrong count of values or wrong dict keys."""
    names = [spec.name for spec in specs]
    expected = ", ".join(map(repr, names))
    if isinstance(raw, Mapping):
        missing = ", ".join(repr(name) for name in names if name not in raw)
        extra = ", ".join(repr(key) for key in raw if key not in names)
        if missing or extra:
            found = [f"missing key(s) {missing}"] * bool(missing) + [f"unexpected key(s) {extra}"] * bool(extra)
            raise batch_error(index, None, f"{'; '.join(found)}; expected the keys {expected}")
        return [raw[name] for name in names]
    if isinstance(raw, (tuple, list)):
        if len(raw) != len(specs):
            problem = f"has {len(raw)} value(s); the model has {len(specs)} input(s) ({expected}): "
            raise batch_error(index, None, problem + "give one tensor per input")
        return list(raw)
    if len(specs) > 1:
        problem = f"is a single {type(raw).__name__}; the model has {len(specs)} inputs ({expected}): "
        raise batch_error(index, None, problem + "give a tuple, or a dict keyed by input name")
    return [raw]


def _samples(batch: Batch) -> int:
    """Samples in a batch: dimension 0 of the first input with dimensions, else 1."""
    return next((tensor.shape[0] for tensor in batch if tensor.dim() >= 1), 1)
