"""Bisection: which pass, and which layers in it, make a compile fail its quality gates.

Step 1, pass level: the pipeline runs once as ``compile`` runs it, and the IR after capture and
after every pass is evaluated in PyTorch on the evaluation inputs (the IR after the quantisation
passes is their fake-quantised simulation) against the eager model's outputs. The guilty pass is
the first one after which a gate fails.

Step 2, layer level, inside the guilty pass's family:

* quantisation (``calibrate`` ... ``reconstruct``, judged as a whole): on the final IR, a layer
  (conv/linear, by module path) is put back in float by reading its weights from their float
  source (``meta.FLOAT_SOURCE``) and letting its output quantiser pass values through, as
  ``reconstruct``'s float run does: no recompile per layer. Each layer is first quantised alone
  (every other layer float); the layers that fail the gates alone are the answer when reverting
  them suffices. Otherwise layers are reverted in order of harm (the shortest prefix that passes,
  found by bisection), then every reverted layer the gates do not need is dropped. The patch keeps
  them in float (``float_modules``).
* pruning (``prune_channels``, ``sparsify_weights``) and low-rank factorisation (``low_rank``):
  each changed layer is protected alone by recompiling the passes up to the quantisation ones
  (with recovery, if asked for); a single layer whose protection passes is the answer, otherwise
  layers are protected in order of benefit as above. The patch protects them.

With ``verify_patch``, the model is compiled again with the patch and measured on the real
compiled model (ONNX Runtime). The float simulation of one layer is close to, not identical with,
what ``float_modules`` compiles (a float layer's input stays quantised where its producer runs on
integers; its output is quantised where integer layers read it, on its calibrated range), so the
verified metrics are the ones to trust.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from compiler import ir, meta
from compiler.capture import normalize_inputs
from compiler.errors import FxpressError, UsageError
from compiler.gates import Gate, GateResult, evaluate, quality_metrics
from compiler.input_format import PixelInput, parse_input_format
from compiler.pipeline import PipelineResult, run_pipeline
from compiler.pruning_options import compression_passes
from compiler.quant_ops import DEQUANTIZE_PER_CHANNEL, QUANTIZE_DEQUANTIZE
from compiler.quant_policy import FUSED_ACTIVATIONS, PASSTHROUGH, WEIGHTED
from compiler.recipe import to_toml
from compiler.targets import Target, get_target
from compiler.threads import compile_threads

logger = logging.getLogger(__name__)

#: Passes that refit each layer to the quantised layers before it: a broken layer's damage spreads past it.
COUPLING_PASSES = frozenset({"reconstruct"})
#: The last quantisation pass whose IR has every layer quantised on its own.
UNCOUPLED_AFTER = "insert_qdq"
#: Samples each layer's harm is measured on (for the order of the search); a layer failing there is re-measured
#: on every sample before it counts as failing alone.
HARM_SAMPLES = 128
#: Evaluation batch size (the IR and the compiled model run this many samples at a time).
EVAL_BATCH = 32
QUANTISATION_PASSES = frozenset({"smooth_quant", "cross_layer_equalization", "calibrate", "gptq", "quant_sensitivity",
                                 "bias_correction", "insert_qdq", "reconstruct"})
_FAMILIES = {"prune_channels": "pruning", "sparsify_weights": "pruning", "low_rank": "low_rank",
             **dict.fromkeys(QUANTISATION_PASSES, "quantisation")}


@dataclass
class PassRow:
    """The quality of the IR after one pass (index 0: as captured)."""

    index: int
    name: str
    modified: bool
    metrics: dict
    gates: list[GateResult]

    @property
    def passed(self) -> bool:
        """Whether every gate passes."""
        return all(result.passed for result in self.gates)

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {"index": self.index, "pass": self.name, "modified": self.modified, "metrics": self.metrics,
                "gates": [result.to_dict() for result in self.gates], "passed": self.passed}


@dataclass
class LayerHarm:
    """A layer's measured effect: the gates with only it changed (quantisation) or only it protected (others)."""

    module_path: str
    measured: str  # "quantised alone" (every other layer float) or "protected alone"
    metrics: dict
    passed: bool

    def to_dict(self) -> dict:
        """JSON-able form."""
        return dataclasses.asdict(self)


