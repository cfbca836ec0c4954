"""Targets are data: which passes run, with which options, and which backend lowers the result.

Take a target and change it with ``dataclasses.replace``; a test checks that every pass named
here exists in ``passes.REGISTRY`` and every backend in ``backends.REGISTRY``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from compiler.errors import TargetError


@dataclass(frozen=True)
class PassSpec:
    """A pass by registry name, with its options."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"name": self.name, "options": dict(self.options)}


@dataclass(frozen=True)
class Tolerance:
    """How close the compiled model must stay to its reference.

    Float targets compare with eager: ``|out - ref| <= atol + rtol * |ref|`` everywhere.
    Quantised targets (``steps`` set) compare the runtime with the torch simulation of the int8
    model: ``|out - sim| <= steps * step`` on at least ``fraction`` of the elements, where ``step``
    is one 8-bit quantisation step of the output's range. Against eager (``fxpress verify``) they
    require every sample's output cosine to be at least ``min_cosine``.
    """

    rtol: float
    atol: float
    steps: float | None = None
    fraction: float = 1.0
    min_cosine: float | None = None  # quantised targets: the lowest per-sample cosine to eager ``verify`` accepts


@dataclass(frozen=True)
class Target:
    """A named pipeline plus backend."""

    name: str
    description: str
    pipeline: tuple[PassSpec, ...]
    backend: str
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    tolerance: Tolerance = Tolerance(rtol=1e-3, atol=1e-5)
    quant_policy: Mapping[str, Any] = field(default_factory=dict)  # empty: the target does not quantise
    # A quantising target may hand Linear-heavy models (most MACs in Linear/matmul ops) to another:
    # the target to use then, and the share of MACs from which a model counts as Linear-heavy.
    linear_heavy_target: str | None = None
    linear_heavy_share: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, as recorded in reports and manifests."""
        return {
            "name": self.name,
            "description": self.description,
            "pipeline": [spec.to_dict() for spec in self.pipeline],
            "backend": self.backend,
            "backend_options": dict(self.backend_options),
            "tolerance": dataclasses.asdict(self.tolerance),
            "quant_policy": dict(self.quant_policy),
            "linear_heavy_target": self.linear_heavy_target,
            "linear_heavy_share": self.linear_heavy_share,
        }


_CLEANUP = (
    PassSpec("remove_noops"),
    PassSpec("fold_constants"),
    PassSpec("eliminate_dead_code"),
)

# Cleanup, BatchNorm folding and fusion groups: all of cpu-fp32, and the start of every other target.
_FP32 = (
    *_CLEANUP,
    PassSpec("fold_conv_bn"),
    PassSpec("fold_linear_bn"),
    PassSpec("fold_pixel_normalization"),  # only where compile(input_format=...) put a pixel normalisation
    PassSpec("mark_activation_fusion"),
    PassSpec("eliminate_dead_code"),
)

# float16 against eager fp32, compounded over the layers: on 32 evaluation samples the largest logit error was
# 0.076 on efficientnet-lite0 (logits up to 11; cosine 0.99998), 0.006 on resnet18, 1.3e-4 on MiniLM's embeddings.
TOLERANCE_FP16 = Tolerance(rtol=0.05, atol=0.2, min_cosine=0.999)

TARGETS: Mapping[str, Target] = MappingProxyType({
    "cpu-fp32": Target(
        name="cpu-fp32",
        description="fp32 on ONNX Runtime's CPU provider: cleanup, BatchNorm folding, fusion groups",
        pipeline=_FP32,
        backend="onnxruntime",
        backend_options={"opset": 18, "graph_optimization_level": "all"},
    ),
    "cpu-int8": Target(
        name="cpu-int8",
        description="int8 on ONNX Runtime's CPU provider: static QDQ in integer kernels, calibrated, "
                    "format chosen for the CPU's ISA",
        pipeline=(
            *_FP32,
            PassSpec("calibrate"),
            # GPTQ rounding of the weights: +1.2-1.4 dB output SQNR on EfficientNet-Lite0 (7-bit
            # weights) for about 5 s of compile time (32 samples; depthwise convs keep nearest rounding).
            PassSpec("gptq"),
            PassSpec("bias_correction"),
            PassSpec("insert_qdq"),
            # Every layer in integer kernels, each refitted to fp32's output from the int8 model's own
            # input: EfficientNet-Lite0 (8-bit pixels, 500 crops) from 24.7 to 27.3-27.4 dB, where keeping
            # the stem and first depthwise conv float gave 25.0-27.3 dB and cost layout changes. Float
            # fallback stays one with_float_fallback() (--float-macs) away.
            PassSpec("reconstruct"),
        ),
        backend="onnxruntime",
        backend_options={"opset": 18, "graph_optimization_level": "all"},
        # Compared with the torch simulation of the int8 model, not with fp32 eager.
        tolerance=Tolerance(rtol=0.0, atol=0.0, steps=1.0, fraction=0.999, min_cosine=0.97),
        quant_policy={"base": "onnxruntime-cpu", "activation_dtype": "auto", "weight_bits": "auto"},
        # Transformers: static per-tensor int8 of every Linear input costs MiniLM cosine 0.93, dynamic
        # per-row quantisation keeps 0.99 (bench/int8_peers.py), so cpu-int8 hands them over.
        linear_heavy_target="cpu-int8-dynamic",
    ),
    "cpu-int8-dynamic": Target(
        name="cpu-int8-dynamic",
        description="dynamic int8 Linear layers on ONNX Runtime's CPU provider (int8 GEMMs that quantise their "
                    "input at run time, per-column weights, no calibration), for Linear-heavy models such as "
                    "transformers; embedding tables stored as int8 rows; the rest in fp32",
        pipeline=_FP32,
        backend="onnxruntime",
        # Embedding tables as int8 rows: MiniLM's file from 64.7% to 25.5% of fp32 (quantize_dynamic's: 25.4%),
        # cosine to fp32 unchanged (mean 0.9930, min 0.9837 vs 0.9843 over 500 sentences; bench/int8_peers.py).
        backend_options={"opset": 18, "graph_optimization_level": "all", "dynamic_quantization": True,
                         "quantize_embeddings": True},
        # Compared elementwise with fp32 eager. Int8 activations and 7/8-bit weights err by ~1% of a
        # layer's output range: on MiniLM's unit-norm 384-d embeddings (cosine ~0.99, elements ~0.05)
        # the largest element error is ~0.03, so atol 0.1 keeps a 3x margin; rtol 0.02 covers outputs
        # of larger magnitude (logits). ``verify`` judges each sample's cosine to eager instead:
        # MiniLM's lowest over 500 sentences is ~0.977 (mean 0.992), so 0.95 leaves a margin.
        tolerance=Tolerance(rtol=0.02, atol=0.1, min_cosine=0.95),
    ),
    "trt-int8": Target(
        name="trt-int8",
        description="TensorRT-style explicit-QDQ ONNX (TensorRT 10/11, strongly typed): symmetric int8, Q/DQ "
                    "placed by TensorRT's fusion rules, calibration cache; run here by ONNX Runtime as the reference",
        pipeline=(
            *_FP32,
            # MSE ranges; MinMax for Linear-heavy models (transformers), as TensorRT advises for BERT. TensorRT's
            # entropy (KL, 2048 bins) clipped too much (bench/trt_peers.py, 500 crops): EfficientNet-Lite0 88.6%
            # top-1 / 14.4 dB against MSE's 91.8% / 19.0 dB, MobileNetV2 27.8 dB against 39.9 dB; MiniLM cosine
            # 0.80 against MinMax's 0.98 (200 sentences). Entropy stays one with_calibrator() (--calibrator) away;
            # the cache header names EntropyCalibration2 either way.
            PassSpec("calibrate", {"observer": "mse", "linear_heavy_observer": "minmax"}),
            PassSpec("gptq"),
            PassSpec("bias_correction"),
            PassSpec("insert_qdq", {"float_weights": "float32"}),
        ),
        backend="tensorrt",
        backend_options={"opset": 19, "graph_optimization_level": "disable"},
        # Compared with the torch simulation (the fake-quantised IR), which ONNX Runtime with graph
        # optimisations disabled computes op by op. ``verify`` against eager: the lowest per-sample cosine seen
        # was 0.959 (MiniLM, 500 sentences, bench/trt_peers.py), so 0.9 leaves a margin.
        tolerance=Tolerance(rtol=0.0, atol=0.0, steps=1.0, fraction=0.999, min_cosine=0.9),
        quant_policy={"base": "tensorrt"},
    ),
    "trt-fp16": Target(
        name="trt-fp16",
        description="TensorRT-style float16 ONNX (strongly typed): the model in fp16 with fp32 inputs and outputs, "
                    "overflow-prone ops (sums of squares, exponentials, reductions) in fp32; run here by ONNX Runtime",
        pipeline=_FP32,
        backend="tensorrt",
        backend_options={"opset": 19, "graph_optimization_level": "disable", "float_dtype": "float16"},
        tolerance=TOLERANCE_FP16,
    ),
})

#: TensorRT-style calibrators -> the calibrate pass's observer and its options.
CALIBRATORS: Mapping[str, tuple[str, dict[str, Any]]] = MappingProxyType({
    "entropy": ("entropy", {}),  # KL divergence on a histogram, as TensorRT's EntropyCalibration2
    "max": ("minmax", {}),  # the largest magnitude seen (MinMaxCalibration)
    "percentile": ("percentile", {"percentile": 99.99}),
    "mse": ("mse", {}),
})


def with_calibrator(target: str | Target, calibrator: str, **options: Any) -> Target:
    """``target`` with its ``calibrate`` pass using ``calibrator`` (``CALIBRATORS``); options override the defaults."""
    target = get_target(target)
    if calibrator not in CALIBRATORS:
        raise TargetError(f"unknown calibrator {calibrator!r}; choose from {', '.join(CALIBRATORS)}")
    if not any(spec.name == "calibrate" for spec in target.pipeline):
        raise TargetError(f"target {target.name!r} does not calibrate; a calibrator applies to targets that do")
    observer, defaults = CALIBRATORS[calibrator]
    chosen = {"observer": observer, "observer_options": {**defaults, **options}, "linear_heavy_observer": None}
    pipeline = tuple(PassSpec("calibrate", {**spec.options, **chosen}) if spec.name == "calibrate" else spec
                     for spec in target.pipeline)
    return dataclasses.replace(target, pipeline=pipeline)


def with_float_layers(target: str | Target, modules: tuple[str, ...] | list[str] = (), prefix: int = 0) -> Target:
    """``target`` keeping ``modules`` (module paths or fnmatch patterns) and its first ``prefix`` weighted ops float."""
    target = get_target(target)
    if not modules and not prefix:
        return target
    if not target.quant_policy:
        raise TargetError(f"applies to quantising targets; {target.name!r} does not quantise")
    policy = {**target.quant_policy, **({"float_modules": list(modules)} if modules else {}),
              **({"float_prefix": prefix} if prefix else {})}
    return dataclasses.replace(target, quant_policy=policy)


def with_float_fallback(target: str | Target, max_float_macs: float = 0.04) -> Target:
    """``target`` keeping its most harmful layers float (``quant_sensitivity``), up to ``max_float_macs`` of MACs."""
    target = get_target(target)
    if isinstance(max_float_macs, bool) or not isinstance(max_float_macs, (int, float)) \
            or not 0 <= max_float_macs <= 1:
        raise TargetError(f"max_float_macs is a share of the MACs in [0, 1], got {max_float_macs!r}")
    names = [spec.name for spec in target.pipeline]
    if "insert_qdq" not in names or "calibrate" not in names:
        raise TargetError(f"target {target.name!r} does not quantise with calibration; float fallback needs one "
                          "that does")
    sensitivity = PassSpec("quant_sensitivity",
                           {"metric": "cosine", "max_drop": 1e-4, "max_float_macs": max_float_macs})
    pipeline = [spec for spec in target.pipeline if spec.name != "quant_sensitivity"]
    before = next(i for i, spec in enumerate(pipeline) if spec.name in ("bias_correction", "insert_qdq"))
    pipeline.insert(before, sensitivity)
    return dataclasses.replace(target, pipeline=tuple(pipeline))


def get_target(target: str | Target) -> Target:
    """The Target for a name (or the Target itself); unknown names list the known ones."""
    if isinstance(target, Target):
        return target
    if target not in TARGETS:
        known = ", ".join(sorted(TARGETS))
        raise TargetError(f"unknown target {target!r}; known targets: {known}")
    return TARGETS[target]
