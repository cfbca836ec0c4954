"""ONNX Runtime backend: ONNX export of the IR, then a CPU session with graph optimisations."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.fx as fx

from backends.onnx.export import export_lowering, max_runtime_ir_version
from backends.onnx.weight_storage import store_exact_half_weights
from backends.onnxruntime.dynamic_quant import quantize_dynamic_linears
from backends.onnxruntime.embedding_quant import quantize_embedding_tables
from backends.onnxruntime.emulation import emulate
from backends.onnxruntime.isa import channel_multiple, detect_isa, int8_format
from backends.onnxruntime.policy import make_policy
from backends.onnxruntime.rewrites import fuse_gelu
from compiler.backend_base import Backend, Lowered, LoweringRequest
from compiler.errors import ArtifactError, InputError, TargetError
from compiler.quant_policy import QuantPolicy

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class OnnxRuntimeRunner:
    """Runs an ONNX Runtime session on torch tensors."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.inputs = session.get_inputs()
        self.output_names = [output.name for output in session.get_outputs()]

    def run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Check the inputs against the session's, run, and return torch tensors."""
        if len(inputs) != len(self.inputs):
            names = ", ".join(spec.name for spec in self.inputs)
            raise InputError(f"the model takes {len(self.inputs)} input(s) ({names}), got {len(inputs)}")
        feed = {spec.name: _to_numpy(spec, value) for spec, value in zip(self.inputs, inputs, strict=True)}
        outputs = self.session.run(self.output_names, feed)
        return tuple(torch.from_numpy(np.asarray(output)) for output in outputs)


def _to_numpy(spec, value: object) -> np.ndarray:
    if not isinstance(value, torch.Tensor):
        raise InputError(f"input {spec.name!r} must be a torch.Tensor, got {type(value).__name__}")
    array = value.detach().cpu().numpy()
    expected = spec.type.removeprefix("tensor(").removesuffix(")")
    if array.dtype.name != {"float": "float32", "double": "float64"}.get(expected, expected):
        raise InputError(f"input {spec.name!r} must have dtype {expected}, got {array.dtype.name}")
    if len(spec.shape) != array.ndim:
        raise InputError(f"input {spec.name!r} must have rank {len(spec.shape)} {spec.shape}, got shape {array.shape}")
    return np.ascontiguousarray(array)


#: ONNX Runtime rewrites a float Conv/Gemm that sits between DequantizeLinear and QuantizeLinear into
#: an integer kernel by quantising its float weights itself (8-bit, unchecked for saturation). That
#: undoes the layers fxpress keeps in float on purpose, so sessions run without it.
DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)


def session_options(level: str = "all", threads: int = 0) -> ort.SessionOptions:
    """ONNX Runtime session options at graph optimisation ``level`` with ``threads`` intra-op threads."""
    if level not in _LEVELS:
        raise TargetError(f"unknown graph_optimization_level {level!r}; choose from {', '.join(_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[level]
    options.intra_op_num_threads = threads
    return options


def make_session(model: onnx.ModelProto | bytes, level: str = "all", threads: int = 0,
                 profile_prefix: str | None = None, optimized_path: str | None = None,
                 disabled_optimizers: tuple[str, ...] = DISABLED_OPTIMIZERS) -> ort.InferenceSession:
    """A CPU session at graph optimisation ``level`` (disable, basic, extended, all).

    With ``profile_prefix``, ONNX Runtime's profiler records every run; ``end_profiling()`` writes
    its events to a JSON file whose name starts with the prefix and returns that file's path. With
    ``optimized_path``, the graph as optimised (the kernels it will run) is saved there.
    ``disabled_optimizers`` defaults to fxpress's (``WeightBiasQuantization`` off, so layers kept
    in float stay float); ``()`` is ONNX Runtime's own set, as other tools' models expect.
    """
    options = session_options(level, threads)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if optimized_path is not None:
        options.optimized_model_filepath = optimized_path
        options.log_severity_level = 3  # not the warning that a saved "all"-level graph is machine-specific
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled_optimizers))