@dataclass
class BisectReport:
    """What :func:`bisect` found: the pass table, the guilty pass, the layers and the patch."""

    gates: list[Gate]
    samples: int
    passes: list[PassRow]
    verdict: str  # "nothing to bisect", "captured fails", "layers found", "no layer set passes", "pass only"
    message: str
    guilty_pass: str | None = None
    family: str | None = None
    layers: list[str] = field(default_factory=list)
    harms: list[LayerHarm] = field(default_factory=list)  # every candidate layer, most harmful first
    search: list[dict] = field(default_factory=list)  # each set tried: {"reverted", "metrics", "passed"}
    patch: dict = field(default_factory=dict)
    patched: dict | None = None  # the patched compile on ONNX Runtime: {"metrics", "gates", "passed"}
    ignored_gates: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def harm(self, module_path: str) -> LayerHarm | None:
        """The measured harm of one layer."""
        return next((harm for harm in self.harms if harm.module_path == module_path), None)

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {
            "gates": [str(gate) for gate in self.gates], "ignored_gates": self.ignored_gates, "samples": self.samples,
            "passes": [row.to_dict() for row in self.passes], "verdict": self.verdict, "message": self.message,
            "guilty_pass": self.guilty_pass, "family": self.family, "layers": self.layers,
            "harms": [harm.to_dict() for harm in self.harms], "search": self.search, "patch": self.patch,
            "patched": self.patched, "seconds": round(self.seconds, 2),
        }

    def render(self) -> str:
        """Human-readable: the pass table, the verdict, the layers, the patch as TOML, the patched compile."""
        lines = [f"bisect: {', '.join(map(str, self.gates))} on {self.samples} samples"]
        if self.ignored_gates:
            lines.append(f"  (not bisected: {', '.join(self.ignored_gates)})")
        lines += _table(self.gates, self.passes)
        lines += ["", self.message]
        if self.layers:
            lines.append(f"layers ({len(self.layers)}):")
            for path in self.layers:
                harm = self.harm(path)
                measured = f"  ({harm.measured}: {_values(self.gates, harm.metrics)})" if harm else ""
                lines.append(f"  {path}{measured}")
        if self.patch:
            lines += ["", "patch (recipe):", to_toml(self.patch).rstrip()]
        if self.patched is not None:
            verdict = "PASS" if self.patched["passed"] else "FAIL"
            lines += ["", f"patched compile (ONNX Runtime): {verdict}  {_values(self.gates, self.patched['metrics'])}"]
        return "\n".join(lines)


def bisect(model: torch.nn.Module, target: str | Target, example_inputs: object, *, eval_inputs: object,
           gates: list[Gate], labels: torch.Tensor | None = None, calibration_data: object = None,
           prune: dict | None = None, low_rank: dict | None = None, train_data: object = None,
           recover_seconds: float = 0.0, recover: dict | None = None, dynamic_dims=None,
           input_format: dict | None = None, threads: int | str = "auto", verify_patch: bool = True,
           progress: Callable[[str], None] | None = None) -> BisectReport:
    """Find the pass, and the layers in it, that make ``model`` fail ``gates`` when compiled for ``target``.

    Args (those of ``compile`` keep their meaning there):
        eval_inputs: a tensor or tuple of tensors, batch first, to evaluate on (the model's input format).
        gates: :class:`compiler.gates.Gate` s; ``latency_ratio`` gates are not bisected (logged).
        labels: the evaluation labels, for ``accuracy_drop``.
        verify_patch: compile again with the patch and measure the gates on ONNX Runtime.
        progress: called with a line as each step finishes.

    Raises:
        UsageError: no quality gate, evaluation inputs of unequal batch sizes, or a gate whose metric
            cannot be measured on these outputs (top-1 of a non-classifier, accuracy without labels).
    """
    started = time.perf_counter()
    quality, ignored = _quality_gates(gates)
    options = _Options(model, get_target(target), example_inputs, calibration_data, prune, low_rank, train_data,
                       recover_seconds, recover, dynamic_dims, input_format, threads)
    say = progress or (lambda line: None)
    with compile_threads(threads):
        evaluator = _Evaluator(options.eager_model(), quality, normalize_inputs(eval_inputs), labels,
                               1 if dynamic_dims == {} else EVAL_BATCH)
        report, run = _pass_level(options, evaluator, say)
        report.ignored_gates = ignored
        if report.verdict == "pass only":
            _layer_level(report, run, options, evaluator, say)
    if verify_patch and report.patch:
        report.patched = _verify(report.patch, options, evaluator)
        say(f"patched compile: {'PASS' if report.patched['passed'] else 'FAIL'}")
    report.seconds = time.perf_counter() - started
    return report


