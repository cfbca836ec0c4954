"""fxpress structured pruning of a sentence encoder (MiniLM): quality and ONNX Runtime latency, side by side.

Rows, all compiled to ``cpu-fp32`` in one process on the same sentences:

- ``unpruned``: the reference of every latency ratio;
- ``fxpress``: ``compile(model, "cpu-fp32", prune={"macs": R}, calibration_data=..., recover_seconds=S)``
  (attention heads and FFN neurons, data-aware importance on the real tokens, least-squares
  re-fit, then distillation on length-sorted batches cut to their longest sentence);
- ``magnitude``: the same budget and recovery with ``importance="l2"`` and no re-fit, what a
  weight-norm pruner gives (Torch-Pruning's default criterion); ``--no-magnitude`` drops it.

Quality: cosine of each held-out sentence's embedding to the unpruned model's (mean, 1st
percentile, min) over the zoo's evaluation sentences, disjoint from the calibration/training
ones. Latency: ONNX Runtime sessions at batch 1 and 16, sequence ``--seq-len`` (128: the bar's),
timed in interleaved blocks (``time_side_by_side``), as ratios to ``unpruned``.

    python -m bench.prune_encoder                          # minilm-l6, -30% MACs, 180 s recovery
    python -m bench.prune_encoder --options '{"reconstruct": "all"}' --json prune_minilm.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time

import torch
import torch.nn.functional as F

import models
from bench.prune_peers import latency, pruning_parser, run_and_report
from compiler import compile

logger = logging.getLogger("bench.prune_encoder")


def embeddings(model, sentences: tuple[torch.Tensor, ...], size: int = 50) -> torch.Tensor:
    """``model``'s first output over ``sentences`` in chunks, concatenated."""
    chunks = []
    with torch.no_grad():
        for start in range(0, sentences[0].shape[0], size):
            output = model(*(tensor[start:start + size] for tensor in sentences))
            chunks.append(torch.as_tensor(output[0] if isinstance(output, (tuple, list)) else output))
    return torch.cat(chunks)


def cosine_row(output: torch.Tensor, reference: torch.Tensor) -> dict:
    """Mean, 1st percentile and min of the per-sentence cosine to the reference embeddings."""
    cosine = F.cosine_similarity(output.flatten(1), reference.flatten(1), dim=1).double()
    return {"cosine_mean": round(float(cosine.mean()), 4), "cosine_p1": round(float(cosine.quantile(0.01)), 4),
            "cosine_min": round(float(cosine.min()), 4)}


def pruned(zoo, train: tuple[torch.Tensor, ...], args: argparse.Namespace, options: dict) -> tuple[object, dict]:
    """The zoo model compiled with ``prune`` options and recovery; its ledger summary."""
    began = time.perf_counter()
    model = compile(zoo.model, "cpu-fp32", zoo.example_inputs, calibration_data=[train],
                    prune={"macs": args.macs, **options}, recover_seconds=args.seconds)
    prune = model.report.entry("prune_channels")
    recover = next((entry for entry in model.report.entries if entry.name == "recover"), None)
    summary = {"macs_removed": round(1 - prune.macs_after / prune.macs_before, 4),
               "compile_s": round(time.perf_counter() - began, 1), "widths": prune.stats["widths"],
               "padding": prune.stats.get("padding"), "reconstruction": prune.stats.get("reconstruction")}
    if recover is not None:
        summary["recover"] = {key: recover.stats.get(key) for key in
                              ("steps", "seconds", "padding_cut", "feature_points", "held_out_before",
                               "held_out_after", "loss_curve")}
    return model, summary


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    zoo = models.load(args.model)
    train = zoo.calibration_data(args.train)
    sentences = zoo.eval_data(args.eval)
    reference = embeddings(zoo.model, sentences)
    compiled = {"unpruned": compile(zoo.model, "cpu-fp32", zoo.example_inputs)}
    rows, record = {}, {}
    variants = {"fxpress": json.loads(args.options)}
    if not args.no_magnitude:
        variants["magnitude"] = {"importance": "l2", "reconstruct": False}
    for name, options in variants.items():
        model, summary = pruned(zoo, train, args, options)
        compiled[name] = model
        rows[name] = {**cosine_row(embeddings(model, sentences), reference), "macs_removed": summary["macs_removed"],
                      "options": options}
        record[f"{name}_ledger"] = summary
    timing = zoo.eval_data(16, seq_len=args.seq_len)
    record["latency_fp32"] = latency(compiled, timing, (1, 16), args.runs, "unpruned")
    record.update({"rows": rows, "options": vars(args), "machine": platform.processor() or platform.machine(),
                   "torch": torch.__version__, "threads": torch.get_num_threads()})
    return record


def render(record: dict) -> str:
    lines = [f"{'pipeline':12} {'cos mean':>8} {'cos p1':>7} {'cos min':>7}  MACs removed"]
    for name, row in record["rows"].items():
        lines.append(f"{name:12} {row['cosine_mean']:8.4f} {row['cosine_p1']:7.4f} {row['cosine_min']:7.4f}  "
                     f"{row['macs_removed']:>12}")
    for batch, by_runner in record["latency_fp32"].items():
        cells = ", ".join(f"{name} {value['p50_ms']:.1f} ms ({value['ratio']:.3f}x, blocks "
                          f"{value['blocks'][0]:.2f}-{value['blocks'][1]:.2f})" for name, value in by_runner.items())
        lines.append(f"latency_fp32 batch {batch}, seq {record['options']['seq_len']}: {cells}")
    return "\n".join(lines)


def main() -> None:
    parser = pruning_parser(__doc__.split("\n")[0], "minilm-l6")
    parser.add_argument("--train", type=int, default=1752, help="calibration and training sentences")
    parser.add_argument("--eval", type=int, default=500)
    parser.add_argument("--seq-len", type=int, default=128, help="sequence length of the latency rows")
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--options", default="{}", help="more prune options for the fxpress row, as JSON")
    parser.add_argument("--no-magnitude", action="store_true")
    run_and_report(parser.parse_args(), run, render)

if __name__ == "__main__":
    main()
