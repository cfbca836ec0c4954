"""Graph helpers over the IR (a ``torch.fx.GraphModule`` in fxpress's canonical dialect).

The canonical dialect is what ``torch.export`` (non-strict) produces before decompositions: ATen
operators such as ``aten.conv2d.default`` and ``aten.linear.default`` as ``call_function`` nodes,
parameters and buffers as ``get_attr`` nodes, flat tensor inputs as placeholders and a flat tuple
of tensors as output. ``compiler.capture`` normalises every front end to it.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterator

import torch
import torch.fx as fx

from compiler import meta

aten = torch.ops.aten


def op_name(node: fx.Node) -> str:
    """A short, stable name for a node's operator: ``aten.conv2d``, ``placeholder``, ..."""
    if node.op != "call_function":
        return node.op
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        namespace = target.namespace
        return f"{namespace}.{target._schema.name.split('::')[-1]}"
    return getattr(target, "__name__", str(target))


def call_nodes(gm: fx.GraphModule) -> Iterator[fx.Node]:
    """The ``call_function`` nodes of ``gm`` in topological order."""
    return (node for node in gm.graph.nodes if node.op == "call_function")


def op_histogram(gm: fx.GraphModule) -> Counter:
    """Count of ``call_function`` nodes per operator name."""
    return Counter(op_name(node) for node in call_nodes(gm))


def get_attribute(gm: fx.GraphModule, qualified_name: str) -> torch.Tensor:
    """The tensor a ``get_attr`` target names, such as ``layer1.0.conv1.weight``."""
    owner_path, _, attribute = qualified_name.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    return getattr(owner, attribute)


def set_attribute(gm: fx.GraphModule, qualified_name: str, tensor: torch.Tensor) -> None:
    """Store ``tensor`` as a parameter-free buffer at ``qualified_name``, creating owners as needed."""
    owner_path, _, attribute = qualified_name.rpartition(".")
    owner: torch.nn.Module = gm
    for part in owner_path.split(".") if owner_path else []:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    tensor = tensor.detach()
    if attribute in owner._parameters:
        owner._parameters[attribute] = torch.nn.Parameter(tensor, requires_grad=False)
    elif attribute in owner._buffers or not hasattr(owner, attribute):
        owner.register_buffer(attribute, tensor)
    else:
        raise ValueError(f"cannot store a tensor at {qualified_name!r}: the name is taken")


def free_attribute_name(gm: fx.GraphModule, base: str) -> str:
    """``base`` if no attribute has that name yet, else ``base_1``, ``base_2``, ..."""
    candidate, index = base, 0
    while _has_attribute(gm, candidate):
        index += 1
        candidate = f"{base}_{index}"
    return candidate


def _has_attribute(gm: fx.GraphModule, qualified_name: str) -> bool:
    try:
        get_attribute(gm, qualified_name)
    except AttributeError:
        return False
    return True


