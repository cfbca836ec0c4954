"""cpu-fp32 against a plain ``torch.onnx.export``, side by side in one process.

For each model and batch size: ONNX Runtime latency of fxpress's cpu-fp32 model and of the plain
export of the same model (exported at that exact batch, static shapes: the strongest baseline),
timed in rotation; the ratio fxpress / plain (p50) must be at most 1.05. Also the compile time.

    python -m bench.fp32_vs_plain_export --models efficientnet-lite0 minilm-l6 --batches 1 16
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from backends.onnxruntime import make_session
from compiler import compile as fxpress_compile
from compiler.cli.benchmark import plain_export, time_side_by_side
from compiler.cli.model_source import resolve
from compiler.cli.workload import Workload


def bench_model(name: str, batches: list[int], runs: int, seq_len: int) -> list[dict]:
    source = resolve(name)
    started = time.perf_counter()
    compiled = fxpress_compile(source.model, "cpu-fp32", source.example_inputs,
                               dynamic_dims=source.dynamic_dims, model_name=name)
    compile_seconds = time.perf_counter() - started
    workload = Workload(name, compiled, source)
    ours = make_session(compiled.onnx)
    rows = []
    for batch in batches:
        inputs = workload.inputs(batch, sequence_length=seq_len)
        plain = make_session(plain_export(source.model, inputs))
        ours_feed = {spec.name: t.numpy() for spec, t in zip(ours.get_inputs(), inputs, strict=True)}
        plain_feed = {spec.name: t.numpy() for spec, t in zip(plain.get_inputs(), inputs, strict=True)}
        np.testing.assert_allclose(ours.run(None, ours_feed)[0], plain.run(None, plain_feed)[0], rtol=1e-3, atol=1e-4)
        stats = {item.runner: item for item in time_side_by_side({
            "fxpress": lambda ours_feed=ours_feed: ours.run(None, ours_feed),
            "plain": lambda plain=plain, plain_feed=plain_feed: plain.run(None, plain_feed),
        }, batch, runs=runs)}
        rows.append({
            "model": name, "batch": batch, "fxpress_p50_ms": stats["fxpress"].p50_ms,
            "plain_p50_ms": stats["plain"].p50_ms, "ratio": stats["fxpress"].p50_ms / stats["plain"].p50_ms,
            "compile_s": compile_seconds,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["efficientnet-lite0", "minilm-l6"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", default=None, help="Also write the rows to this file.")
    args = parser.parse_args()
    rows = [row for name in args.models for row in bench_model(name, args.batches, args.runs, args.seq_len)]
    header = ["model", "batch", "fxpress p50 ms", "plain export p50 ms", "ratio", "compile s"]
    cells = [[r["model"], str(r["batch"]), f"{r['fxpress_p50_ms']:.2f}", f"{r['plain_p50_ms']:.2f}",
              f"{r['ratio']:.3f}", f"{r['compile_s']:.1f}"] for r in rows]
    widths = [max(len(row[i]) for row in cells + [header]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *cells]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
