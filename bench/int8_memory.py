"""Wall time and peak memory of a cpu-int8 compile as the calibration set grows.

EfficientNet-Lite0 is compiled for cpu-int8 with 256 and with 1024 calibration crops, each in a
fresh subprocess, and the parent reads each child's own peak RSS from ``os.wait4`` (the kernel's
``ru_maxrss`` of that child alone). The bar: the compile with 256 samples takes under 60 s, and
peak memory at 1024 samples is within 10% of peak memory at 256.

The calibration data is a lazily generated re-iterable (``LazyCrops``): each iteration makes the
crops batch by batch from the same per-sample draws as ``z.calibration_data(n)``, so the user's
side holds one batch at a time and what grows with n, if anything, is fxpress's. The time spent
making crops is reported apart, since it is the data's cost, not the compiler's.

    python -m bench.int8_memory                       # 256 and 1024 samples
    python -m bench.int8_memory --samples 64 128 --json memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "efficientnet-lite0"
TIME_BAR_S = 60.0
MEMORY_BAR = 0.10


class LazyCrops:
    """Calibration crops made on the fly, ``batch`` at a time, on every iteration.

    Sample ``i`` equals sample ``i`` of ``z.calibration_data(count)``: the same seeded draws
    (``models.images.crops``: one row of five uniforms per sample), the same photo, crop and
    normalisation. Only the draws (count x 5 floats) are held; each batch is made when asked.

    Attributes:
        seconds: time spent making crops, over all iterations.
        passes: how many times the data was iterated (to the end or not).
    """

    def __init__(self, count: int, batch: int, seed: int, normalisation):
        self.count, self.batch, self.seed, self.normalisation = count, batch, seed, normalisation
        self.seconds = 0.0
        self.passes = 0

    def __iter__(self):
        import numpy as np
        import torch

        from models.images import IMAGE_SIDE, _crop, normalise, photos

        self.passes += 1
        sources = photos()
        draws = np.random.default_rng(self.seed).random((self.count, 5))
        for start in range(0, self.count, self.batch):
            began = time.perf_counter()
            rows = draws[start:start + self.batch]
            crops = torch.empty(len(rows), 3, IMAGE_SIDE, IMAGE_SIDE)
            for index, draw in enumerate(rows):
                photo = sources[min(int(draw[0] * len(sources)), len(sources) - 1)]
                crops[index] = _crop(photo, draw[1:])
            batch = (normalise(crops, self.normalisation),)
            self.seconds += time.perf_counter() - began
            yield batch


def current_rss_mib() -> float:
    """Resident memory now, in MiB (/proc/self/status; the peak so far where that is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _maxrss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _maxrss_mib(value: int) -> float:
    return value / (1024 * 1024) if sys.platform == "darwin" else value / 1024


def _first_line(error: BaseException) -> str:
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()
    return lines[0][:300] if lines else ""


def child(samples: int, batch: int, out: str) -> None:
    """Compile once with ``samples`` lazy calibration crops; write what happened to ``out``."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    import models
    from compiler import TargetError, compile

    zoo = models.load(MODEL)
    data = LazyCrops(samples, batch, zoo.data.calibration_seed, zoo.data.normalisation)
    first = next(iter(data))[0]  # the lazy crops are the zoo's crops
    if not torch.equal(first, zoo.calibration_data(min(batch, samples))[0]):
        raise SystemExit("LazyCrops does not reproduce z.calibration_data")
    data.seconds, data.passes = 0.0, 0
    del first
    baseline = current_rss_mib()
    record = {"samples": samples, "batch": batch, "baseline_rss_mib": baseline}
    started = time.perf_counter()
    try:
        compiled = compile(zoo.model, target="cpu-int8", example_inputs=zoo.example_inputs,
                           calibration_data=data, model_name=MODEL)
    except TargetError as error:
        record["status"] = f"not available: {_first_line(error)}"
    except Exception as error:  # noqa: BLE001 - a failed compile is a result to report, not a crash
        record["status"] = f"failed: {type(error).__name__}: {_first_line(error)}"
    else:
        record["status"] = "ok"
        record["onnx_bytes"] = compiled.onnx.ByteSize()
        record["fallbacks"] = list(compiled.report.fallbacks)
    record["compile_s"] = time.perf_counter() - started
    record["data_s"] = data.seconds
    record["data_passes"] = data.passes
    record["self_peak_rss_mib"] = _maxrss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    Path(out).write_text(json.dumps(record))


def run_child(samples: int, batch: int) -> dict:
    """One compile in a fresh interpreter; its own peak RSS read from wait4."""
    with tempfile.TemporaryDirectory(prefix="int8-memory-") as tmp:
        out = Path(tmp) / "record.json"
        command = [sys.executable, "-m", "bench.int8_memory", "--child", str(samples), "--batch", str(batch),
                   "--out", str(out)]
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        if process.returncode != 0 or not out.exists():
            return {"samples": samples, "status": f"failed: child exited {process.returncode}", "process_s": wall}
        record = json.loads(out.read_text())
    record["process_s"] = wall
    record["peak_rss_mib"] = _maxrss_mib(usage.ru_maxrss)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", nargs="+", type=int, default=[256, 1024],
                        help="calibration set sizes, the first one the reference (default 256 1024)")
    parser.add_argument("--batch", type=int, default=16, help="crops per calibration batch (default 16)")
    parser.add_argument("--json", default=None, help="also write the records to this file")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.batch, args.out)
        return

    print(f"fxpress int8 memory: {MODEL} compiled for cpu-int8, one fresh process per calibration size, "
          f"batches of {args.batch} crops made on the fly", flush=True)
    records = []
    for samples in args.samples:
        record = run_child(samples, args.batch)
        records.append(record)
        if record["status"] != "ok":
            spent = (f" (after {record['compile_s']:.1f} s, peak RSS {record['peak_rss_mib']:.0f} MiB)"
                     if "peak_rss_mib" in record else "")
            print(f"{samples:>6} samples: {record['status']}{spent}", flush=True)
            continue
        print(f"{samples:>6} samples: compile {record['compile_s']:.1f} s (of which making crops "
              f"{record['data_s']:.1f} s over {record['data_passes']} pass(es)), process {record['process_s']:.1f} s, "
              f"peak RSS {record['peak_rss_mib']:.0f} MiB (before compile {record['baseline_rss_mib']:.0f} MiB)",
              flush=True)
    ok = [record for record in records if record["status"] == "ok"]
    summary: dict = {}
    if len(ok) >= 2 and ok[0] is records[0]:
        reference = ok[0]
        compile_ok = reference["compile_s"] < TIME_BAR_S
        print(f"bar: compile with {reference['samples']} samples < {TIME_BAR_S:.0f} s: "
              f"{reference['compile_s']:.1f} s {'PASS' if compile_ok else 'FAIL'}")
        summary["compile_bar_pass"] = compile_ok
        for record in ok[1:]:
            ratio = record["peak_rss_mib"] / reference["peak_rss_mib"]
            growth = (record["peak_rss_mib"] - record["baseline_rss_mib"]) / max(
                1e-9, reference["peak_rss_mib"] - reference["baseline_rss_mib"])
            passed = ratio <= 1 + MEMORY_BAR
            print(f"bar: peak RSS at {record['samples']} within {100 * MEMORY_BAR:.0f}% of {reference['samples']}: "
                  f"ratio {ratio:.3f} {'PASS' if passed else 'FAIL'} (growth above the pre-compile RSS: "
                  f"{growth:.2f}x); compile time ratio {record['compile_s'] / reference['compile_s']:.2f}x")
            summary[f"peak_ratio_{record['samples']}"] = ratio
            summary[f"memory_bar_pass_{record['samples']}"] = passed
    elif not ok:
        print("nothing to compare: no compile finished (cpu-int8 not available yet?)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": MODEL, "batch": args.batch, "records": records, "summary": summary}, handle, indent=2)


if __name__ == "__main__":
    main()