def add_get_attr(gm: fx.GraphModule, base_name: str, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register ``tensor`` under a free name and insert a ``get_attr`` node for it before ``before``."""
    name = free_attribute_name(gm, base_name)
    set_attribute(gm, name, tensor)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta[meta.VAL] = tensor
    return node


def used_attribute_names(gm: fx.GraphModule) -> set[str]:
    """Targets of all ``get_attr`` nodes."""
    return {node.target for node in gm.graph.nodes if node.op == "get_attr"}


def drop_unused_attributes(gm: fx.GraphModule) -> int:
    """Delete parameters and buffers that no ``get_attr`` node reads; return elements dropped."""
    used = used_attribute_names(gm)
    dropped = 0
    for name, tensor in list(_named_tensors(gm)):
        if name not in used:
            owner_path, _, attribute = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            dropped += tensor.numel()
            delattr(owner, attribute)
    return dropped


def _named_tensors(gm: fx.GraphModule) -> Iterator[tuple[str, torch.Tensor]]:
    yield from gm.named_parameters(remove_duplicate=False)
    yield from gm.named_buffers(remove_duplicate=False)


def parameter_count(gm: fx.GraphModule) -> int:
    """Elements of the distinct floating-point tensors the graph reads (tied weights count once)."""
    seen: dict[int, int] = {}
    for name in used_attribute_names(gm):
        tensor = get_attribute(gm, name)
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            seen[id(tensor)] = tensor.numel()
    return sum(seen.values())


def node_parameter_count(gm: fx.GraphModule, node: fx.Node) -> int:
    """Elements of floating-point tensors ``node`` reads directly through ``get_attr`` inputs."""
    total = 0
    for input_node in node.all_input_nodes:
        if input_node.op == "get_attr":
            tensor = get_attribute(gm, input_node.target)
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                total += tensor.numel()
    return total


def module_path(node: fx.Node) -> str:
    """The PyTorch module path a node came from (``""`` for the root module)."""
    return node.meta.get(meta.MODULE_PATH, "")


def describe(node: fx.Node) -> str:
    """``node name (op) at module path`` for messages."""
    where = module_path(node) or "<root>"
    return f"{node.name} ({op_name(node)}) in module {where!r}"


def single_user(node: fx.Node) -> fx.Node | None:
    """The only user of ``node``, or None when it has zero or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def fingerprint(gm: fx.GraphModule) -> str:
    """Hash of the graph's code and of every tensor's identity and version counter.

    In-place edits bump a tensor's ``_version``, and replacing a tensor changes its identity, so
    any change to parameters shows up without hashing their contents.
    """
    digest = hashlib.sha256(str(gm.graph).encode())
    for name, tensor in sorted(_named_tensors(gm), key=lambda item: item[0]):
        digest.update(f"{name}:{tensor.data_ptr()}:{tensor._version}:{tuple(tensor.shape)}".encode())
    return digest.hexdigest()


def graph_text(gm: fx.GraphModule) -> str:
    """One line per node with shape, dtype and module path: the format of ``dump_dir`` files."""
    lines = []
    for node in gm.graph.nodes:
        args = ", ".join(_format_argument(arg) for arg in node.args)
        shape = node.meta.get(meta.SHAPE)
        where = module_path(node)
        comment = f"  # {list(shape) if shape is not None else '-'} {node.meta.get(meta.DTYPE, '')}"
        comment += f" @ {where}" if where else ""
        target = node.target if node.op == "get_attr" else op_name(node)
        lines.append(f"%{node.name} = {target}({args}){comment}")
    return "\n".join(lines) + "\n"


def _format_argument(argument: object) -> str:
    if isinstance(argument, fx.Node):
        return f"%{argument.name}"
    if isinstance(argument, (list, tuple)):
        return "[" + ", ".join(_format_argument(item) for item in argument) + "]"
    return repr(argument)


def node_macs(node: fx.Node, inputs: list[object], output: object) -> int:
    """Multiply-accumulates of one node given its concrete inputs and output (0 for cheap ops)."""
    if node.op != "call_function" or not isinstance(output, torch.Tensor):
        return 0
    formula = _MAC_FORMULAS.get(node.target)
    return int(formula(inputs, output)) if formula else 0


def _conv_macs(inputs: list[object], output: torch.Tensor) -> int:
    weight = inputs[1]
    return output.numel() * math.prod(weight.shape[1:])


def _linear_macs(inputs: list[object], output: torch.Tensor) -> int:
    return output.numel() * inputs[1].shape[-1]


def _matmul_macs(inputs: list[object], output: torch.Tensor) -> int:
    return output.numel() * inputs[0].shape[-1]


def _addmm_macs(inputs: list[object], output: torch.Tensor) -> int:
    return output.numel() * inputs[1].shape[-1]


def _attention_macs(inputs: list[object], output: torch.Tensor) -> int:
    query, key, value = inputs[:3]
    rows = math.prod(query.shape[:-1])
    return rows * key.shape[-2] * (query.shape[-1] + value.shape[-1])


_MAC_FORMULAS = {
    aten.conv1d.default: _conv_macs,
    aten.conv2d.default: _conv_macs,
    aten.conv3d.default: _conv_macs,
    aten.convolution.default: _conv_macs,
    aten.linear.default: _linear_macs,
    aten.matmul.default: _matmul_macs,
    aten.mm.default: _matmul_macs,
    aten.bmm.default: _matmul_macs,
    aten.addmm.default: _addmm_macs,
    aten.scaled_dot_product_attention.default: _attention_macs,
}


def erase_unused(gm: fx.GraphModule, nodes: list[fx.Node]) -> int:
    """Erase those of ``nodes`` that have no users (and the tensors only they read); return count."""
    erased = 0
    for node in reversed(nodes):
        if node.graph is gm.graph and not node.users and node.op in ("get_attr", "call_function"):
            gm.graph.erase_node(node)
            erased += 1
    drop_unused_attributes(gm)
    return erased


def tensor_of(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    """The constant tensor behind a ``get_attr`` node, else None."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = get_attribute(gm, node.target)
        return value if isinstance(value, torch.Tensor) else None
    return None


def is_shared(node: fx.Node) -> bool:
    """True when a ``get_attr`` node's tensor is read by more than one node.

    Counts the users of every ``get_attr`` node reading the same target, or the same tensor under
    another name (tied weights).
    """
    gm = node.graph.owning_module
    tensor = tensor_of(gm, node)
    readers = [
        other for other in node.graph.nodes
        if other.op == "get_attr" and (other.target == node.target or tensor_of(gm, other) is tensor)
    ]
    return sum(len(reader.users) for reader in readers) > 1


def node_records(gm: fx.GraphModule) -> list[dict[str, object]]:
    """One JSON-able record per operator node: op, module path, shape, dtype, params, MACs.

    Shapes and MACs come from the last probe run (``compiler.probe.run_annotated``).
    """
    return [
        {
            "name": node.name,
            "op": op_name(node),
            "module_path": module_path(node),
            "shape": list(node.meta[meta.SHAPE]) if node.meta.get(meta.SHAPE) is not None else None,
            "dtype": node.meta.get(meta.DTYPE),
            "params": node.meta.get(meta.PARAMS, 0),
            "macs": node.meta.get(meta.MACS, 0),
        }
        for node in call_nodes(gm)
    ]
