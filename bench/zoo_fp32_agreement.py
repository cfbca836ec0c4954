"""How closely cpu-fp32 matches eager for every zoo model.

At batch 1 and 3 (and, for the sentence encoder, at sequence lengths 16 and 128): max |diff| as a
fraction of the output's largest magnitude.

    python -m bench.zoo_fp32_agreement
"""

from __future__ import annotations

import torch

import models
from compiler import compile as fxpress_compile
from compiler.cli.model_source import resolve


def worst_relative_difference(name: str) -> float:
    source = resolve(name)
    compiled = fxpress_compile(source.model, "cpu-fp32", source.example_inputs,
                               dynamic_dims=source.dynamic_dims, model_name=name)
    lengths = [{"seq_len": 16}, {"seq_len": 128}] if name == "minilm-l6" else [{}]
    worst = 0.0
    for batch in (1, 3):
        for options in lengths:
            inputs = source.zoo_entry.eval_data(batch, **options)
            with torch.no_grad():
                expected = source.model(*inputs).double()
            actual = compiled(*inputs).double()
            worst = max(worst, float((actual - expected).abs().max() / expected.abs().max()))
    return worst


def main() -> None:
    for name in models.names():
        print(f"{name:<20} max |diff| / max |ref|: {worst_relative_difference(name):.2e}  (bar: 1e-4)")


if __name__ == "__main__":
    main()
