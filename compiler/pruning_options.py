"""The ``prune=`` and ``recover_seconds=`` arguments of ``compile()``, turned into passes of the target.

Pruning (then a cleanup, then distillation recovery) goes after the target's float cleanup and
fusion passes and before any quantisation pass, so a pruned model is calibrated as it will run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from compiler.errors import TargetError
from compiler.targets import PassSpec, Target

_BUDGETS = ("macs", "params", "latency")
_UNSTRUCTURED = ("sparsity", "threshold")
_OPTIONS = ("latency_batch", "importance", "protect", "round_to", "reconstruct", "reconstruct_samples", "allocation",
            "max_prune")
_UNSTRUCTURED_OPTIONS = ("scope", "protect")
_QUANTISATION_PASSES = ("calibrate", "gptq", "quant_sensitivity", "bias_correction", "insert_qdq")


def pruning_passes(prune: Mapping[str, Any] | None, recover_seconds: float) -> tuple[PassSpec, ...]:
    """The passes ``prune`` and ``recover_seconds`` ask for; none when ``prune`` is None."""
    if prune is None:
        return ()
    if not isinstance(prune, Mapping):
        raise TargetError(f"prune must be a dict such as {{'macs': 0.3}}, got {type(prune).__name__}")
    known = _BUDGETS + _UNSTRUCTURED + _OPTIONS + _UNSTRUCTURED_OPTIONS
    unknown = sorted(set(prune) - set(known))
    if unknown:
        raise TargetError(f"prune has no key(s) {', '.join(unknown)}; keys: {', '.join(known)}")
    budgets = [key for key in _BUDGETS + _UNSTRUCTURED if key in prune]
    if len(budgets) != 1:
        raise TargetError("prune needs one budget: {'macs': fraction of MACs to remove}, {'params': fraction of "
                          "parameters to remove}, {'latency': share of the unpruned latency to reach, e.g. 0.7}, or "
                          "unstructured {'sparsity': fraction of weights zeroed} / "
                          f"{{'threshold': magnitude}}; got {budgets or 'none'}")
    if isinstance(recover_seconds, bool) or not isinstance(recover_seconds, (int, float)) or recover_seconds < 0:
        raise TargetError(f"recover_seconds must be a number >= 0, got {recover_seconds!r}")
    if budgets[0] in _UNSTRUCTURED:
        if misplaced := sorted(set(prune) - set(_UNSTRUCTURED) - set(_UNSTRUCTURED_OPTIONS)):
            raise TargetError(f"prune key(s) {', '.join(misplaced)} belong to structured pruning, not to "
                              f"{budgets[0]!r}; unstructured options: {', '.join(_UNSTRUCTURED_OPTIONS)}")
        passes = [PassSpec("sparsify_weights", dict(prune))]
    else:
        passes = [PassSpec("prune_channels", dict(prune)), PassSpec("eliminate_dead_code")]
    if recover_seconds > 0:
        passes.append(PassSpec("recover", {"seconds": float(recover_seconds)}))
    return tuple(passes)


def with_passes(target: Target, extra: tuple[PassSpec, ...]) -> Target:
    """``target`` with ``extra`` inserted before its first quantisation pass (or at its end)."""
    if not extra:
        return target
    pipeline = list(target.pipeline)
    position = next((i for i, spec in enumerate(pipeline) if spec.name in _QUANTISATION_PASSES), len(pipeline))
    return dataclasses.replace(target, pipeline=(*pipeline[:position], *extra, *pipeline[position:]))
