"""Bisection on the real case: EfficientNet-Lite0 all-int8 misses ``top1_agreement >= 0.97``; which layers go float?

cpu-int8's default runs every conv in integer kernels; on 500 held-out crops its torch simulation
agrees with fp32 on about 96% of top-1 classes, so the gate fails. :func:`compiler.bisect.bisect`
names the pass (the quantisation as a whole), finds the layers whose float fallback brings the
model past 0.97, writes the recipe patch and verifies it by compiling with it (ONNX Runtime).

    python -m bench.bisect_effnet                         # 256 calibration samples, 500 crops
    python -m bench.bisect_effnet --eval 200 --calib 128  # quicker, noisier
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings

import models
from compiler.bisect import bisect
from compiler.gates import parse_gate


def main(argv: list[str] | None = None) -> int:
    """Run the bisection and print its report, the wall time and (with ``--json``) the full record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--target", default="cpu-int8")
    parser.add_argument("--calib", type=int, default=256, help="calibration samples")
    parser.add_argument("--eval", type=int, default=500, help="evaluation crops")
    parser.add_argument("--gate", default="top1_agreement >= 0.97")
    parser.add_argument("--json", help="write the report's JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    zoo = models.load(args.model)
    started = time.perf_counter()

    def progress(line: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {line}", file=sys.stderr, flush=True)

    report = bisect(zoo.model, args.target, zoo.example_inputs, eval_inputs=zoo.eval_data(args.eval),
                    labels=zoo.eval_labels(args.eval), gates=[parse_gate(args.gate)],
                    calibration_data=zoo.calibration_data(args.calib), progress=progress)
    print(report.render())
    print(f"\nwall time: {time.perf_counter() - started:.1f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report.to_dict(), handle, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
