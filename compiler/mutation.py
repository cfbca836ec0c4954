"""In-place writes in a captured program: refused when they reach model state, removed otherwise.

``torch.export`` (from torch 2.6 on) returns a non-functional graph: ``x.add_(1)`` stays an
``aten.add_`` node and the graph signature no longer lists mutated inputs and buffers. Passes
assume value semantics (removing a ``clone`` is only correct when nothing writes through it), so:

- a write to a model input, parameter or buffer is refused: ONNX cannot express it;
- a write another node can observe (through a view, or to a tensor read elsewhere) is removed by
  functionalising the program (``run_decompositions({})``, which also leaves the dialect alone
  for graphs without such writes, because it only runs when one is found);
- a write nobody can observe (``relu_`` on a tensor only it reads) is left as it is.

Symbolic tracing runs Python code that does not touch a proxy for real, so ``self.count += 1``
happens during tracing and leaves no node: the version counters of parameters and buffers catch it.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from compiler import meta
from compiler.errors import CaptureError
from compiler.tracing_errors import source_line_from_stack_trace

logger = logging.getLogger(__name__)


def tensor_versions(model: torch.nn.Module) -> dict[str, int]:
    """Version counter of every parameter and buffer (in-place writes bump it)."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {name: tensor._version for name, tensor in tensors}


def refuse_changed_state(model: torch.nn.Module, versions: dict[str, int]) -> None:
    """Raise CaptureError if a parameter or buffer was written since ``versions`` was taken."""
    changed = [name for name, version in tensor_versions(model).items() if versions.get(name) != version]
    if changed:
        owner = changed[0].rpartition(".")[0]
        raise CaptureError(
            f"module {owner or '<root>'!r} writes to {changed[0]!r} during forward; an inference "
            "graph cannot. Remove the state update (e.g. a running counter) from forward",
            module_path=owner,
        )


def refuse_state_writes(program: torch.export.ExportedProgram) -> None:
    """Raise CaptureError naming the module and source line of a write to an input or state."""
    _refuse_signature_mutations(program.graph_signature)
    specs = {spec.arg.name: spec for spec in program.graph_signature.input_specs}
    for node in program.graph.nodes:
        for written in written_arguments(node):
            root = alias_root(written)
            if root.op == "placeholder" and root.name in specs:
                raise _state_write_error(node, specs[root.name])


def _refuse_signature_mutations(signature) -> None:
    """The same check for a functional program, whose signature lists what it mutates."""
    if signature.user_inputs_to_mutate:
        names = ", ".join(signature.user_inputs_to_mutate.values())
        raise CaptureError(
            f"the model mutates its input(s) {names} in place; ONNX cannot express that. "
            "Work on a copy (x = x.clone()) or use the out-of-place op"
        )
    if signature.buffers_to_mutate:
        name = next(iter(signature.buffers_to_mutate.values()))
        raise CaptureError(
            f"the model writes to buffer {name!r} during forward; an inference graph cannot. "
            "Remove the state update (e.g. a running counter) from forward",
            module_path=name.rpartition(".")[0],
        )


def functionalize_if_needed(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program without observable in-place writes (unchanged when it has none)."""
    if not any(_observable(node, written) for node in program.graph.nodes for written in written_arguments(node)):
        return program
    logger.info("capture: the graph writes in place through views; functionalising it")
    return program.run_decompositions({})


def written_arguments(node: fx.Node) -> list[fx.Node]:
    """The graph values ``node`` writes to in place (per its operator schema)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return []
    written = []
    for index, argument in enumerate(target._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
        if isinstance(value, fx.Node):
            written.append(value)
    return written


def alias_root(node: fx.Node) -> fx.Node:
    """The tensor ``node`` is a view of (following view and in-place ops back to their input)."""
    while _returns_alias(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _returns_alias(node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    returns = target._schema.returns
    return bool(returns) and returns[0].alias_info is not None


def _observable(node: fx.Node, written: fx.Node) -> bool:
    return alias_root(written) is not written or len(written.users) > 1


def _state_write_error(node: fx.Node, spec) -> CaptureError:
    path, _ = meta.module_path_from_stack(node.meta.get(meta.NN_MODULE_STACK))
    source = source_line_from_stack_trace(node.meta.get(meta.STACK_TRACE))
    where = f"module {path or '<root>'!r}"
    at = f" at {source}" if source else ""
    if spec.kind.name == "USER_INPUT":
        return CaptureError(
            f"{where} writes to the model input {spec.arg.name!r} in place ({node.target}){at}; "
            "ONNX cannot express that. Work on a copy (x = x.clone()) or use the out-of-place op",
            module_path=path, source=source,
        )
    owner = (spec.target or "").rpartition(".")[0]
    return CaptureError(
        f"{where} writes to {spec.kind.name.lower()} {spec.target!r} during forward ({node.target}){at}; "
        "an inference graph cannot. Remove the state update (e.g. a running counter) from forward",
        module_path=owner or path, source=source,
    )
