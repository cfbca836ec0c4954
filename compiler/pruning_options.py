"""The ``prune=``, ``low_rank=`` and ``recover_seconds=`` arguments of ``compile()``, turned into passes.

Pruning (then a cleanup), low-rank factorisation, then one distillation recovery go after the
target's float cleanup and fusion passes and before any quantisation pass, so a compressed model is
calibrated as it will run.
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
_LOW_RANK_BUDGETS = ("macs", "params", "energy")
_LOW_RANK_OPTIONS = ("method", "allocation", "round_to", "protect", "refit", "samples", "probe_samples",
                     "savings_only", "weighting")
_RECOVER_OPTIONS = ("augment", "lr", "temperature", "batch_size", "seed", "schedule", "features", "feature_weight",
                    "feature_cache_mb", "max_steps")
_QUANTISATION_PASSES = ("calibrate", "gptq", "quant_sensitivity", "bias_correction", "insert_qdq")


def compression_passes(prune: Mapping[str, Any] | None, low_rank: Mapping[str, Any] | None,
                       recover_seconds: float, recover: Mapping[str, Any] | None = None) -> tuple[PassSpec, ...]:
    """The passes ``prune``, ``low_rank`` and ``recover_seconds`` ask for; none when both are None.

    ``recover`` holds more options of the recovery pass (``augment``, ``lr``, ...); its budget is
    ``recover_seconds``.
    """
    options = _recover_options(recover)
    if prune is None and low_rank is None:
        if options:
            raise TargetError("recover options apply to the recovery after prune= or low_rank=; neither was given")
        return ()
    if isinstance(recover_seconds, bool) or not isinstance(recover_seconds, (int, float)) or recover_seconds < 0:
        raise TargetError(f"recover_seconds must be a number >= 0, got {recover_seconds!r}")
    passes = [*_pruning(prune), *_low_rank(low_rank)]
    if recover_seconds > 0:
        passes.append(PassSpec("recover", {**options, "seconds": float(recover_seconds)}))
    return tuple(passes)


def _recover_options(recover: Mapping[str, Any] | None) -> dict[str, Any]:
    if recover is None:
        return {}
    if not isinstance(recover, Mapping):
        raise TargetError(f"recover must be a dict such as {{'augment': 'none'}}, got {type(recover).__name__}")
    if "seconds" in recover:
        raise TargetError("recover takes no 'seconds': the budget is recover_seconds=")
    if unknown := sorted(set(recover) - set(_RECOVER_OPTIONS)):
        raise TargetError(f"recover has no key(s) {', '.join(unknown)}; keys: {', '.join(_RECOVER_OPTIONS)}")
    return dict(recover)


def _low_rank(low_rank: Mapping[str, Any] | None) -> list[PassSpec]:
    if low_rank is None:
        return []
    if not isinstance(low_rank, Mapping):
        raise TargetError(f"low_rank must be a dict such as {{'macs': 0.3}}, got {type(low_rank).__name__}")
    known = _LOW_RANK_BUDGETS + _LOW_RANK_OPTIONS
    if unknown := sorted(set(low_rank) - set(known)):
        raise TargetError(f"low_rank has no key(s) {', '.join(unknown)}; keys: {', '.join(known)}")
    budgets = [key for key in _LOW_RANK_BUDGETS if key in low_rank]
    if len(budgets) != 1:
        raise TargetError("low_rank needs one budget: {'macs': share of the conv and linear MACs to remove}, "
                          "{'params': share of their weights to remove} or {'energy': share of each layer's "
                          f"output energy to keep, e.g. 0.95}}; got {budgets or 'none'}")
    return [PassSpec("low_rank", dict(low_rank))]


def _pruning(prune: Mapping[str, Any] | None) -> list[PassSpec]:
    if prune is None:
        return []
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
    if budgets[0] in _UNSTRUCTURED:
        if misplaced := sorted(set(prune) - set(_UNSTRUCTURED) - set(_UNSTRUCTURED_OPTIONS)):
            raise TargetError(f"prune key(s) {', '.join(misplaced)} belong to structured pruning, not to "
                              f"{budgets[0]!r}; unstructured options: {', '.join(_UNSTRUCTURED_OPTIONS)}")
        return [PassSpec("sparsify_weights", dict(prune))]
    return [PassSpec("prune_channels", dict(prune)), PassSpec("eliminate_dead_code")]


def with_passes(target: Target, extra: tuple[PassSpec, ...]) -> Target:
    """``target`` with ``extra`` inserted before its first quantisation pass (or at its end)."""
    if not extra:
        return target
    pipeline = list(target.pipeline)
    position = next((i for i, spec in enumerate(pipeline) if spec.name in _QUANTISATION_PASSES), len(pipeline))
    return dataclasses.replace(target, pipeline=(*pipeline[:position], *extra, *pipeline[position:]))
