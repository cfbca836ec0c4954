"""The recipe search on EfficientNet-Lite0 beside the hand-made cpu-int8 configuration, in one run.

Runs ``fxpress search`` on ``examples/search/efficientnet-lite0.toml`` (gate: top-1 agreement >= 0.97
on 500 held-out crops; the float budget of cpu-int8's sensitivity fallback searched), then compiles
the hand-made configuration README names (``--float-macs 0.04``), measures it on the same crops, and
times it side by side with the search's choice (median of interleaved blocks; ratio and range).

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


def main(argv: list[str] | None = None) -> int:
    """Search, then the hand-made configuration beside the choice; print both and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", required=True, help="search directory (trials are cached there)")
    parser.add_argument("--no-ray", action="store_true", help="run every trial in this process")
    parser.add_argument("--hand-made", type=float, default=0.04, help="the hand-made float budget to compare")
    parser.add_argument("--runs", type=int, default=200, help="timed runs of each artifact")
    args = parser.parse_args(argv)
    recipe = load_recipe(RECIPE)
    started = time.perf_counter()
    report = search(recipe, args.output, use_ray=False if args.no_ray else None,
                    progress=lambda line: print(f"[{time.perf_counter() - started:7.1f} s] {line}", file=sys.stderr))
    print(report.render())
    print(f"search wall time {time.perf_counter() - started:.0f} s")
    if report.chosen is None:
        return 1
    hand = _hand_made(recipe, args.hand_made, Path(args.output))
    print(json.dumps(_side_by_side(recipe, report.chosen, hand, args.runs), indent=1))
    return 0


def _hand_made(recipe, budget: float, output: Path) -> dict:
    """The hand-made configuration compiled whole (no early stop: it is timed even if it fails the gate)."""
    from compiler.recipe import from_dict
    from compiler.recipe_run import compile_prepared, measure, prepare
    from compiler.search import apply

    folder = output / "hand-made" / f"float-macs-{budget}"
    prepared = prepare(from_dict(apply(recipe.data, {"compile.float_macs": budget}), path=recipe.path))
    prepared.compile_options["threads"] = 1
    compiled = compile_prepared(prepared)
    metrics = measure(prepared, compiled, classifier=True)
    compiled.save(folder, force=True)
    print(f"hand-made float_macs={budget}: top1_agreement {metrics['top1_agreement']:.4f}, "
          f"{metrics['sqnr_db']:.2f} dB")
    return {"metrics": metrics, "artifact": str(folder)}


def _side_by_side(recipe, chosen: dict, hand: dict, runs: int) -> dict:
    from backends.onnxruntime import make_session
    from compiler import api
    from compiler.recipe_run import prepare
    from compiler.timing import block_ratios, time_side_by_side

    (pool,) = prepare(recipe).eval_inputs
    runners = {}
    for name, artifact in (("search", chosen["artifact"]), ("hand-made", hand["artifact"])):
        session = make_session(api.load(artifact).onnx, "all")
        feed = {session.get_inputs()[0].name: pool[:1].numpy()}
        runners[name] = (lambda session=session, feed=feed: session.run(None, feed))
    stats = time_side_by_side(runners, 1, warmup=20, runs=runs)
    blocks = block_ratios(stats, "hand-made")["search"]
    medians = {item.runner: item.p50_ms for item in stats}
    return {"p50_ms": medians, "search_over_hand_made": medians["search"] / medians["hand-made"],
            "block_ratio_range": [min(blocks), max(blocks)],
            "agreement": {"search": chosen["metrics"].get("top1_agreement"),
                          "hand-made": hand["metrics"].get("top1_agreement")}}


if __name__ == "__main__":
    sys.exit(main())
