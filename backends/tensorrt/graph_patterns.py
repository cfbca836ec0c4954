"""Reading Q/DQ ONNX graphs the way TensorRT's explicit-quantisation fusions see them.

Mechanism only, no rules: constants and their values, where a tensor comes from (a
DequantizeLinear, a constant weight), which ops carry weights, and which Adds are residual adds
that TensorRT fuses into a convolution. Topology comes from onnx-graphsurgeon; ancestry and
path lengths from a networkx DAG over the nodes (ONNX graphs are topologically sorted, so graph
order is a topological order). The linter (:mod:`backends.tensorrt.lint`) builds on this.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx_graphsurgeon.logger import G_LOGGER

from compiler.errors import ArtifactError

logger = logging.getLogger(__name__)

MODULE_PATH_KEY = "fxpress.module_path"  # the node metadata key that backends.onnx.export writes
QUANTIZE = "QuantizeLinear"
DEQUANTIZE = "DequantizeLinear"
QDQ_OPS = frozenset({QUANTIZE, DEQUANTIZE})
CONVS = frozenset({"Conv", "ConvTranspose"})
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# Single-reader ops a conv's output may pass through on its way to a residual add (TensorRT fuses them).
#: Layers TensorRT moves a DequantizeLinear forward through ("Q/DQ propagation": they commute with it).
COMMUTING_OPS = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"})
_BACKBONE_CHAIN = frozenset({"BatchNormalization", "Relu", "Clip", "LeakyRelu"})
ResidualAdd = tuple[int, int, str]  # (conv-side input index, skip input index, backbone conv name)


@contextlib.contextmanager
def quiet_graphsurgeon() -> Iterator[None]:
    """Silence graph-surgeon's console warnings (missing ``colored``, FP8 casts); our logging says what matters."""
    saved = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.ERROR
    try:
        yield
    finally:
        G_LOGGER.severity = saved


