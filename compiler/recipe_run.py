"""``fxpress run RECIPE``: compile, measure against the gates, benchmark, and write the artifact.

The artifact is written only when every gate passes (or, with ``keep_failed``, under a name ending
in ``.failed``); its manifest records the recipe's text and SHA-256, its report the gates with
their measured values.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from compiler.gates import GateResult, evaluate, quality_metrics
from compiler.recipe import Recipe, recipe_recover_options, recipe_recover_seconds, recipe_target
from compiler.recipe_data import DataContext, load_labels, load_source

logger = logging.getLogger(__name__)

FAILED_SUFFIX = ".failed"
EVAL_BATCH = 32
CALIBRATION_BATCH = 32
DEFAULT_BENCH = {"batches": [1], "runs": 50, "warmup": 5}


@dataclasses.dataclass
class Prepared:
    """A recipe turned into what ``compile`` takes, with the evaluation data."""

    source: object  # compiler.cli.model_source.ModelSource
    target: object  # compiler.targets.Target
    compile_options: dict
    eager: torch.nn.Module  # the reference the artifact is measured against (behind pixel input if asked)
    eval_inputs: tuple[torch.Tensor, ...] | None
    labels: torch.Tensor | None


@dataclasses.dataclass
class RunResult:
    """What a run measured, and where its artifact went (None when a gate failed and nothing was kept)."""

    compiled: object  # compiler.compiled.CompiledModel
    metrics: dict
    gates: list[GateResult]
    latency: dict | None
    directory: Path | None

    @property
    def passed(self) -> bool:
        """Whether every gate passed."""
        return all(result.passed for result in self.gates)

    def to_dict(self) -> dict:
        """JSON-able summary: the verdict, every gate with its value, the metrics and latency medians."""
        medians = None if self.latency is None else {
            f"{item['runner']}@{item['batch']}": item["p50_ms"] for item in self.latency["results"]}
        return {"passed": self.passed, "artifact": None if self.directory is None else str(self.directory),
                "gates": [result.to_dict() for result in self.gates], "metrics": self.metrics,
                "latency_p50_ms": medians, "report": self.compiled.report.to_dict()}


def prepare(recipe: Recipe) -> Prepared:
    """Resolve the model, the target and the data; every fault is a UsageError naming its recipe key."""
    from compiler.input_format import PixelInput, parse_input_format

    source = _model(recipe)
    pixels = _pixel_format(recipe, source)
    context = DataContext(recipe, source.zoo_entry, pixels)
    target = recipe_target(recipe)
    compresses = recipe.get("prune") is not None or recipe.get("low_rank") is not None
    calibration = _calibration(recipe, context, target, compresses)
    train = _data(recipe, "train", context)
    options = {
        "calibration_data": calibration, "train_data": None if train is None else _batched(train, CALIBRATION_BATCH),
        "prune": recipe.get("prune"), "low_rank": recipe.get("low_rank"),
        "recover_seconds": recipe_recover_seconds(recipe), "recover": recipe_recover_options(recipe),
        "threads": recipe.get("compile.threads", "auto"), "strict": recipe.get("compile.strict", False),
        "input_format": pixels, "dynamic_dims": source.dynamic_dims, "model_name": source.name,
    }
    eval_inputs = _data(recipe, "evaluation", context, default_zoo=True)
    if pixels is not None:
        example = (eval_inputs[0][:1],) if eval_inputs is not None else _pixel_example(source, pixels)
        source = dataclasses.replace(source, example_inputs=example)
    eager = source.model if pixels is None else PixelInput(source.model, parse_input_format(pixels))
    if eval_inputs is None and recipe.gates:
        from compiler.errors import UsageError

        raise UsageError("recipe key data.evaluation: gates are measured on evaluation data; the model is not a "
                         "zoo model, so give a [data.evaluation] table (images, npy, npz, text or factory)")
    labels = None
    if eval_inputs is not None:
        table = recipe.get("data.evaluation") or {"zoo": True}
        labels = load_labels(table, context, eval_inputs[0].shape[0])
    return Prepared(source, target, options, eager, eval_inputs, labels)


def _model(recipe: Recipe):
    from compiler.cli import model_source

    spec = recipe.get("model.source")
    if ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
        path_text, factory = spec.rsplit(":", 1)
        spec = f"{recipe.resolve_path(path_text)}:{factory}"
    return model_source.resolve(spec)


def _pixel_format(recipe: Recipe, source) -> dict | None:
    table = recipe.get("compile.input_format")
    if table is None:
        return None
    zoo_format = getattr(source.zoo_entry, "input_format", None) or {}
    chosen = {"dtype": "uint8", "layout": "NCHW", **{k: v for k, v in zoo_format.items() if k in ("mean", "std")},
              **table}
    if "mean" not in chosen or "std" not in chosen:
        from compiler.errors import UsageError

        raise UsageError("recipe key compile.input_format: give mean and std (on the [0, 1] scale) for a model that "
                         "is not a zoo image model")
    return chosen


def _pixel_example(source, pixels: dict) -> tuple[torch.Tensor, ...]:
    channels, height, width = source.example_inputs[0].shape[1:]
    shape = (1, height, width, channels) if pixels["layout"] == "NHWC" else (1, channels, height, width)
    return (torch.zeros(shape, dtype=torch.uint8),)


def _data(recipe: Recipe, kind: str, context: DataContext, *, default_zoo: bool = False):
    table = recipe.get(f"data.{kind}")
    if table is None and default_zoo and context.zoo_entry is not None:
        table = {"zoo": True}
    return None if table is None else load_source(table, kind, context)


def _calibration(recipe: Recipe, context: DataContext, target, compresses: bool):
    calibrates = any(spec.name == "calibrate" for spec in target.pipeline)
    needed = calibrates or compresses
    tensors = _data(recipe, "calibration", context, default_zoo=needed)
    if tensors is None and needed:
        from compiler.errors import UsageError

        raise UsageError(f"recipe key data.calibration: target {target.name!r} "
                         f"{'calibrates' if calibrates else 'compresses the model'} and the model is not a zoo "
                         "model; give a [data.calibration] table (images, npy, npz, text or factory)")
    return None if tensors is None else _batched(tensors, CALIBRATION_BATCH)


def _batched(tensors: tuple[torch.Tensor, ...], size: int) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(tensor[start:start + size] for tensor in tensors) for start in range(0, tensors[0].shape[0], size)]


def compile_prepared(prepared: Prepared, progress: Callable[[str], None] | None = None, before_lowering=None):
    """Compile the prepared recipe (``before_lowering`` as in ``compile``)."""
    from compiler import api

    return api.compile(prepared.source.model, prepared.target, prepared.source.example_inputs,
                       progress=progress, before_lowering=before_lowering, **prepared.compile_options)


def measure(prepared: Prepared, run: Callable[..., object], *, classifier: bool | None = None) -> dict:
    """Quality metrics of ``run`` (the compiled model, or any callable) against the eager model."""
    actual, expected = [], []
    for start in range(0, prepared.eval_inputs[0].shape[0], EVAL_BATCH):
        chunk = tuple(tensor[start:start + EVAL_BATCH] for tensor in prepared.eval_inputs)
        with torch.no_grad():
            expected.append(_leaves(prepared.eager(*chunk)))
            actual.append(_leaves(run(*chunk)))
    joined = [tuple(torch.cat(parts) for parts in zip(*chunks, strict=True)) for chunks in (actual, expected)]
    return quality_metrics(*joined, prepared.labels, classifier=classifier)


def _leaves(outputs: object) -> tuple[torch.Tensor, ...]:
    return tuple(leaf for leaf in pytree.tree_leaves(outputs) if isinstance(leaf, torch.Tensor))


def _classifier(prepared: Prepared) -> bool | None:
    entry = prepared.source.zoo_entry
    return None if entry is None else entry.task == "classification"


def run_recipe(recipe: Recipe, output: Path, *, force: bool = False, keep_failed: bool = False,
               progress: Callable[[str], None] | None = None) -> RunResult:
    """Compile, measure the gates, benchmark; write the artifact if every gate passes (or ``keep_failed``)."""
    from compiler.artifact import check_destination

    check_destination(output, force)
    prepared = prepare(recipe)
    compiled = compile_prepared(prepared, progress)
    metrics = {} if prepared.eval_inputs is None else measure(prepared, compiled, classifier=_classifier(prepared))
    latency = benchmark(prepared, compiled, recipe)
    measured = {**metrics, **_latency_ratios(latency, recipe)}
    results = evaluate(list(recipe.gates), measured)
    _record(compiled, recipe, results, latency)
    passed = all(result.passed for result in results)
    directory = None
    if passed:
        directory = compiled.save(output, force=force)
    elif keep_failed:
        directory = compiled.save(output.with_name(output.name + FAILED_SUFFIX), force=True)
    return RunResult(compiled, measured, results, latency, directory)


def _record(compiled, recipe: Recipe, results: list[GateResult], latency: dict | None) -> None:
    compiled.manifest["recipe"] = {"sha256": recipe.sha256, "text": recipe.text}
    report = compiled.report
    report.gates = [result.to_dict() for result in results]
    if latency is not None:
        report.lowering["benchmark"] = latency  # with every timed run, for report.html's distributions


def benchmark(prepared: Prepared, compiled, recipe: Recipe) -> dict | None:
    """Latency of the artifact and of every baseline a latency gate names, timed side by side."""
    from compiler.cli.benchmark import peak_rss_mb
    from compiler.timing import ratios, time_side_by_side

    settings = {**DEFAULT_BENCH, **(recipe.get("bench") or {})}
    baselines = sorted({gate.baseline for gate in recipe.gates if gate.metric == "latency_ratio"})
    inputs_of = bench_inputs(prepared)
    results, comparisons, samples = [], [], {}
    fp32 = _fp32_session(prepared) if "fp32" in baselines else None
    for batch in settings["batches"]:
        inputs = inputs_of(batch)
        runners = _runners(prepared, compiled, inputs, baselines, fp32)
        stats = time_side_by_side(runners, batch, warmup=settings["warmup"], runs=settings["runs"])
        results += [item.to_dict() for item in stats]
        samples.update({f"{item.runner}@{batch}": item.samples_ms for item in stats})
        comparisons.append({"batch": batch, "speedup_vs": ratios(stats, "fxpress")})
    return {"model": prepared.source.name, "runs": settings["runs"], "warmup": settings["warmup"],
            "results": results, "comparisons": comparisons, "peak_rss_mb": peak_rss_mb(), "samples_ms": samples}


def bench_inputs(prepared: Prepared) -> Callable[[int], tuple[torch.Tensor, ...]]:
    """``batch -> inputs``: the evaluation samples (else the example) repeated to fill the batch."""
    pool = prepared.eval_inputs or prepared.source.example_inputs

    def inputs(batch: int) -> tuple[torch.Tensor, ...]:
        repeats = -(-batch // pool[0].shape[0])
        return tuple(tensor.repeat(repeats, *[1] * (tensor.dim() - 1))[:batch].contiguous() for tensor in pool)
    return inputs


def _runners(prepared: Prepared, compiled, inputs, baselines: list[str], fp32) -> dict[str, Callable[[], object]]:
    from backends.onnxruntime import make_session
    from compiler.cli.benchmark import plain_export

    compiled.check_inputs(inputs)
    runners = {"fxpress": session_runner(make_session(compiled.onnx, "all"), inputs)}
    if "eager" in baselines:
        def eager() -> object:
            with torch.no_grad():
                return prepared.eager(*inputs)
        runners["eager"] = eager
    if "export" in baselines:
        runners["export"] = session_runner(make_session(plain_export(prepared.eager, inputs), "all"), inputs)
    if fp32 is not None:
        runners["fp32"] = session_runner(fp32, inputs)
    return runners


def session_runner(session, inputs) -> Callable[[], object]:
    """A call of ``session`` on ``inputs``, fed once (what the timing loop repeats)."""
    feed = {spec.name: tensor.numpy() for spec, tensor in zip(session.get_inputs(), inputs, strict=True)}
    return lambda: session.run(None, feed)


def _fp32_session(prepared: Prepared):
    """An ONNX Runtime session of the same model compiled for cpu-fp32 (the fp32 artifact baseline)."""
    from backends.onnxruntime import make_session
    from compiler import api

    options = {key: prepared.compile_options[key] for key in ("input_format", "dynamic_dims", "model_name", "threads")}
    compiled = api.compile(prepared.source.model, "cpu-fp32", prepared.source.example_inputs, **options)
    return make_session(compiled.onnx, "all")


def _latency_ratios(latency: dict | None, recipe: Recipe) -> dict[str, float]:
    """``latency_ratio`` per baseline: the worst (largest) ratio of medians over the benched batches."""
    if latency is None:
        return {}
    by_key = {(item["runner"], item["batch"]): item["p50_ms"] for item in latency["results"]}
    ratios = {}
    for gate in recipe.gates:
        if gate.metric != "latency_ratio":
            continue
        values = [by_key[("fxpress", batch)] / by_key[(gate.baseline, batch)]
                  for runner, batch in by_key if runner == gate.baseline]
        ratios[gate.key] = max(values)
    return ratios
