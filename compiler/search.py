"""Accuracy-aware search over recipes: the fastest artifact that passes every gate.

A recipe's ``[search.space]`` maps recipe keys to the values to try::

    [search.space]
    "compile.float_macs" = [0.0, 0.01, 0.02, 0.04, 0.1]
    "compile.calibrator" = ["mse", "entropy"]

Each point of the grid is a trial: the recipe with those values, compiled and measured on the
evaluation data. Axes whose effect is known are *ordered* by aggressiveness (a smaller float
budget, a larger pruning or factorisation share: faster, less accurate); the others are tried in
every combination. Along the ordered axes the search uses dominance, assuming the gates' metrics
get worse and latency better as a point gets more aggressive: a point that fails its gates fails
for every more aggressive point (skipped), a point that passes is faster than every less
aggressive one (skipped), so each group of unordered values needs about log2 of its ordered
points. A trial whose fake-quantised simulation already fails a quality gate by more than
:data:`SIMULATION_MARGIN` stops before lowering. Every lowered trial is then timed side by side
in one process (latency is never measured while trials run): the fastest passing trial is the
answer, and the trials no other beats on both latency and the first gate's metric are the front.

Trials are cached by the SHA-256 of the trial's recipe and the package versions under
``DIR/trials/<hash>/``; an interrupted search reruns only what it had not finished. With Ray
installed, trials of a round run as Ray tasks (``ray.init()`` on this machine, or ``address`` to
join a cluster); without it, in this process, with the same results.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compiler.errors import FxpressError, UsageError

logger = logging.getLogger(__name__)

#: Axes whose direction is known: +1 when a larger value is more aggressive (faster, less accurate).
ORDERED_AXES = {
    "compile.float_macs": -1, "compile.float_prefix": -1,
    "prune.macs": +1, "prune.params": +1, "prune.latency": -1, "prune.sparsity": +1,
    "low_rank.macs": +1, "low_rank.params": +1, "low_rank.energy": -1,
}
#: How far a trial's fake-quantised simulation may miss a quality gate and still be lowered: the
#: ONNX Runtime model rounds differently (integer kernels) and may pass where its simulation does
#: not (on EfficientNet-Lite0 they differed by up to 1% of top-1 agreement). ``[search]
#: simulation_margin`` overrides these per metric; 0 rejects on the simulation's verdict alone.
SIMULATION_MARGIN = {"top1_agreement": 0.01, "cosine_mean": 0.002, "cosine_min": 0.01, "sqnr_db": 0.5,
                     "accuracy_drop": 1.0}
#: Axes whose values are lists of layers kept in float: ordered when the lists are nested (each
#: holds the next smaller one), a smaller list being more aggressive.
NESTED_AXES = ("compile.float_modules",)
#: A space value that leaves the key out of the trial's recipe.
UNSET = "unset"
RESULT_FILE = "result.json"
ARTIFACT_DIR = "artifact"


@dataclasses.dataclass(frozen=True)
class Space:
    """The axes of a search: recipe keys and their values, in the recipe's order."""

    keys: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]
    ordered_axes: tuple[bool, ...]

    @classmethod
    def from_recipe(cls, recipe) -> Space:
        """The ``[search.space]`` table, each axis's values sorted from least to most aggressive when ordered."""
        table = recipe.get("search.space")
        if not table:
            raise UsageError("recipe key search.space: give the values to try, e.g. "
                             "\"compile.float_macs\" = [0.0, 0.02, 0.04]")
        keys, values, ordered = [], [], []
        for key, options in table.items():
            direction = ORDERED_AXES.get(key)
            is_ordered = UNSET not in options and (direction is not None or (key in NESTED_AXES and _nested(options)))
            if is_ordered:  # least aggressive first; nested lists: the longest first
                options = sorted(options, key=None if direction else len, reverse=(direction or -1) < 0)
            keys.append(key)
            values.append(tuple(options))
            ordered.append(is_ordered)
        return cls(tuple(keys), tuple(values), tuple(ordered))

    @property
    def grid_size(self) -> int:
        """How many trials the full grid would run."""
        size = 1
        for options in self.values:
            size *= len(options)
        return size

    def ordered(self, axis: int) -> bool:
        """Whether axis ``axis`` is ordered by aggressiveness."""
        return self.ordered_axes[axis]

    def points(self) -> list[tuple[int, ...]]:
        """Every grid point, as one value index per axis."""
        return list(itertools.product(*(range(len(options)) for options in self.values)))

    def patch(self, point: tuple[int, ...]) -> dict[str, Any]:
        """The point as ``{recipe key: value}`` (dotted keys)."""
        return {key: self.values[axis][index] for axis, (key, index) in enumerate(zip(self.keys, point, strict=True))}

    def dominates(self, left: tuple[int, ...], right: tuple[int, ...]) -> bool:
        """True when ``right`` is at least as aggressive as ``left`` on every ordered axis, equal elsewhere."""
        for axis, (a, b) in enumerate(zip(left, right, strict=True)):
            if self.ordered(axis):
                if a > b:
                    return False
            elif a != b:
                return False
        return True


