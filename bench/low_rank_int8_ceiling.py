"""What factorising a Linear can gain in dynamic int8 on ONNX Runtime: its GEMMs alone, then their share of MiniLM.

Two measurements, each side by side in one process:

- ``gemms``: one Linear of MiniLM's shapes (384 -> 1536, 1536 -> 384, 384 -> 384) against its
  two-factor chain at the rank that removes 30% of its MACs (rounded to 16), each compiled by
  fxpress to ``cpu-fp32`` and to ``cpu-int8-dynamic`` (one DynamicQuantizeMatMul per Linear) and
  timed on ``--tokens`` rows, as ratios of chain to dense per target;
- ``profile``: ONNX Runtime's own profile of the whole zoo MiniLM compiled to ``cpu-int8-dynamic``
  at batch 16, sequence 128: each op type's share of the kernel time. The share of the integer
  GEMMs (DynamicQuantizeMatMul, MatMulIntegerToFloat, DynamicQuantizeLinear) bounds what any
  change to the Linears can gain: with them at zero time the model would still take ``1 - share``.

    python -m bench.low_rank_int8_ceiling
    python -m bench.low_rank_int8_ceiling --tokens 2048 --runs 100 --json low_rank_int8_ceiling.json
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch

import models
from backends.onnxruntime.backend import make_session
from bench.prune_peers import run_and_report
from compiler import compile
from compiler.timing import time_side_by_side

SHAPES = ((384, 1536), (1536, 384), (384, 384))
INTEGER_GEMMS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLinear", "MatMulInteger")
MAC_SHARE = 0.3
BLOCK = 16


def chain_rank(features_in: int, features_out: int, share: float = MAC_SHARE) -> int:
    """The rank, a multiple of 16, whose two factors keep at most ``1 - share`` of the dense MACs."""
    rank = (1 - share) * features_in * features_out / (features_in + features_out)
    return max(BLOCK, int(rank) // BLOCK * BLOCK)


def layers(features_in: int, features_out: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    rank = chain_rank(features_in, features_out)
    return {"dense": torch.nn.Linear(features_in, features_out),
            f"rank {rank}": torch.nn.Sequential(torch.nn.Linear(features_in, rank, bias=False),
                                                torch.nn.Linear(rank, features_out))}


def time_gemms(args: argparse.Namespace) -> dict:
    rows = {}
    for features_in, features_out in SHAPES:
        example = (torch.randn(args.tokens, features_in),)
        for target in ("cpu-fp32", "cpu-int8-dynamic"):
            runners = {name: compile(module.eval(), target, example) for name, module in
                       layers(features_in, features_out).items()}
            calls = {name: (lambda m=model, x=example: m(*x)) for name, model in runners.items()}
            stats = time_side_by_side(calls, args.tokens, runs=args.runs)
            dense = stats[0].p50_ms
            rows[f"{features_in}x{features_out} {target}"] = {
                item.runner: {"p50_ms": round(item.p50_ms, 3), "ratio": round(item.p50_ms / dense, 3)}
                for item in stats}
    return rows


def profile_minilm(args: argparse.Namespace) -> dict:
    zoo = models.load("minilm-l6")
    compiled = compile(zoo.model, "cpu-int8-dynamic", zoo.example_inputs)
    input_ids, mask = zoo.eval_data(16, seq_len=128)
    feed = {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()}
    with tempfile.TemporaryDirectory() as folder:
        session = make_session(compiled.onnx, "all", torch.get_num_threads(), profile_prefix=str(Path(folder) / "p"))
        for _ in range(3 + args.profile_runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
    total = sum(by_op.values())
    if not total:
        raise RuntimeError("ONNX Runtime's profile held no kernel events: has its profile format changed?")
    shares = {op: round(us / total, 4) for op, us in by_op.most_common()}
    return {"op_shares": shares, "integer_gemm_share": round(sum(shares.get(op, 0.0) for op in INTEGER_GEMMS), 4)}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    return {"gemms": time_gemms(args), "profile": profile_minilm(args), "options": vars(args),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "onnxruntime": ort.__version__}


def render(record: dict) -> str:
    lines = [f"{shape:28} " + ", ".join(f"{name} {row['p50_ms']:.3f} ms ({row['ratio']:.2f}x)"
                                        for name, row in rows.items())
             for shape, rows in record["gemms"].items()]
    top = list(record["profile"]["op_shares"].items())[:8]
    lines.append("minilm-l6 cpu-int8-dynamic, b16 s128, kernel time by op: "
                 + ", ".join(f"{op} {share:.1%}" for op, share in top))
    lines.append(f"integer GEMMs' share: {record['profile']['integer_gemm_share']:.1%}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="rows of each GEMM (batch 16 x sequence 128)")
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--profile-runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the record here")
    run_and_report(parser.parse_args(), run, render)


if __name__ == "__main__":
    main()