class QdqGraph:
    """A graph-surgeon graph with the lookups the Q/DQ rules need, keyed by node position."""

    def __init__(self, graph: gs.Graph, module_paths: Mapping[str, str] | None = None):
        self.graph = graph
        self.nodes: list[gs.Node] = list(graph.nodes)
        self.module_paths = dict(module_paths or {})
        self._positions = {id(node): index for index, node in enumerate(self.nodes)}
        self._by_name = {node.name: node for node in reversed(self.nodes)}  # the first of a repeated name
        self._outputs = {id(tensor) for tensor in graph.outputs}
        self.dag = self._build_dag()

    def _build_dag(self) -> nx.DiGraph:
        """Producer -> consumer edges; an edge into a Q or DQ weighs 0 so path lengths skip Q/DQ nodes."""
        dag = nx.DiGraph()
        dag.add_nodes_from(range(len(self.nodes)))
        for index, node in enumerate(self.nodes):
            for tensor in node.inputs:
                producer = self.producer(tensor)
                if producer is not None:
                    dag.add_edge(self.position(producer), index, weight=0 if node.op in QDQ_OPS else 1)
        return dag

    def position(self, node: gs.Node) -> int:
        """The node's index in graph order."""
        return self._positions[id(node)]

    def node(self, name: str) -> gs.Node:
        """The node called ``name``."""
        return self._by_name[name]

    def module_path(self, node: gs.Node) -> str | None:
        """The PyTorch module path the exporter recorded for the node, if any."""
        return self.module_paths.get(node.name)

    def producer(self, tensor: gs.Tensor) -> gs.Node | None:
        """The node that writes ``tensor`` (None for graph inputs, initializers and empty inputs)."""
        if tensor is None or tensor.is_empty() or not tensor.inputs:
            return None
        return tensor.inputs[0]

    def producer_op(self, tensor: gs.Tensor) -> str | None:
        """The op type of the tensor's producer, or None."""
        producer = self.producer(tensor)
        return None if producer is None else producer.op

    def single_consumer(self, tensor: gs.Tensor) -> bool:
        """Whether exactly one node reads ``tensor`` and it is not a graph output."""
        return len(tensor.outputs) == 1 and id(tensor) not in self._outputs

    def is_constant(self, tensor: gs.Tensor) -> bool:
        """An initializer or the output of a Constant node."""
        return isinstance(tensor, gs.Constant) or self.producer_op(tensor) == "Constant"

    def is_dequantized(self, tensor: gs.Tensor) -> bool:
        """Whether the tensor is quantised: a DequantizeLinear's output, or one moved forward by TensorRT.

        TensorRT propagates a DequantizeLinear forward through commuting layers (max-pooling,
        reshapes, transposes; :data:`COMMUTING_OPS`), so their outputs count as quantised too.
        """
        return self.dequantizer(tensor) is not None

    def dequantizer(self, tensor: gs.Tensor) -> gs.Node | None:
        """The DequantizeLinear whose output ``tensor`` is, directly or through commuting layers, else None."""
        producer = self.producer(tensor)
        while producer is not None and producer.op in COMMUTING_OPS and producer.inputs:
            producer = self.producer(producer.inputs[0])
        return producer if producer is not None and producer.op == DEQUANTIZE else None

    def is_weight(self, tensor: gs.Tensor) -> bool:
        """A constant, a DequantizeLinear of a constant, or a Q/DQ pair around a constant."""
        if self.is_constant(tensor):
            return True
        producer = self.producer(tensor)
        return producer is not None and producer.op in QDQ_OPS and self.is_weight(producer.inputs[0])

    def constant_values(self, tensor: gs.Tensor | None) -> np.ndarray | None:
        """The values of an initializer or a Constant node's output, else None."""
        if tensor is None or tensor.is_empty():
            return None
        if isinstance(tensor, gs.Constant):
            with quiet_graphsurgeon():
                return np.asarray(tensor.values)
        producer = self.producer(tensor)
        if producer is None or producer.op != "Constant":
            return None
        return _constant_attribute(producer.attrs)

    def tensor_type(self, tensor: gs.Tensor | None) -> int | None:
        """The ONNX element type (``onnx.TensorProto`` enum) of a tensor, when known."""
        if tensor is None or tensor.is_empty():
            return None
        producer = self.producer(tensor)
        if producer is not None and producer.op == "Constant" and isinstance(producer.attrs.get("value"), gs.Constant):
            tensor = producer.attrs["value"]
        return onnx_type(getattr(tensor, "export_dtype", None) or tensor.dtype)

    def quantized_type(self, node: gs.Node) -> int | None:
        """The integer (or FP8) type a Q or DQ works in: its zero point's type, else ONNX's default."""
        zero_point = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
        if zero_point is not None:
            return self.tensor_type(zero_point)
        if node.op == QUANTIZE:  # no zero point: opset 21's output_dtype, else uint8
            return node.attrs.get("output_dtype") or onnx.TensorProto.UINT8
        producer = self.producer(node.inputs[0])
        if producer is not None and producer.op == QUANTIZE:
            return self.quantized_type(producer)
        return self.tensor_type(node.inputs[0])


def onnx_type(dtype: object) -> int | None:
    """An ONNX element type from a graph-surgeon dtype (NumPy, ml_dtypes or already an ONNX enum)."""
    if dtype is None:
        return None
    if isinstance(dtype, int):
        return dtype
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (TypeError, KeyError, ValueError):
        return None


def _constant_attribute(attrs: Mapping[str, object]) -> np.ndarray | None:
    """The value a Constant node holds, whichever of its attributes holds it."""
    if isinstance(attrs.get("value"), gs.Constant):
        with quiet_graphsurgeon():
            return np.asarray(attrs["value"].values)
    for key in ("value_float", "value_floats", "value_int", "value_ints"):
        if key in attrs:
            return np.asarray(attrs[key])
    return None


