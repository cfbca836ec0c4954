"""What the bench and verify jobs run, and on which inputs.

A compiled model (from an artifact or compiled here), the eager model when there is one, and the
inputs to feed them at a given batch size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from compiler.artifact import MANIFEST_FILE
from compiler.cli.model_source import ModelSource, resolve
from compiler.compiled import CompiledModel
from compiler.errors import UsageError
from compiler.input_format import PixelInput, parse_input_format

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32,
           "bool": torch.bool, "float64": torch.float64}


@dataclass
class Workload:
    """A compiled model, optionally its eager original, and where its inputs come from."""

    name: str
    compiled: CompiledModel
    source: ModelSource | None = None  # the eager model, when known

    def inputs(self, batch: int, *, seed: int = 0, sequence_length: int = 128) -> tuple[torch.Tensor, ...]:
        """``batch`` input samples.

        The zoo's evaluation data when there is a zoo entry, else seeded inputs shaped like the
        manifest's (token ids drawn from a small range, masks of ones).
        """
        entry = self.source.zoo_entry if self.source is not None else None
        pixel_format = self.compiled.manifest.get("input_format")
        if entry is not None and pixel_format:  # an artifact that takes 8-bit pixels: the zoo's, so laid out
            (pixels,) = entry.eval_data(batch, pixels=True)
            return (pixels.permute(0, 2, 3, 1).contiguous() if pixel_format["layout"] == "NHWC" else pixels,)
        if entry is not None:
            has_sequence = any(spec[0] == "sequence" for dims in entry.dynamic_dims.values() for spec in dims.values())
            options = {"seq_len": sequence_length} if has_sequence else {}
            return tuple(entry.eval_data(batch, **options))
        return tuple(_synthetic(spec, batch, seed) for spec in self.compiled.manifest["inputs"])


def _synthetic(spec: dict, batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = [batch, *spec["shape"][1:]]
    dtype = _DTYPES.get(spec["dtype"], torch.float32)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    if "mask" in spec["name"]:
        return torch.ones(shape, dtype=dtype)
    return torch.randint(0, 1000, shape, generator=generator, dtype=dtype)


def is_artifact(spec: str) -> bool:
    """True when ``spec`` names an artifact directory."""
    return (Path(spec) / MANIFEST_FILE).is_file()


def load_workload(spec: str, *, model: str | None = None, target: str = "cpu-fp32", progress=None) -> Workload:
    """An artifact directory (with ``model`` naming its original, if wanted) or a model to compile now."""
    from compiler import api

    if is_artifact(spec):
        compiled = api.load(spec)
        source = resolve(model) if model else _zoo_source(compiled.manifest.get("model", ""))
        pixel_format = compiled.manifest.get("input_format")
        if source is not None and pixel_format:  # the eager original behind the same pixel input
            source = dataclasses.replace(source, model=PixelInput(source.model, parse_input_format(pixel_format)))
        return Workload(compiled.manifest.get("model") or Path(spec).name, compiled, source)
    if Path(spec).exists() and Path(spec).is_dir():
        raise UsageError(f"{spec} is a directory without {MANIFEST_FILE}; give an artifact directory or a model")
    if model is not None:
        raise UsageError("--model names the original of an artifact; with a model to compile, leave it out")
    source = resolve(spec)
    compiled = api.compile(source.model, target, source.example_inputs, dynamic_dims=source.dynamic_dims,
                           model_name=source.name, progress=progress)
    return Workload(source.name, compiled, source)


def _zoo_source(name: str) -> ModelSource | None:
    import models

    return resolve(name) if name in models.names() else None
