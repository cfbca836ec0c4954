"""fxpress low-rank factorisation against plain truncated SVD with the same recovery, side by side in one run.

Rows, compiled in one process on the same data:

- ``original``: the reference of every latency ratio (``cpu-fp32``; with ``--int8``, also
  ``original-int8``, the unfactorised ``cpu-int8-dynamic`` model);
- ``fxpress``: ``compile(model, "cpu-fp32", low_rank={"macs": R}, train_data=..., recover_seconds=S)``:
  output-aware truncation weighted by gradient importance, ranks allocated by measured sensitivity,
  sequential reduced-rank re-fit, then distillation;
- ``plain-svd``: ``low_rank={"macs": R, "method": "svd"}``: each weight's own truncated SVD at the
  same share of every layer's MACs, what users try first, with the same recovery;
- for a sentence encoder, ``fxpress-ffn`` and ``plain-svd-ffn``: the FFN layers only (``--ffn-protect``
  names the attention layers left whole), ``--ffn-macs`` of the Linear MACs, no recovery;
- for an image classifier, ``fxpress-prune``: structured pruning at the same MAC share and recovery,
  for the choice between the two;
- with ``--int8``, ``fxpress-int8``: factorised, recovered, then ``cpu-int8-dynamic``.

Quality: sentence encoders, the cosine of each held-out sentence's embedding to the original's
(mean, 1st percentile, min); classifiers, top-1 agreement with the original on the held-out crops
(and on decisive ones). Latency: ONNX Runtime at batch 1 and 16 (sequence ``--seq-len``), timed
in interleaved blocks, as ratios.

    python -m bench.low_rank_peers                                   # minilm-l6, -30% Linear MACs, 180 s
    python -m bench.low_rank_peers --int8 --json low_rank_minilm.json
    python -m bench.low_rank_peers --model efficientnet-lite0 --macs 0.2 --json low_rank_effnet.json
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import models
from bench.prune_encoder import cosine_row, embeddings
from bench.prune_peers import agreement, batched, latency, latency_lines, pruning_parser, run_and_report
from compiler import compile


def compressed(zoo, target: str, data: dict, seconds: float, **options) -> tuple[object, dict]:
    """The zoo model compiled with ``low_rank`` or ``prune`` options and recovery; a summary of its ledger."""
    began = time.perf_counter()
    model = compile(zoo.model, target, zoo.example_inputs, **data, recover_seconds=seconds, **options)
    summary = {"compile_s": round(time.perf_counter() - began, 1)}
    for name in ("low_rank", "prune_channels"):
        entry = next((entry for entry in model.report.entries if entry.name == name), None)
        if entry is not None:
            summary["model_macs_removed"] = round(1 - entry.macs_after / entry.macs_before, 4)
            summary[name] = {key: value for key, value in entry.stats.items() if key not in ("layers", "widths")}
            summary["layers"] = entry.stats.get("layers") or entry.stats.get("widths")
    recover = next((entry for entry in model.report.entries if entry.name == "recover"), None)
    if recover is not None:
        summary["recover"] = {key: recover.stats.get(key) for key in
                              ("steps", "seconds", "held_out_before", "held_out_after", "loss_curve")}
    return model, summary


def run_encoder(args: argparse.Namespace, zoo) -> dict:
    train = zoo.calibration_data(args.train)
    data = {"calibration_data": [train], "train_data": [train]}
    sentences = zoo.eval_data(args.eval)
    reference = embeddings(zoo.model, sentences)
    compiled = {"original": compile(zoo.model, "cpu-fp32", zoo.example_inputs)}
    variants = {
        "fxpress": ("cpu-fp32", args.seconds, {"macs": args.macs}),
        "plain-svd": ("cpu-fp32", args.seconds, {"macs": args.macs, "method": "svd"}),
        "fxpress-ffn": ("cpu-fp32", 0.0, {"macs": args.ffn_macs, "protect": [args.ffn_protect]}),
        "plain-svd-ffn": ("cpu-fp32", 0.0, {"macs": args.ffn_macs, "protect": [args.ffn_protect], "method": "svd"}),
    }
    if args.int8:
        variants["fxpress-int8"] = ("cpu-int8-dynamic", args.seconds, {"macs": args.macs})
    rows, record = {}, {}
    for name, (target, seconds, options) in variants.items():
        model, summary = compressed(zoo, target, data, seconds, low_rank=options)
        if not name.endswith("-ffn"):
            compiled[name] = model
        rows[name] = {**cosine_row(embeddings(model, sentences), reference), "target": target,
                      "recover_seconds": seconds, "low_rank": options,
                      "linear_macs_removed": summary["low_rank"]["budget"]["removed"]}
        record[f"{name}_ledger"] = summary
    timing = zoo.eval_data(16, seq_len=args.seq_len)
    fp32 = {name: model for name, model in compiled.items() if name != "fxpress-int8"}
    record["latency_fp32"] = latency(fp32, timing, (1, 16), args.runs, "original")
    if args.int8:
        int8 = {"original-int8": compile(zoo.model, "cpu-int8-dynamic", zoo.example_inputs),
                "fxpress-int8": compiled["fxpress-int8"]}
        rows["original-int8"] = {**cosine_row(embeddings(int8["original-int8"], sentences), reference),
                                 "target": "cpu-int8-dynamic"}
        record["latency_int8"] = latency(int8, timing, (16,), args.runs, "original-int8")
    record["rows"] = rows
    return record


def run_classifier(args: argparse.Namespace, zoo) -> dict:
    train = zoo.calibration_data(args.train)
    data = {"calibration_data": [tuple(t[: args.calibration] for t in train)], "train_data": [train]}
    images = zoo.eval_data(args.eval)[0]
    reference = batched(zoo.model, images)
    top2 = reference.softmax(1).topk(2, dim=1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 0.2
    compiled = {"original": compile(zoo.model, "cpu-fp32", zoo.example_inputs)}
    variants = {
        "fxpress": {"low_rank": {"macs": args.macs}},
        "plain-svd": {"low_rank": {"macs": args.macs, "method": "svd"}},
        "fxpress-prune": {"prune": {"macs": args.macs}},
    }
    rows, record = {}, {"decisive_crops": int(decisive.sum())}
    for name, options in variants.items():
        model, summary = compressed(zoo, "cpu-fp32", data, args.seconds, **options)
        compiled[name] = model
        rows[name] = {**agreement(batched(model, images), reference, decisive), **options,
                      "model_macs_removed": summary["model_macs_removed"]}
        record[f"{name}_ledger"] = summary
    record["latency_fp32"] = latency(compiled, images[:16].contiguous(), (1, 16), args.runs, "original")
    record["rows"] = rows
    return record


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    zoo = models.load(args.model)
    encoder = zoo.model.__class__.__name__ == "SentenceEncoder" or zoo.example_inputs[0].dtype == torch.int64
    record = run_encoder(args, zoo) if encoder else run_classifier(args, zoo)
    record.update({"options": vars(args), "machine": platform.processor() or platform.machine(),
                   "torch": torch.__version__, "threads": torch.get_num_threads()})
    return record


def render(record: dict) -> str:
    lines = []
    for name, row in record["rows"].items():
        quality = (f"cos mean {row['cosine_mean']:.4f} p1 {row['cosine_p1']:.4f} min {row['cosine_min']:.4f}"
                   if "cosine_mean" in row else f"agreement {row['agreement']:.3f} decisive {row['decisive']:.3f}")
        extra = {key: row[key] for key in ("linear_macs_removed", "model_macs_removed", "recover_seconds", "target")
                 if key in row}
        lines.append(f"{name:16} {quality}  {extra}")
    return "\n".join(lines + latency_lines(record))


def main() -> None:
    parser = pruning_parser(__doc__.split("\n")[0], "minilm-l6")
    parser.add_argument("--train", type=int, default=1752, help="calibration and training samples")
    parser.add_argument("--calibration", type=int, default=256, help="classifiers: the first N training crops "
                                                                    "are the calibration data")
    parser.add_argument("--eval", type=int, default=500)
    parser.add_argument("--seq-len", type=int, default=128, help="sequence length of the latency rows")
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--ffn-macs", type=float, default=0.2, help="encoders: the FFN-only rows' share of MACs")
    parser.add_argument("--ffn-protect", default="*attention*", help="encoders: the layers the FFN rows leave whole")
    parser.add_argument("--int8", action="store_true", help="also factorised then cpu-int8-dynamic")
    run_and_report(parser.parse_args(), run, render)


if __name__ == "__main__":
    main()
