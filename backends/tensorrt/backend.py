"""The TensorRT-style backend: explicit symmetric Q/DQ ONNX as TensorRT 10 and 11 consume it, checked on a CPU.

No TensorRT is needed or used. Lowering exports the IR (the quantisation passes placed Q/DQ by
:data:`backends.tensorrt.policy.TENSORRT`), lints the placement against TensorRT's rules
(:mod:`backends.tensorrt.lint`; findings become ledger fallbacks), writes TensorRT's native
calibration cache and the float model it refers to, and opens an ONNX Runtime session with graph
optimisations disabled: Q, DQ and every float op run one by one, the ONNX reference semantics of
the Q/DQ model, which the torch simulation must match.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import onnx
import onnxruntime as ort
import torch
import torch.fx as fx

from backends.onnx.export import export_lowering, validate
from backends.onnxruntime.backend import OnnxRuntimeRunner, open_runner
from backends.onnxruntime.emulation import emulate_unoptimized
from backends.tensorrt.calibration_cache import (
    DEFAULT_TRT_VERSION,
    activation_scales,
    format_cache,
    strip_qdq,
    version_number,
)
from backends.tensorrt.float16 import to_float16
from backends.tensorrt.lint import lint_tensorrt, placement_summary
from backends.tensorrt.policy import make_policy
from backends.tensorrt.rewrites import fold_weight_transposes
from compiler.backend_base import Backend, Lowered, LoweringRequest
from compiler.errors import TargetError
from compiler.quant_policy import QuantPolicy

CACHE_FILE = "calibration.cache"
SCALES_FILE = "calibration.json"
IMPLICIT_MODEL_FILE = "model.implicit.onnx"
_ALGORITHMS = ("EntropyCalibration2", "MinMaxCalibration", "EntropyCalibration", "LegacyCalibration")


class TensorRTBackend(Backend):
    """Lower to TensorRT-style explicit-QDQ ONNX; run it in ONNX Runtime as the reference."""

    name = "tensorrt"
    emulation = "emulation of ONNX Runtime's unoptimised kernels"
    default_options = {
        "opset": 19,  # ModelOpt's minimum for int8 Q/DQ; TensorRT 10 parses 9-20, 11 up to 25
        "graph_optimization_level": "disable",  # the ONNX reference semantics; "all" smoke-tests integer kernels
        "intra_op_num_threads": 0,
        "calibration_cache": True,
        "calibration_cache_version": DEFAULT_TRT_VERSION,
        "calibration_cache_algorithm": "EntropyCalibration2",
        "float_dtype": "float32",  # "float16": the model in fp16 (fp32 inputs and outputs), trt-fp16
    }
    minimum_opset = 13  # per-channel DequantizeLinear needs its axis attribute

    def __init__(self, **options):
        super().__init__(**options)
        if self.options["opset"] < self.minimum_opset:
            raise TargetError(f"opset {self.options['opset']} is below {self.minimum_opset}, the lowest with "
                              "per-channel Q/DQ; raise backend_options['opset']")
        version_number(self.options["calibration_cache_version"])  # a malformed version fails now
        if self.options["float_dtype"] not in ("float32", "float16"):
            raise TargetError(f"float_dtype must be 'float32' or 'float16', got {self.options['float_dtype']!r}")
        if self.options["calibration_cache_algorithm"] not in _ALGORITHMS:
            raise TargetError(f"calibration_cache_algorithm must be one of {', '.join(_ALGORITHMS)}, "
                              f"got {self.options['calibration_cache_algorithm']!r}")

    def lower(self, request: LoweringRequest) -> Lowered:
        """Export, lint, write the calibration cache, open the reference session."""
        started = time.perf_counter()
        model = export_lowering(request, self.options["opset"])
        model, transposes = fold_weight_transposes(model)
        float16 = None
        if self.options["float_dtype"] == "float16":
            feed = {name: tensor.detach().numpy() for name, tensor in zip(request.input_names, request.example_inputs,
                                                                         strict=True)}
            model, float16 = to_float16(model, feed)
        validate(model)
        findings = lint_tensorrt(model)
        files, cache = self._calibration_files(model)
        runner = self.load(model)
        info = {
            "backend": self.name, "opset": self.options["opset"], "ir_version": model.ir_version,
            "onnx_nodes": len(model.graph.node), "seconds": time.perf_counter() - started,
            "onnxruntime": ort.__version__, "provider": "CPUExecutionProvider (reference for the Q/DQ semantics)",
            "graph_optimization_level": self.options["graph_optimization_level"],
            "placement": placement_summary(model), "lint_findings": [finding.to_dict() for finding in findings],
            "calibration_cache": cache, "weights_stored_transposed": transposes,
        }
        if float16 is not None:
            info["float16"] = float16
        warnings = [f"TensorRT placement lint {finding.rule} ({finding.name}) at {finding.node}: {finding.message}"
                    for finding in findings]
        return Lowered(model, runner, info, files=files, warnings=warnings)

    def _calibration_files(self, model: onnx.ModelProto) -> tuple[dict[str, bytes], dict[str, Any]]:
        """``calibration.cache`` (TensorRT's text format), its scales as JSON, and the float model it names."""
        scales = activation_scales(model)
        if not self.options["calibration_cache"] or not scales:
            return {}, {"written": False, "why": "no activation quantisers" if not scales else "disabled"}
        text = format_cache(scales, self.options["calibration_cache_version"],
                            self.options["calibration_cache_algorithm"])
        table = {name: {"scale": scale, "amax": scale * 127} for name, scale in scales.items()}
        files = {
            CACHE_FILE: text.encode(),
            SCALES_FILE: (json.dumps(table, indent=2) + "\n").encode(),
            IMPLICIT_MODEL_FILE: strip_qdq(model).SerializeToString(),
        }
        return files, {"written": True, "tensors": len(scales), "header": text.splitlines()[0],
                       "files": [CACHE_FILE, SCALES_FILE, IMPLICIT_MODEL_FILE]}

    def quant_policy(self, spec: Mapping[str, Any]) -> QuantPolicy:
        """TensorRT's placement policy with the user's overrides."""
        return make_policy(dict(spec))

    def emulate(self, graph_module: fx.GraphModule, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The torch simulation of the Q/DQ model with the reference session's float arithmetic (convs as MLAS sums).

        The fake-quantised IR in plain PyTorch differs from the runtime in float summation order;
        each rounding tie that breaks the other way at a quantiser is amplified by the layers after
        it (on efficientnet-lite0 only 81% of the logits stayed within one step).
        """
        return emulate_unoptimized(graph_module, *inputs)

    def load(self, model: onnx.ModelProto | bytes) -> OnnxRuntimeRunner:
        """A runner for an ONNX model: ONNX Runtime's CPU provider at the configured optimisation level."""
        return open_runner(model, self.options["graph_optimization_level"], self.options["intra_op_num_threads"])