def weighted_inputs(graph: QdqGraph, node: gs.Node) -> tuple[gs.Tensor, gs.Tensor] | None:
    """(activation, weight) of a weighted op, or None when ``node`` is not one.

    Conv, ConvTranspose and Gemm always carry weights (input 1); a MatMul only when one input is
    a constant or a dequantised constant (a MatMul of two activations, as in attention, is not).
    """
    if node.op not in WEIGHTED_OPS or len(node.inputs) < 2:
        return None
    first, second = node.inputs[0], node.inputs[1]
    if node.op != "MatMul" or graph.is_weight(second):
        return first, second
    if graph.is_weight(first):
        return second, first
    return None


def backbone(graph: QdqGraph, tensor: gs.Tensor) -> tuple[gs.Node | None, bool]:
    """The conv whose output ``tensor`` is, and whether the way back went through a Q/DQ pair.

    Walks back through Q/DQ nodes, single-reader BatchNormalization/Relu/Clip/LeakyRelu and bias
    adds (an Add with a constant other input) until it reaches a Conv or ConvTranspose (the
    backbone) or anything else (no backbone).
    """
    through_pair = False
    producer = graph.producer(tensor)
    while producer is not None:
        if producer.op in CONVS:
            return producer, through_pair
        if producer.op in QDQ_OPS:
            through_pair = through_pair or producer.op == DEQUANTIZE
            tensor = producer.inputs[0]
        elif producer.op in _BACKBONE_CHAIN and graph.single_consumer(tensor):
            tensor = producer.inputs[0]
        elif producer.op == "Add" and (bias_input := _bias_add_input(graph, producer)) is not None:
            tensor = bias_input
        else:
            return None, through_pair
        producer = graph.producer(tensor)
    return None, through_pair


def _bias_add_input(graph: QdqGraph, node: gs.Node) -> gs.Tensor | None:
    """The non-constant input of an Add whose other input is a constant, else None."""
    if len(node.inputs) != 2:
        return None
    constant = [graph.is_constant(tensor) for tensor in node.inputs]
    if constant == [False, True]:
        return node.inputs[0]
    if constant == [True, False]:
        return node.inputs[1]
    return None


def residual_adds(graph: QdqGraph | gs.Graph | onnx.ModelProto) -> dict[str, ResidualAdd]:
    """Residual adds by node name: (conv-side input index, skip input index, backbone conv name).

    A residual add is an Add of two non-constant tensors, at least one of which has a backbone
    conv (see :func:`backbone`). With one backbone, that input is the conv side, unless the other
    input descends from the backbone conv itself (a conv whose output also feeds a side branch,
    as in ConvNeXt: no fusion, not residual). With two different backbones, the conv side is the
    input on the longer path (in nodes, Q/DQ nodes not counted) from the inputs' lowest common
    ancestor, input 0 on a tie or when they share no ancestor. The same definition as the
    compiler's placement (:func:`compiler.quant_policy.residual_inputs`) and NVIDIA ModelOpt's
    ``build_non_residual_input_map``.
    """
    view = as_qdq_graph(graph)
    found: dict[str, ResidualAdd] = {}
    for node in view.nodes:
        sides = _residual_sides(view, node)
        if sides is not None:
            found[node.name] = sides
    return found


def as_qdq_graph(graph: QdqGraph | gs.Graph | onnx.ModelProto) -> QdqGraph:
    """A :class:`QdqGraph` over a graph-surgeon graph or an ONNX model (which is not modified)."""
    if isinstance(graph, QdqGraph):
        return graph
    if isinstance(graph, onnx.ModelProto):
        return load_qdq_graph(graph)[0]
    return QdqGraph(graph)


def load_qdq_graph(model: onnx.ModelProto | str | Path) -> tuple[QdqGraph, onnx.ModelProto, str]:
    """A :class:`QdqGraph` over a checked private copy of ``model``, the copy, and a name for messages.

    Nodes without a name get ``<op>_<index>`` in the copy, so that every finding can point at one.

    Raises:
        ArtifactError: the file is missing or unreadable, or the model is not valid ONNX.
    """
    proto, source = _load(model)
    used = {node.name for node in proto.graph.node if node.name}
    for index, node in enumerate(proto.graph.node):
        if not node.name:
            node.name = _unique(f"{node.op_type}_{index}", used)
    paths = {node.name: prop.value for node in proto.graph.node for prop in node.metadata_props
             if prop.key == MODULE_PATH_KEY and prop.value}
    with quiet_graphsurgeon():
        return QdqGraph(gs.import_onnx(proto), paths), proto, source


