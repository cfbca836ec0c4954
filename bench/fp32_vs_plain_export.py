"""cpu-fp32 against a plain ``torch.onnx.export``, side by side in one process.

For each model and batch size: ONNX Runtime latency of fxpress's cpu-fp32 model and of the plain
export of the same model (exported at that exact batch, static shapes: the strongest baseline),
timed alternately; the ratio fxpress / plain must be at most 1.05. Also the compile time.

    python bench/fp32_vs_plain_export.py --models efficientnet-lite0 minilm-l6 --batches 1 16
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import models
from bench.common import feed, interleaved_medians, plain_export, session, table
from compiler import compile as fxpress_compile
from compiler.model_source import resolve


def bench_model(name: str, batches: list[int], runs: int, seq_len: int) -> list[dict]:
    source = resolve(name)
    started = time.perf_counter()
    compiled = fxpress_compile(source.model, "cpu-fp32", source.example_inputs,
                               dynamic_dims=source.dynamic_dims, model_name=name)
    compile_seconds = time.perf_counter() - started
    ours = session(compiled.onnx.SerializeToString())
    rows = []
    for batch in batches:
        options = {"seq_len": seq_len} if name == "minilm-l6" else {}
        inputs = tuple(models.load(name).eval_data(batch, **options))
        plain = session(plain_export(source.model, inputs))
        ours_feed, plain_feed = feed(ours, inputs), feed(plain, inputs)
        np.testing.assert_allclose(ours.run(None, ours_feed)[0], plain.run(None, plain_feed)[0], rtol=1e-3, atol=1e-4)
        medians = interleaved_medians({
            "fxpress": lambda ours_feed=ours_feed: ours.run(None, ours_feed),
            "plain": lambda plain=plain, plain_feed=plain_feed: plain.run(None, plain_feed),
        }, runs)
        rows.append({
            "model": name, "batch": batch, "fxpress_ms": medians["fxpress"] * 1e3,
            "plain_ms": medians["plain"] * 1e3, "ratio": medians["fxpress"] / medians["plain"],
            "compile_s": compile_seconds,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["efficientnet-lite0", "minilm-l6"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", default=None, help="Also write the rows to this file.")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [row for name in args.models for row in bench_model(name, args.batches, args.runs, args.seq_len)]
    print(table(
        [[r["model"], r["batch"], f"{r['fxpress_ms']:.2f}", f"{r['plain_ms']:.2f}", f"{r['ratio']:.3f}",
          f"{r['compile_s']:.1f}"] for r in rows],
        ["model", "batch", "fxpress ms", "plain export ms", "ratio", "compile s"],
    ))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
