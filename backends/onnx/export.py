"""Lowering the IR to ONNX with the maintained exporter (``torch.onnx.export``, dynamo path).

Then making the file traceable and valid: every node names its PyTorch module path, the IR
version is one the installed ONNX Runtime accepts, and the model passes ``onnx.checker`` (full
check) and strict shape inference.

Why lowering traces again. Capture traces the user's model once (``torch.export``; symbolic
tracing before it is a Python-level walk of 0.03-0.07 s on EfficientNet-Lite0). The passes then
edit the IR, a ``GraphModule`` with parameters as attributes, and ``torch.onnx.export`` takes only
a module (which it exports itself) or an ``ExportedProgram`` whose graph and signature match the
parameters: no public API turns an edited graph back into an ``ExportedProgram`` without tracing
it, and the exporter then re-traces once more inside ``run_decompositions``, which its API cannot
skip. Measured on EfficientNet-Lite0 (2 cores, three runs): capture 1.9-3.0 s, of which the
model's export 1.1-2.2 s; lowering 3.7-5.5 s, of which the IR's export 0.6-1.6 s, the exporter's
decompositions 1.3-2.4 s, translation and optimisation the rest, checks 0.1 s and the session
0.1 s. Keeping the IR as an ``ExportedProgram`` through every pass would save the IR's export,
at the price of every pass editing lifted parameters and the graph signature.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import logging
from dataclasses import dataclass

import onnx
import onnxruntime as ort
import torch
import torch.fx as fx
from torch.export import Dim

from backends.onnx.quant_translations import TRANSLATIONS
from compiler import ir, meta
from compiler.backend_base import LoweringRequest
from compiler.dynamic_shapes import DynamicDims, widen_inputs
from compiler.errors import LoweringError, UnsupportedOperatorError
from compiler.quiet import quiet_torch

logger = logging.getLogger(__name__)

MODULE_PATH_KEY = "fxpress.module_path"  # ONNX node metadata_props key
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


@dataclass
class ExportRequest:
    """What the exporter needs besides the graph."""

    graph_module: fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_dims: DynamicDims
    opset: int = 18


def export_onnx(request: ExportRequest) -> onnx.ModelProto:
    """Export, annotate provenance, pin the IR version, and validate."""
    program = _run_exporter(request)
    model = program.model_proto
    annotate_provenance(model)
    model.ir_version = min(model.ir_version, max_runtime_ir_version())
    validate(model)
    return model


def export_lowering(request: LoweringRequest, opset: int) -> onnx.ModelProto:
    """:func:`export_onnx` of a backend's lowering request at ``opset``."""
    return export_onnx(ExportRequest(request.graph_module, request.example_inputs, request.input_names,
                                     request.output_names, request.dynamic_dims, opset))


def _run_exporter(request: ExportRequest):
    dims = request.dynamic_dims
    arguments = widen_inputs(request.example_inputs, dims)
    dynamic_shapes = _dynamic_shapes(dims, len(arguments))
    quiet = io.StringIO()
    try:
        # An inference graph: no autograd forms of ops (e.g. the cachemask form of fake-quantise).
        with quiet_torch(), contextlib.redirect_stdout(quiet), torch.no_grad():
            return torch.onnx.export(
                request.graph_module, arguments, dynamo=True, opset_version=request.opset,
                input_names=list(request.input_names), output_names=list(request.output_names),
                dynamic_shapes=dynamic_shapes, verbose=False, optimize=True,
                custom_translation_table=TRANSLATIONS,
            )
    except Exception as error:
        unsupported = unsupported_operators(request.graph_module, request.opset)
        if unsupported:
            listed = "; ".join(f"{op} in module {path or '<root>'!r}" for op, path in unsupported)
            raise UnsupportedOperatorError(
                f"no ONNX mapping for {len(unsupported)} operator(s): {listed}. Replace them with "
                "standard torch operations or register an ONNX translation (torch.onnx custom_translation_table)",
                operators=unsupported,
            ) from error
        raise LoweringError(f"torch.onnx.export failed: {str(error).strip().splitlines()[0][:300]}") from error


