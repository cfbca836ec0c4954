"""fxpress structured pruning against Torch-Pruning, side by side in one process, same data and budget.

For an ImageNet classifier of the zoo (EfficientNet-Lite0 by default):

- ``unpruned``: the model compiled to ``cpu-fp32`` (the reference of every latency ratio);
- ``fxpress``: ``compile(model, "cpu-fp32", prune={"macs": R}, calibration_data=..., recover_seconds=S)``
  (data-aware importance, uniform allocation, widths in the backend's channel multiple, least-squares
  reconstruction, then distillation);
- ``torch-pruning``: Torch-Pruning's ``MetaPruner`` with L2 magnitude importance, uniform ratio,
  ``round_to=16`` (the expert setting; its default ``round_to=None`` runs slower than unpruned),
  the classifier ignored, the ratio bisected until its MAC count meets the same budget; then the
  same logit distillation (``passes.recovery.recover.distil``: KL at temperature 2, Adam, cosine,
  batch 16, same seed and seconds) on the eager pruned model; then compiled to ``cpu-fp32`` the same
  way. fxpress's recovery adds its intermediate-feature term (``recover``'s ``features``), which
  needs the channels pruning kept; the eager Torch-Pruning model does not record them.
- with ``--latency R``: ``fxpress-latency``, ``prune={"latency": R, "latency_batch": 16}`` (a
  per-layer latency table, sensitivity allocation, the pruned copy timed against the unpruned one)
  with the same recovery;
- with ``--int8``: the unpruned and the fxpress-pruned model compiled to ``cpu-int8``; with ``--latency R``
  too, ``fxpress-int8-latency``: ``compile(model, "cpu-int8", prune={"latency": R, "latency_batch": 16})``,
  whose layer table and check time ONNX Runtime's integer kernels.

Quality: top-1 agreement with the eager unpruned model on the zoo's evaluation crops (disjoint
from the calibration/training crops), and on the decisive crops (fp32's top-1 probability beats
its top-2 by 0.2). Latency: ONNX Runtime sessions at batch 1 and 16, timed in interleaved blocks
(``time_side_by_side``), as ratios to ``unpruned`` (``unpruned-int8`` for the int8 rows).

Torch-Pruning comes with the ``peers`` extra (``pip install -e ".[peers]"``); without it the
``torch-pruning`` row says so and the rest runs.

    python -m bench.prune_peers --int8                         # -30% MACs, 180 s recovery
    python -m bench.prune_peers --int8 --latency 0.7 --train 2048  # recovery on 2048 crops
    python -m bench.prune_peers --macs 0.5 --seconds 300 --json prune50.json
    python -m bench.prune_peers --latency 0.7 --no-torch-pruning    # latency-driven against MAC-driven
    python -m bench.prune_peers --macs 0.36 --latency 0.7 --latency-prune '{"allocation": "uniform"}'
    python -m bench.prune_peers --int8 --int8-only --latency 0.75 --train 2048   # the int8 rows alone
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import time
import warnings

import numpy as np
import torch

import models
from backends.onnxruntime import make_session
from compiler import compile
from compiler.cli.benchmark import block_ratios, time_side_by_side
from passes.recovery.recover import Recover, distil, mirror_dims

logger = logging.getLogger("bench.prune_peers")


def agreement(logits: torch.Tensor, reference: torch.Tensor, decisive: torch.Tensor) -> dict:
    """Top-1 agreement overall and on the decisive crops."""
    same = (logits.argmax(1) == reference.argmax(1)).double()
    return {"agreement": round(float(same.mean()), 4), "decisive": round(float(same[decisive].mean()), 4)}


def batched(function, images: torch.Tensor, size: int = 50) -> torch.Tensor:
    """``function`` over ``images`` in chunks, concatenated."""
    with torch.no_grad():
        return torch.cat([function(images[start:start + size]) for start in range(0, len(images), size)])


def torch_pruning_model(model: torch.nn.Module, example: torch.Tensor, macs: float) -> tuple[torch.nn.Module, dict]:
    """Torch-Pruning L2 magnitude, uniform, round_to=16, the ratio bisected to remove ``macs`` of the MACs."""
    import torch_pruning as tp

    base_macs, _ = tp.utils.count_ops_and_params(model, example)
    low, high, best = 0.0, 0.9, None
    for _ in range(10):
        ratio = (low + high) / 2
        candidate = _tp_prune(copy.deepcopy(model), example, ratio)
        removed = 1 - tp.utils.count_ops_and_params(candidate, example)[0] / base_macs
        if removed >= macs:
            high, best = ratio, (candidate, ratio, removed)
        else:
            low = ratio
    candidate, ratio, removed = best
    return candidate.eval(), {"ratio": round(ratio, 4), "macs_removed": round(float(removed), 4),
                              "version": getattr(tp, "__version__", "?")}


def _tp_prune(model: torch.nn.Module, example: torch.Tensor, ratio: float) -> torch.nn.Module:
    import torch_pruning as tp

    classifier = [module for module in model.modules() if isinstance(module, torch.nn.Linear)][-1:]
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=classifier, round_to=16)
    pruner.step()
    return model


def distil_eager(student: torch.nn.Module, teacher: torch.nn.Module, train: torch.Tensor, seconds: float,
                 recover: dict | None = None) -> dict:
    """The recovery pass's distillation, with ``recover``'s options, on an eager model; BatchNorm frozen."""
    student.eval()  # frozen BatchNorm statistics, as the IR's folded BatchNorm is
    student = student.to(memory_format=torch.channels_last)
    parameters = [parameter for parameter in student.parameters() if parameter.is_floating_point()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    options = {**Recover.default_options, **(recover or {}), "seconds": seconds}
    samples = (train[: len(train) - max(8, len(train) // 10)].contiguous(memory_format=torch.channels_last),)
    mirror, _ = mirror_dims(samples, options["augment"])  # the same data augmentation as the recovery pass
    curve, steps, spent = distil(student, teacher, samples, parameters, "kl", options, mirror=mirror)
    for parameter in parameters:
        parameter.requires_grad_(False)
    return {"steps": steps, "seconds": round(spent, 1), "loss_curve": curve}


def session_runner(compiled, inputs: tuple[torch.Tensor, ...]):
    """A zero-argument call of a fresh ONNX Runtime session of ``compiled`` on ``inputs``."""
    session = make_session(compiled.onnx.SerializeToString())
    feed = {spec.name: value.numpy() for spec, value in zip(session.get_inputs(), inputs, strict=True)}
    return lambda: session.run(None, feed)


def latency(compiled: dict, inputs: torch.Tensor | tuple[torch.Tensor, ...], batches: tuple[int, ...], runs: int,
            reference: str) -> dict:
    """p50 ms and the ratio to ``reference`` (with the spread of block ratios) per batch size."""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
    result = {}
    for batch in batches:
        rows = tuple(tensor[:batch].contiguous() for tensor in inputs)
        runners = {name: session_runner(model, rows) for name, model in compiled.items()}
        stats = time_side_by_side(runners, batch, runs=runs)
        blocks = block_ratios(stats, reference)
        base = next(item.p50_ms for item in stats if item.runner == reference)
        result[batch] = {item.runner: {"p50_ms": round(item.p50_ms, 3), "ratio": round(item.p50_ms / base, 3),
                                       "blocks": [round(min(blocks.get(item.runner, [1])), 3),
                                                  round(max(blocks.get(item.runner, [1])), 3)]}
                         for item in stats}
    return result


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    zoo = models.load(args.model)
    train = zoo.calibration_data(args.train)[0]
    data = {"calibration_data": [(train[: args.calibration],)], "train_data": [(train,)], "recover": args.recover}
    images = zoo.eval_data(args.eval)[0]
    reference = batched(zoo.model, images)
    top2 = reference.softmax(1).topk(2, dim=1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 0.2
    rows, record = {}, {"decisive_crops": int(decisive.sum())}

    if not args.int8_only:
        fp32_rows(zoo, args, data, (images, reference, decisive), rows, record)
    if args.int8:
        int8_rows(zoo, args, data, (images, reference, decisive), rows, record)
    record.update({"rows": rows, "options": vars(args), "machine": platform.processor() or platform.machine(),
                   "torch": torch.__version__, "threads": torch.get_num_threads()})
    return record


def fp32_rows(zoo, args: argparse.Namespace, data: dict, held_out: tuple, rows: dict, record: dict) -> None:
    """The fp32 rows (unpruned, fxpress, fxpress-latency, Torch-Pruning) and their latency table."""
    images, reference, decisive = held_out
    compiled = {}
    began = time.perf_counter()
    compiled["unpruned"] = compile(zoo.model, "cpu-fp32", zoo.example_inputs)
    fx_model = compile(zoo.model, "cpu-fp32", zoo.example_inputs, **data,
                       prune={"macs": args.macs, **args.prune}, recover_seconds=args.seconds)
    compiled["fxpress"] = fx_model
    entry = fx_model.report.entry("prune_channels")
    rows["fxpress"] = {**agreement(batched(fx_model, images), reference, decisive),
                       "macs_removed": round(1 - entry.macs_after / entry.macs_before, 4),
                       "compile_s": round(time.perf_counter() - began, 1)}
    record["fxpress_ledger"] = {"prune_channels": {k: v for k, v in entry.stats.items() if k != "widths"},
                                "widths": entry.stats["widths"], "recover": fx_model.report.entry("recover").stats}

    if args.latency:
        began = time.perf_counter()
        lat_model = compile(zoo.model, "cpu-fp32", zoo.example_inputs, **data,
                            prune={"latency": args.latency, "latency_batch": 16, **args.latency_prune},
                            recover_seconds=args.seconds)
        compiled["fxpress-latency"] = lat_model
        entry = lat_model.report.entry("prune_channels")
        rows["fxpress-latency"] = {**agreement(batched(lat_model, images), reference, decisive),
                                   "macs_removed": round(1 - entry.macs_after / entry.macs_before, 4),
                                   "compile_s": round(time.perf_counter() - began, 1)}
        record["fxpress_latency_ledger"] = {"latency": entry.stats["latency"], "allocation": entry.stats["allocation"],
                                            "widths": entry.stats["widths"]}

    if not args.no_torch_pruning:
        try:
            tp_model, tp_info = torch_pruning_model(copy.deepcopy(zoo.model), zoo.example_inputs[0], args.macs)
        except ImportError as error:
            rows["torch-pruning"] = {"not available": str(error)}
        else:
            rows["torch-pruning"] = {**tp_info, "after_pruning": agreement(batched(tp_model, images), reference,
                                                                          decisive)}
            rows["torch-pruning"]["recovery"] = distil_eager(tp_model, zoo.model, data["train_data"][0][0],
                                                              args.seconds, data["recover"])
            rows["torch-pruning"].update(agreement(batched(tp_model, images), reference, decisive))
            compiled["torch-pruning"] = compile(tp_model, "cpu-fp32", zoo.example_inputs)

    record["latency_fp32"] = latency(compiled, images[:16].contiguous(), (1, 16), args.runs, "unpruned")


def int8_rows(zoo, args: argparse.Namespace, data: dict, held_out: tuple, rows: dict, record: dict) -> None:
    """The cpu-int8 rows (unpruned, pruned by MACs, by latency) and their latency table at batch 16."""
    images, reference, decisive = held_out
    int8 = {"unpruned-int8": compile(zoo.model, "cpu-int8", zoo.example_inputs,
                                     calibration_data=data["calibration_data"])}
    int8["fxpress-int8"] = compile(zoo.model, "cpu-int8", zoo.example_inputs, **data,
                                   prune={"macs": args.macs, **args.prune}, recover_seconds=args.seconds)
    if args.latency:
        int8["fxpress-int8-latency"] = compile(zoo.model, "cpu-int8", zoo.example_inputs, **data,
                                               prune={"latency": args.latency, "latency_batch": 16,
                                                      **args.latency_prune},
                                               recover_seconds=args.seconds)
        entry = int8["fxpress-int8-latency"].report.entry("prune_channels")
        record["fxpress_int8_latency_ledger"] = {
            "latency": entry.stats["latency"], "allocation": entry.stats["allocation"],
            "widths": entry.stats["widths"], "macs_removed": round(1 - entry.macs_after / entry.macs_before, 4)}
    for name, model in int8.items():
        rows[name] = agreement(batched(model, images), reference, decisive)
    record["latency_int8"] = latency(int8, images[:16].contiguous(), (16,), args.runs, "unpruned-int8")


def render(record: dict) -> str:
    lines = [f"{'pipeline':16} {'agreement':>9} {'decisive':>8}  MACs removed   extra"]
    for name, row in record["rows"].items():
        if "agreement" not in row:
            lines.append(f"{name:16} {row}")
            continue
        lines.append(f"{name:16} {row['agreement']:9.3f} {row['decisive']:8.3f}  "
                     f"{row.get('macs_removed', ''):>12}   "
                     f"{ {k: v for k, v in row.items() if k in ('after_pruning', 'ratio')} }")
    return "\n".join(lines + latency_lines(record))


def latency_lines(record: dict) -> list[str]:
    """One line per latency table and batch of a bench record: each runner's p50, ratio and block spread."""
    lines = []
    for key in ("latency_fp32", "latency_int8"):
        for batch, by_runner in record.get(key, {}).items():
            cells = ", ".join(f"{name} {value['p50_ms']:.1f} ms ({value['ratio']:.3f}x, blocks "
                              f"{value['blocks'][0]:.2f}-{value['blocks'][1]:.2f})"
                              for name, value in by_runner.items())
            lines.append(f"{key} batch {batch}: {cells}")
    return lines


