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

_BUDGETS = ("macs",)
_NOT_YET = ("latency", "params")
_OPTIONS = ("importance", "protect", "round_to")
_QUANTISATION_PASSES = ("calibrate", "gptq", "quant_sensitivity", "bias_correction", "insert_qdq")


def pruning_passes(prune: Mapping[str, Any] | None, recover_seconds: float) -> tuple[PassSpec, ...]:
    """The passes ``prune`` and ``recover_seconds`` ask for; none when ``prune`` is None."""
    if prune is None:
        return ()
    if not isinstance(prune, Mapping):
        raise TargetError(f"prune must be a dict such as {{'macs': 0.3}}, got {type(prune).__name__}")
    unknown = sorted(set(prune) - set(_BUDGETS) - set(_NOT_YET) - set(_OPTIONS))
    if unknown:
        raise TargetError(f"prune has no key(s) {', '.join(unknown)}; keys: {', '.join(_BUDGETS + _OPTIONS)}")
    if waiting := [key for key in _NOT_YET if key in prune]:
        raise TargetError(f"prune={{{waiting[0]!r}: ...}} is not built yet; give a MAC budget, e.g. {{'macs': 0.3}}")
    if "macs" not in prune:
        raise TargetError("prune needs a budget: {'macs': fraction of MACs to remove}")
    if isinstance(recover_seconds, bool) or not isinstance(recover_seconds, (int, float)) or recover_seconds < 0:
        raise TargetError(f"recover_seconds must be a number >= 0, got {recover_seconds!r}")
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