class OnnxRuntimeBackend(Backend):
    """Lower to ONNX and run with ONNX Runtime's CPU execution provider."""

    name = "onnxruntime"
    # dynamic_quantization: Linear layers to int8 DynamicQuantizeMatMul after export (.dynamic_quant);
    # quantize_embeddings: large Gather tables stored as int8 rows (.embedding_quant)
    default_options = {"opset": 18, "graph_optimization_level": "all", "intra_op_num_threads": 0,
                       "dynamic_quantization": False, "quantize_embeddings": False}
    minimum_opset = 17  # LayerNormalization, and the exporter's torchlib, need 17

    def __init__(self, **options):
        super().__init__(**options)
        if self.options["opset"] < self.minimum_opset:
            raise TargetError(
                f"opset {self.options['opset']} is below {self.minimum_opset}, the lowest the {self.name} backend "
                "supports; raise backend_options['opset']"
            )

    def lower(self, request: LoweringRequest) -> Lowered:
        """Export to ONNX, validate, quantise Linear layers dynamically if asked, and open a session."""
        started = time.perf_counter()
        model = export_lowering(request, self.options["opset"])
        model, gelus = fuse_gelu(model)
        model, half_weights = store_exact_half_weights(model)
        quantization = None
        if self.options["dynamic_quantization"]:
            model, quantization = quantize_dynamic_linears(model, int8_format())
        embeddings = None
        if self.options["quantize_embeddings"]:
            model, embeddings = quantize_embedding_tables(model)
        runner = self.load(model)
        info = {
            "backend": self.name, "opset": _opset(model), "ir_version": model.ir_version,
            "onnx_nodes": len(model.graph.node), "seconds": time.perf_counter() - started,
            "onnxruntime": ort.__version__, "provider": "CPUExecutionProvider",
            "graph_optimization_level": self.options["graph_optimization_level"],
            "disabled_optimizers": list(DISABLED_OPTIMIZERS), "fused_gelu": gelus,
            "float16_weights": half_weights,
        }
        if quantization is not None:
            info["dynamic_quantization"] = quantization
        if embeddings is not None:
            info["embedding_quantization"] = embeddings
        return Lowered(model, runner, info)

    def quant_policy(self, spec: Mapping[str, Any]) -> QuantPolicy:
        """ONNX Runtime's CPU placement policy, with ``auto`` formats resolved for this CPU."""
        return make_policy(dict(spec))

    def hardware(self) -> dict[str, Any]:
        """This CPU's int8-relevant ISA and the int8 format chosen for it."""
        return {**detect_isa().to_dict(), "int8_format": int8_format().to_dict()}

    def channel_multiple(self) -> int:
        """16 on AVX-512 (MLAS's NCHWc convolutions and int8 GEMMs block by 16), 8 otherwise (AVX2)."""
        return channel_multiple(detect_isa())

    def layer_timer(self, precision: str = "float32") -> Any:
        """Times conv and linear shapes in ONNX Runtime's float or integer kernels, once per machine."""
        from backends.onnxruntime.layer_latency import LayerTimer  # it imports this module

        return LayerTimer(self.options["intra_op_num_threads"], precision=precision)

    def emulate(self, graph_module: fx.GraphModule, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The IR with every group ONNX Runtime fuses computed by that kernel's arithmetic (bit-exact on x86-64)."""
        return emulate(graph_module, *inputs)

    def load(self, model: onnx.ModelProto | bytes) -> OnnxRuntimeRunner:
        """A runner for an ONNX model; refuses IR versions newer than the runtime reads."""
        return open_runner(model, self.options["graph_optimization_level"], self.options["intra_op_num_threads"])


def open_runner(model: onnx.ModelProto | bytes, level: str = "all", threads: int = 0) -> OnnxRuntimeRunner:
    """A runner for ``model`` on a CPU session at ``level``; refuses IR versions newer than the runtime reads."""
    version = model.ir_version if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model).ir_version
    if version > max_runtime_ir_version():
        raise ArtifactError(
            f"the model has ONNX IR version {version}, newer than onnxruntime {ort.__version__} reads "
            f"({max_runtime_ir_version()}); upgrade onnxruntime or recompile with this one"
        )
    return OnnxRuntimeRunner(make_session(model, level, threads))


def _opset(model: onnx.ModelProto) -> int:
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
