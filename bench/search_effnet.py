"""The recipe search on EfficientNet-Lite0 beside README's hand-made cpu-int8 configurations, in one run.

Runs ``fxpress search`` on ``examples/search/efficientnet-lite0.toml`` (gate: top-1 agreement >= 0.97
on 500 held-out crops; the float budget of cpu-int8's sensitivity fallback searched), then compiles
the hand-made configurations README's tables name (``--float-macs 0``, ``0.04`` and ``0.1``), measures
each on the same crops, and times them side by side with the search's choice at batch 1 and 16
(median of interleaved blocks; ratio and the range of the block ratios).

    python -m bench.search_effnet -o /tmp/effnet-search            # Ray when installed
    python -m bench.search_effnet -o /tmp/effnet-search --no-ray   # one process
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from compiler.recipe import load_recipe
from compiler.search import search

RECIPE = Path(__file__).resolve().parent.parent / "examples" / "search" / "efficientnet-lite0.toml"
#: The float budgets of README's hand-made cpu-int8 rows for EfficientNet-Lite0.
HAND_MADE = (0.0, 0.04, 0.1)


def main(argv: list[str] | None = None) -> int:
    """Search, then the hand-made configurations beside the choice; print all of them and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", required=True, help="search directory (trials are cached there)")
    parser.add_argument("--no-ray", action="store_true", help="run every trial in this process")
    parser.add_argument("--hand-made", type=float, nargs="*", default=list(HAND_MADE),
                        help="the hand-made float budgets to compare (none: the search alone)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes timed")
    parser.add_argument("--runs", type=int, default=200, help="timed runs of each artifact per batch")
    args = parser.parse_args(argv)
    recipe = load_recipe(RECIPE)
    started = time.perf_counter()
    report = search(recipe, args.output, use_ray=False if args.no_ray else None,
                    progress=lambda line: print(f"[{time.perf_counter() - started:7.1f} s] {line}", file=sys.stderr))
    print(report.render())
    print(f"search wall time {time.perf_counter() - started:.0f} s")
    for trial in report.trials:
        if trial.get("simulation_metrics"):
            print(f"  {trial['patch']}: simulation {trial['simulation_metrics'].get('top1_agreement')}, "
                  f"ONNX Runtime {trial['metrics'].get('top1_agreement')}")
    if report.chosen is None or not args.hand_made:
        return 0 if report.chosen is not None else 1
    hand = {f"float_macs={budget}": _hand_made(recipe, budget, Path(args.output)) for budget in args.hand_made}
    artifacts = {"search": report.chosen["artifact"], **{name: item["artifact"] for name, item in hand.items()}}
    timings = {batch: _side_by_side(recipe, artifacts, batch, args.runs) for batch in args.batches}
    _print_table(report.chosen, hand, timings, recipe.gates[0])
    print(json.dumps({"hand_made": hand, "timings": timings}, indent=1, default=str))
    return 0


def _hand_made(recipe, budget: float, output: Path) -> dict:
    """A hand-made configuration compiled whole (no early stop: it is timed even if it fails the gate)."""
    from compiler.recipe import from_dict
    from compiler.recipe_run import compile_prepared, measure, prepare
    from compiler.search import apply

    folder = output / "hand-made" / f"float-macs-{budget}"
    prepared = prepare(from_dict(apply(recipe.data, {"compile.float_macs": budget}), path=recipe.path))
    prepared.compile_options["threads"] = "auto"  # nothing else runs now
    compiled = compile_prepared(prepared)
    metrics = measure(prepared, compiled, classifier=True)
    compiled.save(folder, force=True)
    print(f"hand-made float_macs={budget}: top1_agreement {metrics['top1_agreement']:.4f}, "
          f"{metrics['sqnr_db']:.2f} dB")
    return {"metrics": metrics, "artifact": str(folder)}


def _side_by_side(recipe, artifacts: dict[str, str], batch: int, runs: int) -> dict:
    """Every artifact timed in rotation at ``batch``: medians, and each over the search's choice with its range."""
    from backends.onnxruntime import make_session
    from compiler import api
    from compiler.recipe_run import bench_inputs, prepare, session_runner
    from compiler.timing import block_ratios, time_side_by_side

    inputs = bench_inputs(prepare(recipe))(batch)
    runners = {name: session_runner(make_session(api.load(path).onnx, "all"), inputs)
               for name, path in artifacts.items()}
    stats = time_side_by_side(runners, batch, warmup=20, runs=runs)
    medians = {item.runner: item.p50_ms for item in stats}
    blocks = block_ratios(stats, "search")
    return {"p50_ms": medians,
            "over_search": {name: {"ratio": medians[name] / medians["search"],
                                   "range": [min(ratios), max(ratios)]} for name, ratios in blocks.items()}}


def _print_table(chosen: dict, hand: dict, timings: dict, gate) -> None:
    print(f"\n{'configuration':<24} {gate.metric:>15}  gate  " + "  ".join(
        f"{f'b{batch} p50 ms':>11} {'/ search (range)':>22}" for batch in timings))
    rows = [("search: " + ", ".join(f"{key.split('.')[-1]}={value}" for key, value in chosen["patch"].items()),
             "search", chosen["metrics"])]
    rows += [(f"hand-made {name}", name, item["metrics"]) for name, item in hand.items()]
    for label, name, metrics in rows:
        value = metrics.get(gate.metric)
        cells = []
        for timing in timings.values():
            over = timing["over_search"].get(name)
            spread = "" if over is None else f"{over['ratio']:.2f} ({over['range'][0]:.2f}-{over['range'][1]:.2f})"
            cells.append(f"{timing['p50_ms'][name]:>11.2f} {spread:>22}")
        print(f"{label:<24} {value:>15.4f}  {'pass' if gate.passes(value) else 'FAIL'}  " + "  ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