def pruning_parser(description: str, model: str) -> argparse.ArgumentParser:
    """The arguments both pruning benches take: the zoo model, the MAC share removed, the recovery seconds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=model)
    parser.add_argument("--macs", type=float, default=0.3)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--json")
    return parser


def run_and_report(args: argparse.Namespace, run, render) -> None:
    """Run a bench quietly, print its table, and write its record to ``--json`` when given."""
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    record = run(args)
    print(render(record))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=1, default=lambda value: np.asarray(value).tolist())


def main() -> None:
    parser = pruning_parser(__doc__.split("\n")[0], "efficientnet-lite0")
    parser.add_argument("--train", type=int, default=256, help="training crops (recovery, both pruners)")
    parser.add_argument("--calibration", type=int, default=256,
                        help="the first N training crops are the calibration data (reconstruction, int8)")
    parser.add_argument("--eval", type=int, default=500)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--latency", type=float, default=0.0,
                        help="also fxpress with prune={'latency': R, 'latency_batch': 16} (e.g. 0.7)")
    parser.add_argument("--prune", type=json.loads, default={},
                        help="more prune options for the MAC-driven fxpress rows, as JSON, e.g. "
                             "'{\"allocation\": \"uniform\"}'")
    parser.add_argument("--latency-prune", type=json.loads, default={},
                        help="more prune options for the latency rows, as JSON, e.g. '{\"allocation\": \"uniform\"}'")
    parser.add_argument("--int8", action="store_true", help="also pruned then cpu-int8 against unpruned cpu-int8")
    parser.add_argument("--int8-only", action="store_true", help="with --int8: only the int8 rows")
    parser.add_argument("--no-torch-pruning", action="store_true")
    parser.add_argument("--recover", type=json.loads, default={},
                        help="more recovery options for every pruned row, as JSON, e.g. '{\"augment\": \"none\"}'")
    run_and_report(parser.parse_args(), run, render)

if __name__ == "__main__":
    main()