# --------------------------------------------------------------------------------------------
# Arguments and evaluation


@dataclass
class _Options:
    """``compile``'s arguments, for the first run, the protected re-runs and the patched compile."""

    model: torch.nn.Module
    target: Target
    example_inputs: object
    calibration_data: object
    prune: dict | None
    low_rank: dict | None
    train_data: object
    recover_seconds: float
    recover: dict | None
    dynamic_dims: object
    input_format: dict | None
    threads: int | str

    def eager_model(self) -> torch.nn.Module:
        """The model as compiled: wrapped to take 8-bit pixels when ``input_format`` says so."""
        pixel_format = parse_input_format(self.input_format)
        return self.model if pixel_format is None else PixelInput(self.model, pixel_format)

    def extra_passes(self, prune: dict | None = None, low_rank: dict | None = None) -> tuple:
        """The compression passes (with ``prune`` and ``low_rank`` replacing the given ones if set)."""
        return compression_passes(prune or self.prune, low_rank or self.low_rank, self.recover_seconds, self.recover)

    def pipeline(self, target: Target, extra: tuple, after_pass=None) -> PipelineResult:
        """Capture and run ``target``'s passes as ``compile`` does, without lowering."""
        calibration = self.calibration_data
        if extra and calibration is None and self.train_data is not None:
            calibration = self.train_data
        return run_pipeline(self.eager_model(), target, self.example_inputs, calibration_data=calibration,
                            dynamic_dims=self.dynamic_dims, train_data=self.train_data, extra_passes=extra,
                            after_pass=after_pass)


class _Evaluator:
    """Runs callables on the evaluation inputs in batches and measures the gates against eager."""

    def __init__(self, model: torch.nn.Module, gates: list[Gate], inputs: tuple[torch.Tensor, ...],
                 labels: torch.Tensor | None, batch: int):
        sizes = {tensor.shape[0] for tensor in inputs if tensor.dim()}
        if len(sizes) != 1:
            raise UsageError(f"eval_inputs must share one batch size (dimension 0), got sizes {sorted(sizes)}")
        self.gates, self.inputs, self.labels, self.batch = gates, inputs, labels, batch
        self.samples = sizes.pop()
        self.reference = self.run(model)

    def run(self, function: Callable) -> tuple[torch.Tensor, ...]:
        """``function``'s tensor outputs on every evaluation sample, concatenated."""
        parts = []
        with torch.no_grad():
            for start in range(0, self.samples, self.batch):
                outputs = function(*(tensor[start:start + self.batch] for tensor in self.inputs))
                parts.append([leaf for leaf in pytree.tree_leaves(outputs) if isinstance(leaf, torch.Tensor)])
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))

    def first(self, count: int) -> _Evaluator:
        """The same evaluation on the first ``count`` samples only (itself when it has no more)."""
        if count >= self.samples:
            return self
        subset = copy.copy(self)
        subset.samples = count
        subset.inputs = tuple(tensor[:count] for tensor in self.inputs)
        subset.reference = tuple(tensor[:count] for tensor in self.reference)
        subset.labels = None if self.labels is None else self.labels.reshape(-1)[:count]
        return subset

    def measure(self, function: Callable) -> tuple[dict, list[GateResult]]:
        """Every quality metric of ``function`` against eager, and the gates' verdicts."""
        metrics = quality_metrics(self.run(function), self.reference, self.labels)
        return metrics, evaluate(self.gates, metrics)


def _quality_gates(gates: list[Gate]) -> tuple[list[Gate], list[str]]:
    if not gates or not all(isinstance(gate, Gate) for gate in gates):
        raise UsageError(f"gates must be a non-empty list of compiler.gates.Gate (parse_gate), got {gates!r}")
    ignored = [str(gate) for gate in gates if gate.metric == "latency_ratio"]
    if ignored:
        logger.info("bisect: latency gates are not bisected: %s", ", ".join(ignored))
    quality = [gate for gate in gates if gate.metric != "latency_ratio"]
    if not quality:
        raise UsageError("bisect needs a quality gate (top1_agreement, cosine_mean, cosine_min, sqnr_db, "
                         f"accuracy_drop); got only {', '.join(ignored)}")
    return quality, ignored


# --------------------------------------------------------------------------------------------
# Step 1: the pass level


