"""Verifying an artifact against its eager original on evaluation data.

Reports max abs diff, cosine, SQNR, top-1 agreement for classifiers and true accuracy where the
data are labelled, and whether the artifact is within its target's tolerance.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from compiler import probe
from compiler.cli.workload import Workload
from compiler.errors import UsageError


def _flat(outputs: object) -> tuple[torch.Tensor, ...]:
    return tuple(leaf for leaf in pytree.tree_leaves(outputs) if isinstance(leaf, torch.Tensor))


def _run_both(workload: Workload, samples: int, batch_size: int) -> tuple[list, list]:
    data = workload.inputs(samples)
    eager, compiled = [], []
    for start in range(0, samples, batch_size):
        chunk = tuple(tensor[start:start + batch_size] for tensor in data)
        with torch.no_grad():
            eager.append(_flat(workload.source.model(*chunk)))
        compiled.append(_flat(workload.compiled(*chunk)))
    return eager, compiled


def _concatenate(chunks: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.cat(parts) for parts in zip(*chunks, strict=True))


def verify(workload: Workload, *, samples: int = 64, batch_size: int = 16) -> dict:
    """Compare the artifact with the eager model on ``samples`` evaluation inputs."""
    if workload.source is None:
        raise UsageError("verify needs the original model: pass --model NAME (a zoo name or file.py:factory)")
    eager_chunks, compiled_chunks = _run_both(workload, samples, batch_size)
    eager, compiled = _concatenate(eager_chunks), _concatenate(compiled_chunks)
    drift = probe.drift(compiled, eager)
    tolerance = workload.compiled.manifest["target"]["tolerance"]
    min_cosine = _min_sample_cosine(compiled[0], eager[0])
    if tolerance.get("min_cosine") is not None:  # a quantised target: judged by per-sample cosine
        within = min_cosine >= tolerance["min_cosine"]
    else:
        within = probe.within_tolerance(compiled, eager, tolerance["rtol"], tolerance["atol"])
    report = {
        "model": workload.name, "samples": samples, "target": workload.compiled.manifest["target"]["name"],
        **drift.to_dict(), "min_sample_cosine": min_cosine, "tolerance": tolerance, "within_tolerance": within,
    }
    report.update(_classification(workload, compiled[0], eager[0], samples))
    return report


def _min_sample_cosine(actual: torch.Tensor, expected: torch.Tensor) -> float:
    rows_actual = actual.reshape(actual.shape[0], -1).double()
    rows_expected = expected.reshape(expected.shape[0], -1).double()
    return float(torch.nn.functional.cosine_similarity(rows_actual, rows_expected, dim=1).min())


def _classification(workload: Workload, actual: torch.Tensor, expected: torch.Tensor, samples: int) -> dict:
    entry = workload.source.zoo_entry
    if entry is None or entry.task != "classification":
        return {}
    record = {"top1_agreement": float((actual.argmax(1) == expected.argmax(1)).double().mean())}
    labels = entry.eval_labels(samples)
    if labels is not None:
        record["accuracy_eager"] = float((expected.argmax(1) == labels).double().mean())
        record["accuracy_compiled"] = float((actual.argmax(1) == labels).double().mean())
    return record


def render_verification(report: dict) -> str:
    """One line per metric."""
    verdict = "PASS" if report["within_tolerance"] else "FAIL"
    lines = [f"fxpress verify: {report['model']} ({report['target']}) on {report['samples']} samples: {verdict}"]
    sqnr = "inf (identical)" if report["sqnr_db"] is None else f"{report['sqnr_db']:.1f} dB"
    lines += [
        f"  max abs diff      {report['max_abs']:.3g} (largest |eager| {report['reference_max_abs']:.3g})",
        f"  cosine            {report['cosine']:.6f} (lowest per sample {report['min_sample_cosine']:.6f})",
        f"  SQNR              {sqnr}",
    ]
    for key in ("top1_agreement", "accuracy_eager", "accuracy_compiled"):
        if key in report:
            lines.append(f"  {key.replace('_', ' '):<17} {report[key]:.4f}")
    tolerance = report["tolerance"]
    if tolerance.get("min_cosine") is not None:
        lines.append(f"  tolerance         lowest per-sample cosine >= {tolerance['min_cosine']}")
    else:
        lines.append(f"  tolerance         rtol {tolerance['rtol']}, atol {tolerance['atol']}")
    return "\n".join(lines)
