"""ONNX Runtime's CPU placement policy: what its QDQ selectors fuse into integer kernels.

QLinearConv, QGemm / MatMulInteger, QLinearAdd, QLinearConcat and QLinearGlobalAveragePool; Relu
and Clip fold into the following QuantizeLinear. ``"auto"`` activation dtype and weight bits come
from this CPU's ISA (:mod:`backends.onnxruntime.isa`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from backends.onnxruntime.isa import int8_format
from compiler.errors import TargetError
from compiler.quant_policy import QuantPolicy, with_fields

ONNXRUNTIME_CPU = QuantPolicy(name="onnxruntime-cpu")

POLICIES: Mapping[str, QuantPolicy] = {ONNXRUNTIME_CPU.name: ONNXRUNTIME_CPU}


def make_policy(policy: str | Mapping[str, Any] | QuantPolicy, **overrides: Any) -> QuantPolicy:
    """A policy from its name, a dict of fields (``{"base": name, ...}``), or itself, with overrides."""
    if isinstance(policy, QuantPolicy):
        base, fields = policy, {}
    elif isinstance(policy, str):
        base, fields = _named(policy), {}
    elif isinstance(policy, Mapping):
        fields = dict(policy)
        base = _named(fields.pop("base", ONNXRUNTIME_CPU.name))
    else:
        raise TargetError(f"a quantisation policy is a name or a dict, got {type(policy).__name__}")
    fields.update({key: value for key, value in overrides.items() if value is not None})
    _resolve_auto(fields)
    return with_fields(base, fields)


def _resolve_auto(fields: dict[str, Any]) -> None:
    """``"auto"`` activation dtype and weight bits come from the CPU's ISA."""
    if "auto" not in (fields.get("activation_dtype"), fields.get("weight_bits")):
        return
    chosen = int8_format()
    if fields.get("activation_dtype") == "auto":
        fields["activation_dtype"] = chosen.activation_dtype
    if fields.get("weight_bits") == "auto":
        fields["weight_bits"] = chosen.weight_bits


def _named(name: str) -> QuantPolicy:
    if name not in POLICIES:
        raise TargetError(f"unknown quantisation policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return POLICIES[name]