def _pass_level(options: _Options, evaluator: _Evaluator, say) -> tuple[BisectReport, _Run]:
    """Run the pipeline once, measuring the IR after capture and after every pass; name the first that fails."""
    rows: list[PassRow] = []
    snapshots: dict[str, fx.GraphModule] = {}

    def after_pass(index: int, name: str, gm: fx.GraphModule, modified: bool) -> None:
        if rows and not modified:  # the same graph computes the same outputs
            metrics, results = rows[-1].metrics, rows[-1].gates
        else:
            metrics, results = evaluator.measure(gm)
        rows.append(PassRow(index, name, modified, metrics, results))
        if name == UNCOUPLED_AFTER:
            with warnings.catch_warnings():  # torch's pytree deprecation, raised while copying the codegen
                warnings.simplefilter("ignore", FutureWarning)
                snapshots[name] = copy.deepcopy(gm)
        say(f"{index:2d} {name}: {'pass' if rows[-1].passed else 'FAIL'}")

    result = options.pipeline(options.target, options.extra_passes(), after_pass)
    report = BisectReport(evaluator.gates, evaluator.samples, rows, "", "")
    failed = next((row for row in rows if not row.passed), None)
    if failed is None:
        report.verdict, report.message = "nothing to bisect", "the final IR passes every gate: nothing to bisect"
    elif failed.index == 0:
        report.verdict = "captured fails"
        report.message = ("the captured IR already fails the gates (before any pass): no pass is to blame; "
                          "the gate asks for more than the model as captured gives")
    else:
        report.verdict, report.guilty_pass = "pass only", failed.name
        report.family = _FAMILIES.get(failed.name)
        report.message = f"the gates first fail after pass {failed.index} {failed.name!r}"
    uncoupled = snapshots.get(UNCOUPLED_AFTER) if rows[-1].name in COUPLING_PASSES else None
    return report, _Run(result, uncoupled or result.graph_module)


@dataclass
class _Run:
    """The pipeline's result and the quantised IR whose layers are independent (before any coupling pass)."""

    result: PipelineResult
    uncoupled: fx.GraphModule


# --------------------------------------------------------------------------------------------
# Step 2: the layer level


def _layer_level(report: BisectReport, run: _Run, options: _Options, evaluator: _Evaluator, say) -> None:
    """Find the layers inside the guilty pass's family and the patch that spares them."""
    result = run.result
    if report.family == "quantisation":
        report.harms, check, searched = _quantisation_harms(run, evaluator, say)
        report.message += (f" (the quantisation as a whole)\neach layer quantised alone on the IR after "
                           f"{UNCOUPLED_AFTER} (every other layer float); sets of float layers tried on {searched}")
    elif report.family in ("pruning", "low_rank"):
        check = _protected_check(report.family, report.guilty_pass, options, evaluator)
        changed = _changed_layers(result, report.guilty_pass)
        report.harms = _harm_protected_alone(changed, check, evaluator.gates[0], say)
        report.message += f" ({report.family})\neach changed layer protected alone, recompiling up to quantisation"
    else:
        report.message += "\nit is not a quantisation, pruning or low-rank pass, so no layer is bisected"
        return
    if not report.harms:
        report.message += f"\nit changed no layer that {report.family} could spare"
        return
    chosen = _search(report.harms, check, report.search, say)
    if chosen is None:
        report.verdict = "no layer set passes"
        report.message += (f"\neven sparing all {len(report.harms)} layers from {report.family} does not pass the "
                           "gates (ops other than conv/linear, or the rest of the pipeline, fail them)")
        return
    report.verdict, report.layers = "layers found", chosen
    report.patch = _patch(report.family, chosen, options)
    report.message += f"\nsparing {len(chosen)} layer(s) from {report.family} passes the gates"


