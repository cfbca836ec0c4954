"""A cpu-int8 compile on a quiet machine and under background load, each in a fresh process, side by side.

The bench starts its own load: ``--load`` busy processes (pure Python loops, one runnable task
each, as other jobs on a shared build box are), waits ``--warmup`` seconds, then runs the compile
in a fresh subprocess, and stops the load. Configurations, in this order:

- ``quiet``: no load, the default thread policy (``threads="auto"``);
- ``load, auto``: the load, the default policy (it measures idle cores at the start);
- ``load, N threads``: the load, PyTorch's own default (one thread per core), i.e. what compile did
  before the policy existed;
- with ``--passive``, also ``load, N threads, OMP_WAIT_POLICY=PASSIVE``: the same with OpenMP's
  idle threads sleeping instead of spinning (must be set before torch loads: a CLI can, a library
  cannot).

Each child prints its compile time, the time per pass and the thread record the ledger kept; the
parent prints every configuration's time and its ratio to the quiet one.

    python -m bench.compile_under_load                          # efficientnet-lite0, 256 samples, load 4
    python -m bench.compile_under_load --load 4 --passive --json load.json
    python -m bench.compile_under_load --configs 0/2/passive 4/4/passive
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "efficientnet-lite0"


def busy_loop() -> None:
    """One runnable task until terminated."""
    while True:
        pass


def child(samples: int, threads: str, out: str) -> None:
    """Compile the zoo model for cpu-int8 and write the times and the ledger's thread record to ``out``."""
    import torch

    import models
    from compiler import compile

    zoo = models.load(MODEL)
    calibration = zoo.calibration_data(samples)
    batches = [tuple(tensor[start:start + 32] for tensor in calibration) for start in range(0, samples, 32)]
    requested = threads if threads == "auto" else int(threads)
    started = time.perf_counter()
    compiled = compile(zoo.model, "cpu-int8", zoo.example_inputs, calibration_data=batches, model_name=MODEL,
                       threads=requested)
    seconds = time.perf_counter() - started
    passes = {entry.name: round(entry.seconds, 2) for entry in compiled.report.entries if entry.seconds > 0.5}
    record = {"compile_s": seconds, "passes": passes, "threads": compiled.report.capture["threads"],
              "torch_default_threads": torch.get_num_threads()}
    Path(out).write_text(json.dumps(record))


def run(samples: int, threads: str, load: int, warmup: float, passive: bool) -> dict:
    """One configuration: start ``load`` busy processes, compile in a child, stop the load."""
    workers = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(load)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(warmup if load else 0.0)
        with tempfile.TemporaryDirectory(prefix="fxpress-load-") as tmp:
            out = Path(tmp) / "record.json"
            env = dict(os.environ, **({"OMP_WAIT_POLICY": "PASSIVE"} if passive else {}))
            command = [sys.executable, "-m", "bench.compile_under_load", "--child", "--samples", str(samples),
                       "--threads", threads, "--out", str(out)]
            completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if completed.returncode != 0:
                return {"status": f"child failed: {completed.stderr.strip().splitlines()[-1:]}"}
            return {"status": "ok", **json.loads(out.read_text())}
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join()


def configurations(args: argparse.Namespace) -> list[tuple[str, str, int, bool]]:
    """(label, threads, load, passive) in the order they run: ``--configs`` or the standard set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    specs = args.configs or ["0/auto", f"{args.load}/auto", f"{args.load}/{cores}"]
    if args.passive and not args.configs:
        specs.append(f"{args.load}/{cores}/passive")
    rows = []
    for spec in specs:
        load, threads, *rest = spec.split("/")
        passive = rest == ["passive"]
        label = ("quiet" if load == "0" else f"load {load}") + f", {threads} threads" + (", OMP passive" * passive)
        rows.append((label, threads, int(load), passive))
    return rows


def main() -> None:
    """Run every configuration; print times and ratios to the quiet compile."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256, help="calibration crops (default 256)")
    parser.add_argument("--load", type=int, default=4, help="busy background processes (default 4)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the compile starts")
    parser.add_argument("--passive", action="store_true", help="also run with OMP_WAIT_POLICY=PASSIVE")
    parser.add_argument("--configs", nargs="+", default=None,
                        help="LOAD/THREADS[/passive] each, e.g. 0/auto 4/auto 4/2/passive (default: the standard set)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.samples, args.threads, args.out)
        return
    print(f"{MODEL} to cpu-int8 with {args.samples} calibration crops, one fresh process per configuration",
          flush=True)
    records, quiet = [], None
    for label, threads, load, passive in configurations(args):
        record = {"configuration": label, **run(args.samples, threads, load, args.warmup, passive)}
        records.append(record)
        if record["status"] != "ok":
            print(f"{label:<40} {record['status']}", flush=True)
            continue
        quiet = quiet or record["compile_s"]
        thread = record["threads"]
        print(f"{label:<40} {record['compile_s']:6.1f} s  {record['compile_s'] / quiet:5.2f}x quiet  "
              f"threads {thread['threads']} ({thread.get('reason', thread['policy'])})  passes {record['passes']}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