def _load(model: onnx.ModelProto | str | Path) -> tuple[onnx.ModelProto, str]:
    """A checked copy of the model (the caller's is never touched) and a name for it in messages."""
    if isinstance(model, onnx.ModelProto):
        proto, source = onnx.ModelProto(), "<in-memory model>"
        proto.CopyFrom(model)
    else:
        source = str(model)
        try:
            proto = onnx.load(source)
        except (OSError, DecodeError, ValueError, RuntimeError) as error:
            raise ArtifactError(f"cannot read the ONNX model {source}: {error}") from error
    small = proto.ByteSize() < onnx.checker.MAXIMUM_PROTOBUF
    try:
        if small or not isinstance(model, onnx.ModelProto):  # over 2 GiB the checker needs the file
            onnx.checker.check_model(proto if small else source)
        else:
            logger.debug("%s is over 2 GiB and has no file: not run through onnx.checker", source)
    except (onnx.checker.ValidationError, ValueError) as error:
        raise ArtifactError(f"{source} is not a valid ONNX model: {' '.join(str(error).split())}") from error
    return proto, source


def _unique(name: str, used: set[str]) -> str:
    """``name``, or ``name_1``, ``name_2``... whichever is not yet used (and is now)."""
    candidate, suffix = name, 1
    while candidate in used:
        candidate, suffix = f"{name}_{suffix}", suffix + 1
    used.add(candidate)
    return candidate


def _residual_sides(graph: QdqGraph, node: gs.Node) -> ResidualAdd | None:
    """(conv side, skip, backbone name) when ``node`` is a residual add, else None."""
    if node.op != "Add" or len(node.inputs) != 2 or any(graph.is_constant(tensor) for tensor in node.inputs):
        return None
    backbones = [backbone(graph, tensor)[0] for tensor in node.inputs]
    if backbones[0] is None and backbones[1] is None:
        return None
    if backbones[0] is not None and backbones[1] is not None:
        if backbones[0] is backbones[1]:
            return None
        depths = _depths_from_common_ancestor(graph, node.inputs[0], node.inputs[1])
        conv_side = 0 if depths is None or depths[0] >= depths[1] else 1
        return conv_side, 1 - conv_side, backbones[conv_side].name
    conv_side = 0 if backbones[0] is not None else 1
    other = graph.producer(node.inputs[1 - conv_side])
    conv = graph.position(backbones[conv_side])
    if other is not None and (conv == graph.position(other) or conv in nx.ancestors(graph.dag, graph.position(other))):
        return None
    return conv_side, 1 - conv_side, backbones[conv_side].name


def _depths_from_common_ancestor(graph: QdqGraph, first: gs.Tensor, second: gs.Tensor) -> tuple[int, int] | None:
    """Longest paths (in nodes, Q/DQ not counted) to the tensors' producers from their lowest common ancestor."""
    producers = [graph.producer(first), graph.producer(second)]
    if producers[0] is None or producers[1] is None:
        return None
    ends = [graph.position(producer) for producer in producers]
    ancestries = [nx.ancestors(graph.dag, end) | {end} for end in ends]
    common = ancestries[0] & ancestries[1]
    if not common:
        return None
    lowest = max(common)  # graph order is topological: the latest common ancestor is the lowest
    return _longest_path(graph, lowest, ends[0], ancestries[0]), _longest_path(graph, lowest, ends[1], ancestries[1])


def _longest_path(graph: QdqGraph, start: int, end: int, region: set[int]) -> int:
    """Weighted length of the longest path from ``start`` to ``end`` through ``region``."""
    between = region & (nx.descendants(graph.dag, start) | {start})
    return nx.dag_longest_path_length(graph.dag.subgraph(between), weight="weight", default_weight=1)