def _quantisation_harms(run: _Run, evaluator: _Evaluator, say) -> tuple[list[LayerHarm], Callable, str]:
    """Each layer's harm quantised alone on the uncoupled IR, and the check the search should use.

    Returns the harms, the check and which IR it runs on. A layer that fails the gates alone is
    broken by itself: the search then runs on the uncoupled IR, where the layers after it were not
    refitted to its damage. Otherwise the error is the sum of many layers, and the search runs on
    the final IR, with the refits a recompile would make. (Searching the final IR when a layer
    fails alone was tried on EfficientNet-Lite0: putting a layer back in float there leaves the
    layers after it refitted to its quantised output, so sparing 23 layers still failed where the
    IR after insert_qdq found 3 whose float fallback, compiled, passes.)
    """
    uncoupled = _QuantLayers(run.uncoupled)
    harms = _harm_quantised_alone(uncoupled.paths, uncoupled, evaluator, evaluator.gates[0], say)
    if run.uncoupled is run.result.graph_module:
        return harms, lambda floats: evaluator.measure(uncoupled.runner(floats)), "the final IR"
    if any(not harm.passed for harm in harms):
        return harms, lambda floats: evaluator.measure(uncoupled.runner(floats)), f"the IR after {UNCOUPLED_AFTER}"
    final = _QuantLayers(run.result.graph_module)
    return harms, lambda floats: evaluator.measure(final.runner(floats)), "the final IR"


def _harm_quantised_alone(paths: list[str], layers: _QuantLayers, evaluator: _Evaluator, gate: Gate,
                          say) -> list[LayerHarm]:
    """Each layer quantised alone (every other one float), most harmful first.

    Measured on ``evaluator``'s first :data:`HARM_SAMPLES` samples; a layer that fails there is
    measured again on all of them, so "fails alone" holds on the whole evaluation set.
    """
    harms, sample = [], evaluator.first(HARM_SAMPLES)
    for path in paths:
        metrics, results = sample.measure(layers.runner(frozenset(paths) - {path}))
        if sample is not evaluator and not all(result.passed for result in results):
            metrics, results = evaluator.measure(layers.runner(frozenset(paths) - {path}))
        harms.append(LayerHarm(path, "quantised alone", metrics, all(result.passed for result in results)))
        say(f"layer {path} alone: {'pass' if harms[-1].passed else 'FAIL'}")
    return sorted(harms, key=lambda harm: _badness(harm, gate), reverse=True)


def _harm_protected_alone(paths: list[str], check, gate: Gate, say) -> list[LayerHarm]:
    """Each layer protected alone, the one whose protection helps most first."""
    harms = []
    for path in paths:
        metrics, results = check(frozenset({path}))
        harms.append(LayerHarm(path, "protected alone", metrics, all(result.passed for result in results)))
        say(f"layer {path} protected: {'pass' if harms[-1].passed else 'FAIL'}")
    return sorted(harms, key=lambda harm: _badness(harm, gate))


def _badness(harm: LayerHarm, gate: Gate) -> tuple:
    """Order key: failed gates, then how far ``gate``'s metric is on its bad side, then SQNR (lower: worse)."""
    value = harm.metrics.get(gate.metric)
    value = float("inf") if value is None else value
    sqnr = harm.metrics.get("sqnr_db")
    return (not harm.passed, -value if gate.comparison == ">=" else value,
            -(float("inf") if sqnr is None else sqnr))


def _search(harms: list[LayerHarm], check, steps: list[dict], say) -> list[str] | None:
    """The layers to spare: those failing alone if that suffices, else the shortest passing prefix of ``harms``, pruned.

    ``check(set of spared layers)`` measures the gates. None when sparing every layer still fails.
    """
    def passes(spared: frozenset) -> bool:
        metrics, results = check(spared)
        passed = all(result.passed for result in results)
        steps.append({"spared": sorted(spared), "metrics": metrics, "passed": passed})
        say(f"sparing {len(spared)} layer(s): {'pass' if passed else 'FAIL'}")
        return passed

    order = [harm.module_path for harm in harms]
    failing = [harm.module_path for harm in harms if not harm.passed and harm.measured == "quantised alone"]
    winners = [harm.module_path for harm in harms if harm.passed and harm.measured == "protected alone"]
    if winners:  # protecting one layer suffices: the most helpful one
        return winners[:1]
    if len(failing) == 1 and passes(frozenset(failing)):
        return failing
    if not passes(frozenset(order)):
        return None
    low, high = max(len(failing), 1), len(order)  # the prefix of length ``high`` passes
    while low < high:
        middle = (low + high) // 2
        if passes(frozenset(order[:middle])):
            high = middle
        else:
            low = middle + 1
    chosen = order[:high]
    for path in reversed(order[:high]):  # the least harmful first: drop what the gates do not need
        if len(chosen) > 1 and passes(frozenset(chosen) - {path}):
            chosen.remove(path)
    return chosen


# --------------------------------------------------------------------------------------------
# Quantisation: layers put back in float on the final IR