def _nested(options: list) -> bool:
    """True when every value is a list and, smallest first, each is contained in the next."""
    if not all(isinstance(option, list) for option in options):
        return False
    chain = sorted((set(option) for option in options), key=len)
    return all(small < large for small, large in itertools.pairwise(chain))


def apply(data: dict, patch: dict[str, Any]) -> dict:
    """Recipe tables with dotted ``patch`` keys set (``UNSET`` or an empty list removes a key)."""
    data = copy.deepcopy(data)
    data.pop("search", None)
    for dotted, value in patch.items():
        *path, leaf = dotted.split(".")
        node = data
        for part in path:
            node = node.setdefault(part, {})
        if value == UNSET or value == []:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return data


def trial_key(data: dict) -> str:
    """SHA-256 of a trial's recipe tables and the versions that shape its artifact."""
    from compiler.manifest import package_versions

    text = json.dumps({"recipe": data, "versions": package_versions()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_trial(data: dict, base: str, directory: str, threads: int | str = "auto") -> dict:
    """Compile one trial's recipe, stop before lowering if its simulation fails a quality gate, save it.

    Returns the trial's record (also written as ``directory/result.json``; a finished trial's record
    is returned as it is, ``cached`` set). Module-level and given plain data, so a Ray task can run it.
    """
    folder = Path(directory)
    done = folder / RESULT_FILE
    if done.is_file():
        return {**json.loads(done.read_text()), "cached": True}
    started = time.perf_counter()
    try:
        record = _trial(data, Path(base), folder, threads)
    except FxpressError as error:
        record = {"stage": "error", "error": f"{type(error).__name__}: {error}", "passed": False}
    record["seconds"] = round(time.perf_counter() - started, 2)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / (RESULT_FILE + ".tmp")
    staging.write_text(json.dumps(record, indent=1, default=str))
    os.replace(staging, done)  # atomic: a killed trial leaves no result, so it reruns
    return {**record, "cached": False}


class _Rejected(Exception):
    """The simulation failed a quality gate: no lowering."""

    def __init__(self, metrics: dict, results: list):
        super().__init__("simulation fails a gate")
        self.metrics, self.results = metrics, results


def _trial(data: dict, base: Path, folder: Path, threads: int | str) -> dict:
    from compiler.gates import evaluate
    from compiler.recipe import from_dict
    from compiler.recipe_run import compile_prepared, measure, prepare

    recipe = from_dict(data, path=base / "search-trial.toml")
    prepared = prepare(recipe)
    prepared.compile_options["threads"] = threads
    quality = [gate for gate in recipe.gates if gate.metric != "latency_ratio"]
    margins = {**SIMULATION_MARGIN, **(recipe.get("search.simulation_margin") or {})}
    loose = [gate.loosened(margins.get(gate.metric, 0.0)) for gate in quality]
    classifier = None if prepared.source.zoo_entry is None else prepared.source.zoo_entry.task == "classification"
    simulated: dict = {}

    def check_simulation(gm) -> None:
        simulated.update(measure(prepared, gm, classifier=classifier))
        if not all(result.passed for result in evaluate(loose, simulated)):
            raise _Rejected(simulated, evaluate(quality, simulated))

    try:
        compiled = compile_prepared(prepared, before_lowering=check_simulation)
    except _Rejected as rejected:
        return {"stage": "rejected in simulation", "metrics": rejected.metrics, "passed": False,
                "gates": [result.to_dict() for result in rejected.results]}
    metrics = measure(prepared, compiled, classifier=classifier)
    results = evaluate(quality, metrics)
    compiled.manifest["recipe"] = {"sha256": recipe.sha256, "text": recipe.text}
    compiled.report.gates = [result.to_dict() for result in results]
    compiled.save(folder / ARTIFACT_DIR, force=True)
    return {"stage": "lowered", "metrics": metrics, "simulation_metrics": dict(simulated),
            "gates": [result.to_dict() for result in results], "passed": all(result.passed for result in results)}


@dataclasses.dataclass
class SearchReport:
    """Every trial, the skipped points with their reason, the front, and the chosen trial."""

    space: Space
    trials: list[dict]  # {"point", "patch", "key", "stage", "passed", "metrics", "cached", "latency_ms"?}
    skipped: dict[tuple[int, ...], str]
    chosen: dict | None
    front: list[dict]
    seconds: float
    executor: str

    @property
    def reused(self) -> int:
        """Trials read back from the cache instead of run."""
        return sum(1 for trial in self.trials if trial.get("cached"))

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {"grid_size": self.space.grid_size, "trials_run": len(self.trials), "reused": self.reused,
                "executor": self.executor, "seconds": round(self.seconds, 1), "chosen": self.chosen,
                "front": self.front, "trials": self.trials,
                "skipped": [{"patch": self.space.patch(point), "reason": reason}
                            for point, reason in self.skipped.items()]}

    def render(self) -> str:
        """A table of every trial, the front and the answer."""
        lines = [f"search: {len(self.trials)} trials of a {self.space.grid_size}-point grid "
                 f"({self.reused} reused from the cache), {self.seconds:.0f} s, {self.executor}"]
        for trial in self.trials:
            latency = f"{trial['latency_ms']:.2f} ms" if trial.get("latency_ms") is not None else "-"
            metrics = ", ".join(f"{gate['metric']} {gate['value']:.4f}" for gate in trial.get("gates", [])
                                if gate.get("value") is not None)
            lines.append(f"  {'PASS' if trial['passed'] else 'FAIL'}  {_patch_text(trial['patch'])}  "
                         f"[{trial['stage']}] {metrics}  p50 {latency}")
        lines.append(f"skipped by dominance: {len(self.skipped)}")
        if self.chosen is None:
            lines.append("no trial passes every gate")
        else:
            lines.append(f"chosen: {_patch_text(self.chosen['patch'])}  p50 {self.chosen['latency_ms']:.2f} ms")
        return "\n".join(lines)


def _patch_text(patch: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in patch.items())


def search(recipe, output: str | Path, *, address: str | None = None, use_ray: bool | None = None,
           workers: int = 2, progress: Callable[[str], None] | None = None,
           on_round: Callable[[int, int, int, str], None] | None = None) -> SearchReport:
    """Search the recipe's ``[search.space]`` for the fastest trial passing every gate; write it to ``output``.

    ``use_ray`` None uses Ray when it is installed; False runs every trial in this process.
    ``progress`` gets a line per trial; ``on_round(points decided, grid size, trials run, best so far)`` is called
    after each round of trials. ``output`` receives ``trials/``, ``search.json``, ``search.html`` and
    the chosen artifact as ``best/``.
    """
    started = time.perf_counter()
    space = Space.from_recipe(recipe)
    if not recipe.gates:
        raise UsageError("recipe key gates: a search needs gates to pass, e.g. gates = [\"top1_agreement >= 0.97\"]")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    executor = _executor(use_ray, address, workers)
    say = progress or (lambda line: None)
    status: dict[tuple[int, ...], str] = {}
    trials: list[dict] = []
    while pending := _next_round(space, status, executor.width):
        records = executor.map([_trial_call(recipe, space, point, output) for point in pending])
        for point, record in zip(pending, records, strict=True):
            trial = {"point": list(point), "patch": space.patch(point), **record}
            trials.append(trial)
            status[point] = "pass" if record["passed"] else "fail"
            _propagate(space, status, point)
            say(f"trial {len(trials)}: {_patch_text(trial['patch'])}: {'PASS' if record['passed'] else 'FAIL'} "
                f"({record['stage']}{', cached' if record.get('cached') else ''})")
        if on_round is not None:
            on_round(len(status), space.grid_size, len(trials), _best(space, trials))
    skipped = {point: reason for point, reason in status.items() if reason not in ("pass", "fail")}
    timed = [trial for trial in trials if trial.get("artifact")]
    _time_side_by_side(timed, output, recipe)
    chosen = _choose(space, [trial for trial in timed if trial["passed"]])
    if chosen is not None:
        _publish(chosen, output)
    front = [{"key": trial["key"], "patch": trial["patch"], "latency_ms": trial["latency_ms"],
              "metrics": trial["metrics"], "passed": trial["passed"]} for trial in _pareto(timed, recipe.gates[0])]
    report = SearchReport(space, trials, skipped, chosen, front, time.perf_counter() - started, executor.name)
    summary = report.to_dict()
    (output / "search.json").write_text(json.dumps(summary, indent=1, default=str))
    from compiler.report_html import render_search_html

    (output / "search.html").write_text(render_search_html(summary))
    return report


def _choose(space: Space, passing: list[dict]) -> dict | None:
    """The fastest passing trial; among those timing cannot tell from it, the most aggressive.

    A trial is tied with the fastest when in some block of the side-by-side timing it was at least
    as fast (its smallest block ratio to the fastest is <= 1): then which of them is faster is noise,
    and the dominance order decides, so two searches with the same verdicts choose alike.
    """
    if not passing:
        return None
    fastest = min(passing, key=lambda trial: trial["latency_ms"])
    tied = [trial for trial in passing if trial is fastest or trial["block_ratio_min"].get(fastest["key"], 2.0) <= 1.0]
    return max(tied, key=lambda trial: (_aggressiveness(space, trial["point"]), -trial["latency_ms"]))


def _aggressiveness(space: Space, point) -> int:
    return sum(index for axis, index in enumerate(point) if space.ordered(axis))


def _best(space: Space, trials: list[dict]) -> str:
    """The most aggressive passing trial so far (what the search would answer if it stopped now)."""
    passing = [trial for trial in trials if trial["passed"]]
    if not passing:
        return "none yet"
    ranked = max(passing, key=lambda trial: _aggressiveness(space, trial["point"]))
    return _patch_text(ranked["patch"])


def _trial_call(recipe, space: Space, point: tuple[int, ...], output: Path) -> tuple:
    data = apply(recipe.data, space.patch(point))
    if margin := recipe.get("search.simulation_margin"):
        data["search"] = {"simulation_margin": margin}  # it decides the trial's stage, so it is in its hash
    key = trial_key(data)
    return data, str(recipe.base), str(output / "trials" / key), 1


def _next_round(space: Space, status: dict, width: int) -> list[tuple[int, ...]]:
    """Up to ``width`` undecided points, spread over the groups of unordered values.

    Within a group the points are ranked by aggressiveness and cut at even quantiles: with one
    worker the median (a bisection), with ``w`` workers a ``w + 1``-ary search.
    """
    groups: dict[tuple, list] = {}
    for point in space.points():
        if point not in status:
            groups.setdefault(_group(space, point), []).append(point)
    share = max(1, width // max(1, len(groups)))
    chosen = []
    for members in groups.values():
        members.sort(key=lambda point: sum(point[axis] for axis in range(len(point)) if space.ordered(axis)))
        picks = {members[(len(members) * (k + 1)) // (share + 1)] for k in range(min(share, len(members)))}
        chosen += sorted(picks)
    return chosen[:width]


def _group(space: Space, point: tuple[int, ...]) -> tuple:
    return tuple(index for axis, index in enumerate(point) if not space.ordered(axis))


def _propagate(space: Space, status: dict, point: tuple[int, ...]) -> None:
    """A failing point fails every more aggressive point; a passing one is faster than every less aggressive one."""
    verdict = status[point]
    for other in space.points():
        if other in status or other == point:
            continue
        if verdict == "fail" and space.dominates(point, other):
            status[other] = "skipped: more aggressive than a failing trial"
        elif verdict == "pass" and space.dominates(other, point):
            status[other] = "skipped: less aggressive than a passing trial (slower)"


def _pareto(timed: list[dict], gate) -> list[dict]:
    """The timed trials no other timed trial beats on both latency and the first gate's metric, fastest first."""
    from compiler.gates import METRICS

    sign = 1.0 if METRICS[gate.metric]["higher"] else -1.0

    def quality(trial: dict) -> float:
        value = trial["metrics"].get(gate.metric)
        return float("inf") if value is None else sign * value

    front, best = [], -float("inf")
    for trial in sorted(timed, key=lambda item: (item["latency_ms"], -quality(item))):
        if quality(trial) > best:
            front.append(trial)
            best = quality(trial)
    return front


def _time_side_by_side(candidates: list[dict], output: Path, recipe) -> None:
    """Median latency of every candidate at the recipe's first bench batch, timed in rotation in one process.

    The timings are cached with the set of candidates, so a resumed search decides as the first did.
    """
    if not candidates:
        return
    cache = output / "latency.json"
    keys = sorted(trial["key"] for trial in candidates)
    stored = json.loads(cache.read_text()) if cache.is_file() else {}
    if stored.get("keys") != keys or "block_ratio_min" not in stored:
        stored = {"keys": keys, **_measure_latency(candidates, recipe)}
        cache.write_text(json.dumps(stored, indent=1))
    for trial in candidates:
        trial["latency_ms"] = stored["latency_ms"][trial["key"]]
        trial["block_ratio_min"] = stored["block_ratio_min"][trial["key"]]


def _measure_latency(candidates: list[dict], recipe) -> dict[str, dict]:
    """Medians by trial key, and each trial's smallest block ratio to every other trial."""
    from backends.onnxruntime import make_session
    from compiler import api
    from compiler.recipe import from_dict
    from compiler.recipe_run import DEFAULT_BENCH, bench_inputs, prepare, session_runner
    from compiler.timing import block_ratios, time_side_by_side

    settings = {**DEFAULT_BENCH, **(recipe.get("bench") or {})}
    batch = settings["batches"][0]
    inputs = bench_inputs(prepare(from_dict(apply(recipe.data, candidates[0]["patch"]), path=recipe.path)))(batch)
    runners = {trial["key"]: session_runner(make_session(api.load(trial["artifact"]).onnx, "all"), inputs)
               for trial in candidates}
    stats = time_side_by_side(runners, batch, warmup=settings["warmup"], runs=settings["runs"])
    lowest = {item.runner: {other: min(ratios) for other, ratios in block_ratios(stats, item.runner).items()}
              for item in stats}
    return {"latency_ms": {item.runner: item.p50_ms for item in stats},
            "block_ratio_min": {key: {other: lowest[other][key] for other in lowest if other != key}
                                for key in lowest}}


def _publish(chosen: dict, output: Path) -> None:
    import shutil

    destination = output / "best"
    if destination.exists():
        shutil.rmtree(destination)
    shutil.copytree(chosen["artifact"], destination)


class _LocalExecutor:
    """Each round's trials one after another: the same rounds as Ray's with as many workers, so the same search."""

    def __init__(self, workers: int):
        self.width, self.name = workers, f"one process (rounds of {workers})"

    def map(self, calls: list[tuple]) -> list[dict]:
        return [_finish(call, run_trial(*call)) for call in calls]


class _RayExecutor:
    def __init__(self, address: str | None, workers: int):
        import ray

        if not ray.is_initialized():
            try:
                ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                         log_to_driver=False, ignore_reinit_error=True)
            except ConnectionError as error:
                raise UsageError(
                    f"--ray-address {address}: could not join that Ray cluster ({error}); check the address with "
                    "`ray status` on the cluster, and where the cluster uses Ray's token authentication (the default "
                    "of `ray start` in recent Ray), set RAY_AUTH_MODE=token here with the cluster's token in "
                    "RAY_AUTH_TOKEN or ~/.ray/auth_token") from None
        self.ray, self.width = ray, workers
        self.name = f"Ray ({address or 'local'}, {workers} workers)"
        self.remote = ray.remote(num_cpus=1)(run_trial)

    def map(self, calls: list[tuple]) -> list[dict]:
        futures = [self.remote.remote(*call) for call in calls]
        return [_finish(call, record) for call, record in zip(calls, self.ray.get(futures), strict=True)]


def _finish(call: tuple, record: dict) -> dict:
    folder = Path(call[2])
    artifact = folder / ARTIFACT_DIR
    return {**record, "key": folder.name, **({"artifact": str(artifact)} if artifact.is_dir() else {})}


def _executor(use_ray: bool | None, address: str | None, workers: int):
    if use_ray is False:
        return _LocalExecutor(workers)
    try:
        import ray  # noqa: F401
    except ImportError:
        if use_ray or address:
            raise UsageError("Ray is not installed: pip install 'fxpress[search]', or run without --ray") from None
        return _LocalExecutor(workers)
    return _RayExecutor(address, workers)
