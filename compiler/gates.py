"""Accuracy and speed gates: ``top1_agreement >= 0.97``, ``latency_ratio <= 1.0 vs fp32``.

A gate is a metric, a comparison and a threshold. Quality metrics compare the compiled model's
outputs with the original's on evaluation data (:func:`quality_metrics`); ``latency_ratio`` is the
compiled model's median latency over a named baseline's, timed side by side. A pipeline declares
gates in its recipe or on the command line; a failed gate fails the run (exit 6).
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch

from compiler import probe
from compiler.errors import UsageError

#: What each metric measures; ``higher`` says which direction is better.
METRICS = {
    "top1_agreement": {"higher": True, "doc": "share of samples whose top-1 class equals the original's"},
    "cosine_mean": {"higher": True, "doc": "mean per-sample cosine similarity to the original's outputs"},
    "cosine_min": {"higher": True, "doc": "lowest per-sample cosine similarity to the original's outputs"},
    "sqnr_db": {"higher": True, "doc": "signal-to-quantisation-noise ratio of all outputs, in dB"},
    "accuracy_drop": {"higher": False, "doc": "original's accuracy minus the compiled model's, in points (labels)"},
    "latency_ratio": {"higher": False, "doc": "compiled median latency over the baseline's, side by side"},
}
#: The metrics measured on outputs (every metric but the latency ratio).
QUALITY_METRICS = tuple(name for name in METRICS if name != "latency_ratio")
#: What ``latency_ratio`` may be measured against.
BASELINES = ("eager", "export", "fp32")
_COMPARISONS = (">=", "<=")
_PATTERN = re.compile(r"^\s*([a-z0-9_]+)\s*(>=|<=|>|<|==|=)?\s*(\S+)?\s*(?:vs\s+(\S+))?\s*$")


@dataclasses.dataclass(frozen=True)
class Gate:
    """``metric comparison threshold`` (``latency_ratio`` also names its baseline)."""

    metric: str
    comparison: str
    threshold: float
    baseline: str | None = None

    @property
    def key(self) -> str:
        """The name its value is measured under: the metric, and for latency also the baseline."""
        return f"{self.metric} vs {self.baseline}" if self.baseline else self.metric

    def passes(self, value: float | None) -> bool:
        """True when ``value`` satisfies the gate (an infinite SQNR, ``None``, passes any floor)."""
        if value is None:
            return self.metric == "sqnr_db" and self.comparison == ">="
        if math.isnan(value):
            return False
        return value >= self.threshold if self.comparison == ">=" else value <= self.threshold

    def loosened(self, margin: float) -> Gate:
        """The same gate with its threshold moved ``margin`` towards passing."""
        step = -margin if self.comparison == ">=" else margin
        return dataclasses.replace(self, threshold=self.threshold + step)

    def __str__(self) -> str:
        suffix = f" vs {self.baseline}" if self.baseline else ""
        return f"{self.metric} {self.comparison} {self.threshold:g}{suffix}"

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {"metric": self.metric, "comparison": self.comparison, "threshold": self.threshold,
                "baseline": self.baseline}


@dataclasses.dataclass(frozen=True)
class GateResult:
    """A gate with the value measured for it."""

    gate: Gate
    value: float | None

    @property
    def passed(self) -> bool:
        """Whether the measured value satisfies the gate."""
        return self.gate.passes(self.value)

    def to_dict(self) -> dict:
        """JSON-able form: the gate, its measured value and the verdict."""
        return {"gate": str(self.gate), **self.gate.to_dict(), "value": self.value, "passed": self.passed}


def parse_gate(text: str, *, where: str = "gate") -> Gate:
    """``"top1_agreement >= 0.97"`` or ``"latency_ratio <= 1.0 vs fp32"`` as a :class:`Gate`.

    Raises:
        UsageError: naming ``where`` and what is wrong (unknown metric, comparison or baseline).
    """
    match = _PATTERN.match(text) if isinstance(text, str) else None
    if match is None:
        raise UsageError(f"{where}: expected 'METRIC >= NUMBER' or 'METRIC <= NUMBER', got {text!r}")
    metric, comparison, number, baseline = match.groups()
    if metric not in METRICS:
        raise UsageError(f"{where}: unknown metric {metric!r}{_suggest(metric, METRICS)}; "
                         f"known: {', '.join(METRICS)}")
    if comparison not in _COMPARISONS or number is None:
        raise UsageError(f"{where}: {text!r} needs '>=' or '<=' and a number, e.g. '{metric} "
                         f"{'>=' if METRICS[metric]['higher'] else '<='} {_example(metric)}'")
    try:
        threshold = float(number)
    except ValueError:
        raise UsageError(f"{where}: {number!r} in {text!r} is not a number") from None
    if not math.isfinite(threshold):
        raise UsageError(f"{where}: the threshold of {text!r} must be finite")
    return Gate(metric, comparison, threshold, _baseline(metric, baseline, where))


def _baseline(metric: str, baseline: str | None, where: str) -> str | None:
    if metric != "latency_ratio":
        if baseline is not None:
            raise UsageError(f"{where}: only latency_ratio takes 'vs BASELINE', not {metric}")
        return None
    chosen = baseline or "export"
    if chosen not in BASELINES:
        raise UsageError(f"{where}: unknown latency baseline {chosen!r}{_suggest(chosen, BASELINES)}; "
                         f"known: {', '.join(BASELINES)}")
    return chosen


def _example(metric: str) -> str:
    return {"top1_agreement": "0.97", "cosine_mean": "0.99", "cosine_min": "0.97", "sqnr_db": "30",
            "accuracy_drop": "0.5", "latency_ratio": "1.0"}[metric]


def _suggest(word: str, known) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def quality_metrics(actual: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...],
                    labels: torch.Tensor | None = None, *, classifier: bool | None = None) -> dict[str, float | None]:
    """Every quality metric of ``actual`` against ``expected`` (tuples of output tensors, batch first).

    ``top1_agreement`` (and ``accuracy_drop`` with ``labels``) where the first output is a
    ``(batch, classes)`` score matrix, or as ``classifier`` says.
    """
    drift = probe.drift(actual, expected)
    cosines = per_sample_cosine(actual, expected)
    metrics: dict[str, float | None] = {"sqnr_db": drift.sqnr_db, "cosine_mean": float(cosines.mean()),
                                        "cosine_min": float(cosines.min()), "samples": int(cosines.numel())}
    first, reference = actual[0], expected[0]
    if classifier if classifier is not None else (reference.dim() == 2 and reference.shape[1] > 1):
        metrics["top1_agreement"] = float((first.argmax(1) == reference.argmax(1)).double().mean())
        if labels is not None:
            labels = labels.reshape(-1)[: reference.shape[0]]
            eager = float((reference.argmax(1) == labels).double().mean())
            compiled = float((first.argmax(1) == labels).double().mean())
            metrics.update(accuracy_original=eager, accuracy_compiled=compiled,
                           accuracy_drop=100.0 * (eager - compiled))
    return metrics


def per_sample_cosine(actual: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Cosine similarity per sample, over all floating outputs of that sample, in float64."""
    def rows(tensors):
        parts = [t.detach().reshape(t.shape[0], -1).double() for t in tensors if t.is_floating_point()]
        return torch.cat(parts, dim=1)

    left, right = rows(actual), rows(expected)
    norms = left.norm(dim=1) * right.norm(dim=1)
    cosine = (left * right).sum(dim=1) / norms.clamp_min(1e-300)
    return torch.where(norms > 0, cosine, (left == right).all(dim=1).double())


def evaluate(gates: list[Gate], measured: dict[str, float | None]) -> list[GateResult]:
    """Each gate with its measured value.

    Raises:
        UsageError: a gate asks for a metric the run could not measure (top-1 of a non-classifier,
            accuracy without labels).
    """
    results = []
    for gate in gates:
        if gate.key not in measured:
            raise UsageError(f"gate {gate}: {gate.metric} cannot be measured here "
                             f"({_why_missing(gate.metric)}); measured: {', '.join(sorted(measured))}")
        results.append(GateResult(gate, measured[gate.key]))
    return results


def _why_missing(metric: str) -> str:
    return {"top1_agreement": "the first output is not a (batch, classes) score matrix",
            "accuracy_drop": "the evaluation data have no labels",
            "latency_ratio": "no latency was measured"}.get(metric, "not measured")