class _QuantLayers:
    """The quantised conv/linear layers of a fake-quantised IR, and how to run it with some of them float.

    A float layer reads its weights and bias from their float sources and its output quantiser
    (after its fused activation) passes values through; a quantiser no layer writes (the model
    input, an add's output) passes values through when every layer reading it is float.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.float_sources: dict[str, dict[fx.Node, str]] = {}
        for node in ir.call_nodes(gm):
            if ir.op_name(node) in WEIGHTED and (sources := _float_sources(node)):
                self.float_sources.setdefault(ir.module_path(node) or node.name, {}).update(sources)
        self.paths = list(self.float_sources)
        self.quantisers = {node: _quantiser_owners(node, set(self.paths))
                           for node in gm.graph.nodes if node.target is QUANTIZE_DEQUANTIZE}

    def runner(self, floats: frozenset[str]) -> Callable:
        """A callable running the IR with the layers at ``floats`` in float."""
        substitutes = {node: ir.get_attribute(self.gm, source) for path in floats
                       for node, source in self.float_sources[path].items()}
        bypass = {node for node, owners in self.quantisers.items() if _all_float(owners, floats)}
        return lambda *inputs: _FloatSetInterpreter(self.gm, substitutes, bypass).run(*inputs)


def _all_float(owners: tuple[str | None, frozenset[str] | None], floats: frozenset[str]) -> bool:
    """Whether a quantiser passes values through: its writer is float, or (none writing it) all its readers are."""
    writer, readers = owners
    if writer is not None:
        return writer in floats
    return readers is not None and readers <= floats


class _FloatSetInterpreter(fx.Interpreter):
    """Runs the IR with some nodes replaced by constants and some quantisers passing values through."""

    def __init__(self, gm: fx.GraphModule, substitutes: dict[fx.Node, torch.Tensor], bypass: set[fx.Node]):
        super().__init__(gm)
        self.substitutes, self.bypass = substitutes, bypass

    def run_node(self, node: fx.Node) -> object:
        """The node's value: its float substitute, its input (a bypassed quantiser) or its own result."""
        if node in self.substitutes:
            return self.substitutes[node]
        if node in self.bypass:
            return self.env[node.args[0]]
        return super().run_node(node)


def _float_sources(op: fx.Node) -> dict[fx.Node, str]:
    """The op's dequantised weight and bias with the float tensors they stand for."""
    arguments = [op.args[WEIGHTED[ir.op_name(op)][1]], op.args[2] if len(op.args) > 2 else op.kwargs.get("bias")]
    return {arg: arg.meta[meta.FLOAT_SOURCE] for arg in arguments
            if isinstance(arg, fx.Node) and arg.target is DEQUANTIZE_PER_CHANNEL and meta.FLOAT_SOURCE in arg.meta}


def _quantiser_owners(quantiser: fx.Node, layers: set[str]) -> tuple[str | None, frozenset[str] | None]:
    """(the layer writing the quantised tensor, or None; the layers reading it, or None if any reader is no layer)."""
    source = quantiser.args[0]
    if isinstance(source, fx.Node) and ir.op_name(source) in FUSED_ACTIVATIONS and isinstance(source.args[0], fx.Node):
        source = source.args[0]
    writer = ir.module_path(source) or source.name if isinstance(source, fx.Node) else None
    if writer in layers and ir.op_name(source) in WEIGHTED:
        return writer, None
    readers, pending = set(), list(quantiser.users)
    while pending:
        user = pending.pop()
        if ir.op_name(user) in PASSTHROUGH:
            pending.extend(user.users)
        elif (path := ir.module_path(user) or user.name) in layers and ir.op_name(user) in WEIGHTED:
            readers.add(path)
        else:
            return None, None
    return None, frozenset(readers) if readers else None


# --------------------------------------------------------------------------------------------
# Pruning and low rank: layers protected by recompiling


def _changed_layers(result: PipelineResult, pass_name: str) -> list[str]:
    """The module paths the compression pass changed, from its ledger entry."""
    entry = next(entry for entry in result.ledger.entries if entry.name == pass_name)
    if pass_name == "prune_channels":
        return [path for path in entry.stats.get("widths", {}) if path != "<root>"]
    if pass_name == "low_rank":
        return [row["module"] for row in entry.stats.get("layers", {}).values() if row.get("module")]
    rows = entry.stats.get("layers", [])
    return [row["module_path"] for row in rows if isinstance(row, dict) and row.get("module_path")]