def _dynamic_shapes(dims: DynamicDims, count: int) -> tuple:
    by_name: dict[str, Dim] = {}
    shapes = []
    for index in range(count):
        spec = {}
        for dim, (name, low, high) in dims.get(index, {}).items():
            if name not in by_name:
                by_name[name] = Dim(name, min=low, max=high) if high else Dim(name, min=low)
            spec[dim] = by_name[name]
        shapes.append(spec or None)
    return tuple(shapes)


def unsupported_operators(gm: fx.GraphModule, opset: int) -> list[tuple[str, str]]:
    """(operator, module path) of every node with neither an ONNX translation nor a decomposition."""
    from torch.onnx._internal.exporter._registration import ONNXRegistry

    with quiet_torch():
        registry = ONNXRegistry.from_torchlib(opset)
    decompositions = torch.export.default_decompositions()
    found = []
    for node in ir.call_nodes(gm):
        target = node.target
        if not isinstance(target, torch._ops.OpOverload):
            continue  # Python-level helpers such as operator.getitem are handled by the exporter
        if not registry.is_registered(target) and target not in decompositions:
            found.append((ir.op_name(node), ir.module_path(node)))
    return found


def annotate_provenance(model: onnx.ModelProto) -> None:
    """Give every node a ``fxpress.module_path`` metadata entry and prefix its name with it.

    The exporter records the module scopes of the FX node each ONNX node came from; nodes the
    optimiser created without scopes inherit the path of their nearest neighbour that has one.
    """
    nodes = list(model.graph.node)
    paths = [_module_path(node) for node in nodes]
    _fill_gaps(nodes, paths)
    used: set[str] = set()
    for node, path in zip(nodes, paths, strict=True):
        _drop_stack_trace(node)
        entry = node.metadata_props.add()
        entry.key, entry.value = MODULE_PATH_KEY, path
        name = f"{path or 'root'}/{node.name or node.op_type}"
        node.name = _unique(name, used)


def _drop_stack_trace(node: onnx.NodeProto) -> None:
    """Remove the exporter's stack traces from a node's metadata.

    They hold this machine's file paths, which would leak into deployments and make artifacts
    differ between machines; the module path already says where a node came from.
    """
    kept = [prop for prop in node.metadata_props if prop.key != _STACK_TRACE_KEY]
    del node.metadata_props[:]
    node.metadata_props.extend(kept)


def _module_path(node: onnx.NodeProto) -> str | None:
    for prop in node.metadata_props:
        if prop.key == _SCOPES_KEY:
            with contextlib.suppress(ValueError, SyntaxError):
                scopes = [s for s in ast.literal_eval(prop.value) if not s.startswith(meta.PLACEHOLDER_SCOPE)]
                return scopes[-2] if len(scopes) >= 2 else ""
    return None


def _fill_gaps(nodes: list[onnx.NodeProto], paths: list[str | None]) -> None:
    producer = {output: index for index, node in enumerate(nodes) for output in node.output}
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    for _ in range(len(nodes)):
        missing = [i for i, path in enumerate(paths) if path is None]
        if not missing:
            return
        for index in missing:
            neighbours = [producer[n] for n in nodes[index].input if n in producer]
            neighbours += [c for n in nodes[index].output for c in consumers.get(n, [])]
            known = [paths[i] for i in neighbours if paths[i] is not None]
            paths[index] = known[0] if known else None
    for index, path in enumerate(paths):
        paths[index] = "" if path is None else path


def _unique(name: str, used: set[str]) -> str:
    candidate, counter = name, 1
    while candidate in used:
        candidate = f"{name}_{counter}"
        counter += 1
    used.add(candidate)
    return candidate


@functools.lru_cache(maxsize=1)
def max_runtime_ir_version() -> int:
    """The newest ONNX IR version the installed ONNX Runtime loads (probed with a tiny model)."""
    for version in range(onnx.IR_VERSION, 6, -1):
        model = _identity_model(version)
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - a refusal is the answer we are probing for
            continue
        return version
    raise LoweringError("the installed onnxruntime loads no ONNX IR version from 7 up")


def _identity_model(ir_version: int) -> onnx.ModelProto:
    helper = onnx.helper
    value = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    output = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [value], [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    return model


def validate(model: onnx.ModelProto) -> None:
    """``onnx.checker`` with full check, then strict shape inference with type checks."""
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise LoweringError(f"the exported ONNX model is invalid: {str(error).splitlines()[0]}") from error
