"""The record every zoo entry returns, and the contract its sample data follow.

A `ZooModel` bundles a module in eval mode with what a compiler needs around it: example inputs,
input and output names, the dynamic dimensions with their ranges, and two deterministic streams of
realistic inputs (calibration and evaluation) drawn from disjoint sources or different seeds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

#: input name -> {dimension index: (dimension name, minimum, maximum)}.
DynamicDims = dict[str, dict[int, tuple[str, int, int]]]

#: The largest batch the zoo declares for its dynamic batch dimension.
MAX_BATCH = 1024


class DataSource(Protocol):
    """Where a zoo model's calibration and evaluation inputs come from."""

    def calibration(self, count: int, **options: Any) -> tuple[torch.Tensor, ...]:
        """Returns `count` calibration samples, batched as the model's inputs."""

    def evaluation(self, count: int, **options: Any) -> tuple[torch.Tensor, ...]:
        """Returns `count` evaluation samples, batched as the model's inputs."""

    def labels(self, count: int) -> torch.Tensor | None:
        """Returns int64 labels aligned with `evaluation(count)`, or None if unlabelled."""


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """A model from the zoo with its inputs, names, shapes and sample data.

    Attributes:
        name: The registry name, e.g. "resnet18".
        description: One line saying what the model is and where its weights come from.
        model: The `nn.Module`, in eval mode.
        example_inputs: One sample (batch size 1), structured and typed as the model's inputs.
        input_names: One name per positional input, equal to the names of `model.forward`'s
            parameters (so they can key torch.export's `dynamic_shapes`), e.g. ("input",) or
            ("input_ids", "attention_mask").
        output_names: One name per output, e.g. ("logits",).
        dynamic_dims: For each input name, the dimensions that may vary, each as
            {index: (dimension name, minimum, maximum)}.
        task: "classification" or "embedding".
        data: The source behind `calibration_data`, `eval_data` and `eval_labels`.
    """

    name: str
    description: str
    model: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_dims: DynamicDims
    task: str
    data: DataSource = dataclasses.field(repr=False)

    def calibration_data(self, n: int, **options: Any) -> tuple[torch.Tensor, ...]:
        """Returns `n` calibration samples in the batch dimension, the same on every call.

        Args:
            n: How many samples; a ValueError names the maximum when there are fewer.
            **options: Source-specific options, e.g. `seq_len` for text models.
        """
        return self.data.calibration(n, **options)

    def eval_data(self, n: int, **options: Any) -> tuple[torch.Tensor, ...]:
        """Returns `n` evaluation samples, disjoint from or differently seeded than calibration.

        Args:
            n: How many samples; a ValueError names the maximum when there are fewer.
            **options: Source-specific options, e.g. `seq_len` for text models.
        """
        return self.data.evaluation(n, **options)

    @property
    def input_format(self) -> dict | None:
        """For image models, the 8-bit pixel format of their data (dtype, mean, std, layout); else None."""
        return getattr(self.data, "input_format", None)

    def eval_labels(self, n: int) -> torch.Tensor | None:
        """Returns the int64 labels of `eval_data(n)`, or None where the data are unlabelled."""
        return self.data.labels(n)

    def encode(
        self, sentences: Sequence[str], seq_len: int | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Tokenises sentences into this model's inputs (text models only).

        Args:
            sentences: The sentences, one per batch row.
            seq_len: Pad or truncate to this many tokens; the source's default when None.

        Raises:
            TypeError: If the model does not take text.
        """
        encode = getattr(self.data, "encode", None)
        if encode is None:
            raise TypeError(f"zoo model {self.name!r} does not take text; only text models encode")
        return encode(sentences, seq_len=seq_len)


def batch_dimension(*input_names: str) -> DynamicDims:
    """Returns dynamic dims where only the batch (dimension 0) of each named input varies."""
    return {name: {0: ("batch", 1, MAX_BATCH)} for name in input_names}


def check_count(count: int, maximum: int, what: str) -> None:
    """Checks a requested sample count against what a source holds.

    Args:
        count: The number of samples asked for.
        maximum: The most the source can give.
        what: What the samples are, for the message, e.g. "digits held-out samples".

    Raises:
        ValueError: If `count` is not an integer in [1, maximum].
    """
    if isinstance(count, bool) or not isinstance(count, int):
        raise ValueError(f"the number of {what} must be an int, got {count!r}")
    if not 1 <= count <= maximum:
        raise ValueError(f"asked for {count} {what}; between 1 and {maximum} are available")


def classifier_zoo_model(name: str, description: str, model: torch.nn.Module, data: DataSource) -> ZooModel:
    """Wraps a single-input classifier and its data source, with a dynamic batch dimension."""
    return ZooModel(
        name=name,
        description=description,
        model=model.eval(),
        example_inputs=data.calibration(1),
        input_names=("input",),
        output_names=("logits",),
        dynamic_dims=batch_dimension("input"),
        task="classification",
        data=data,
    )