def _protected_check(family: str, pass_name: str, options: _Options, evaluator: _Evaluator) -> Callable:
    """``check(protected paths)``: the gates on the IR after the compression passes with those layers protected."""
    pipeline = options.target.pipeline
    first_quant = next((i for i, spec in enumerate(pipeline) if spec.name in QUANTISATION_PASSES), len(pipeline))
    float_target = dataclasses.replace(options.target, pipeline=pipeline[:first_quant])

    def check(protected: frozenset) -> tuple[dict, list[GateResult]]:
        prune, low_rank = _protected_options(family, sorted(protected), options)
        try:
            result = options.pipeline(float_target, options.extra_passes(prune, low_rank))
        except FxpressError as error:  # e.g. a budget the unprotected layers cannot meet
            logger.info("bisect: protecting %s fails to compile: %s", sorted(protected), error)
            return {"error": str(error)}, [GateResult(gate, float("nan")) for gate in evaluator.gates]
        return evaluator.measure(result.graph_module)

    return check


def _protected_options(family: str, paths: list[str], options: _Options) -> tuple[dict | None, dict | None]:
    """The ``prune`` and ``low_rank`` arguments with ``paths`` added to the family's ``protect``."""
    given = dict(options.prune or {}) if family == "pruning" else dict(options.low_rank or {})
    given["protect"] = [*given.get("protect", []), *(path for path in paths if path not in given.get("protect", []))]
    return (given, None) if family == "pruning" else (None, given)


# --------------------------------------------------------------------------------------------
# The patch


def _patch(family: str, layers: list[str], options: _Options) -> dict:
    """The recipe patch sparing ``layers`` (the patterns already given kept, so it replaces them)."""
    if family == "quantisation":
        given = list(options.target.quant_policy.get("float_modules", []))
        return {"compile": {"float_modules": given + [path for path in layers if path not in given]}}
    prune, low_rank = _protected_options(family, layers, options)
    key, chosen = ("prune", prune) if family == "pruning" else ("low_rank", low_rank)
    return {key: {"protect": chosen["protect"]}}


def _verify(patch: dict, options: _Options, evaluator: _Evaluator) -> dict:
    """Compile with the patch applied and measure the gates on ONNX Runtime."""
    from compiler.api import compile as compile_model

    target, prune, low_rank = options.target, options.prune, options.low_rank
    if "compile" in patch:
        policy = {**target.quant_policy, "float_modules": patch["compile"]["float_modules"]}
        target = dataclasses.replace(target, quant_policy=policy)
    if "prune" in patch:
        prune = {**prune, **patch["prune"]}
    if "low_rank" in patch:
        low_rank = {**low_rank, **patch["low_rank"]}
    compiled = compile_model(options.model, target, options.example_inputs, options.calibration_data,
                             dynamic_dims=options.dynamic_dims, prune=prune, low_rank=low_rank,
                             train_data=options.train_data, recover_seconds=options.recover_seconds,
                             recover=options.recover, threads=options.threads, input_format=options.input_format)
    metrics, results = evaluator.measure(compiled)
    return {"metrics": metrics, "gates": [result.to_dict() for result in results],
            "passed": all(result.passed for result in results)}


# --------------------------------------------------------------------------------------------
# Rendering


def _columns(gates: list[Gate]) -> list[str]:
    metrics = list(dict.fromkeys(gate.metric for gate in gates))
    return metrics + [name for name in ("sqnr_db",) if name not in metrics]


def _number(value: float | None) -> str:
    return "inf" if value is None else f"{value:.4f}"


def _values(gates: list[Gate], metrics: dict) -> str:
    return ", ".join(f"{name} {_number(metrics.get(name))}" for name in _columns(gates))


def _table(gates: list[Gate], rows: list[PassRow]) -> list[str]:
    columns = _columns(gates)
    width = max([len(row.name) for row in rows] + [4])
    lines = ["  " + " " * 3 + "pass".ljust(width) + "".join(f"  {name:>15}" for name in columns) + "  verdict"]
    for row in rows:
        cells = "".join(f"  {_number(row.metrics.get(name)):>15}" for name in columns)
        note = "" if row.modified else "  (unchanged)"
        lines.append(f"  {row.index:2d} {row.name.ljust(width)}{cells}  {'pass' if row.passed else 'FAIL'}{note}")
    return lines
