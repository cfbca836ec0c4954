"""TensorRT's explicit-quantisation placement, as a policy (data): where Q/DQ pairs go so that TensorRT fuses them.

From TensorRT's placement recommendations and NVIDIA ModelOpt's ONNX patterns (see the TensorRT
section of the README): symmetric int8 everywhere (zero point 0, scale ``amax / 127``), per-channel
weights and per-tensor activations; both inputs of every conv and linear quantised and their
outputs left float (TensorRT fuses the next quantiser into the kernel itself); at a residual add
only the skip input quantised, so the add fuses into the conv before it; other adds and average
pools fully quantised or float; concat inputs sharing one scale; biases float; LayerNorm, Softmax,
GELU and the attention matmuls in float; convs and linears too narrow for int8 kernels in float.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from compiler.errors import TargetError
from compiler.quant_policy import FLOAT_BY_DEFAULT, WEIGHTED, QuantPolicy, with_fields

TENSORRT = QuantPolicy(
    name="tensorrt",
    weighted_ops=frozenset(WEIGHTED),  # ConvTranspose too, with its weight's axis 1
    integer_ops=frozenset({"aten.add", "aten.add_", "aten.cat", "aten.adaptive_avg_pool2d", "aten.avg_pool2d"}),
    float_ops=FLOAT_BY_DEFAULT,
    activation_dtype="int8",
    activation_symmetric=True,
    weight_bits=8,
    depthwise_weight_bits=8,
    quantize_model_outputs=False,
    quantize_weighted_outputs=False,
    residual_skip_only=True,
    quantize_bias=False,
    min_gemm_channels=16,
    share_concat_scale=True,
)

POLICIES: Mapping[str, QuantPolicy] = {TENSORRT.name: TENSORRT}

#: Fields a user may not change: TensorRT accepts nothing else.
_FIXED = {"activation_dtype": "int8", "activation_symmetric": True, "weight_bits": 8, "depthwise_weight_bits": 8,
          "quantize_bias": False}


def make_policy(spec: Mapping[str, Any] | QuantPolicy | str) -> QuantPolicy:
    """The TensorRT policy with the user's overrides (``float_modules``, ``float_ops``, ...)."""
    if isinstance(spec, QuantPolicy):
        return spec
    fields = {"base": spec} if isinstance(spec, str) else dict(spec)
    base = fields.pop("base", TENSORRT.name)
    if base not in POLICIES:
        raise TargetError(f"unknown TensorRT quantisation policy {base!r}; known: {', '.join(sorted(POLICIES))}")
    for key, required in _FIXED.items():
        if key in fields and fields[key] != required:
            raise TargetError(f"TensorRT's explicit quantisation needs {key}={required!r}, got {fields[key]!r}")
    return with_fields(POLICIES[base], fields)
