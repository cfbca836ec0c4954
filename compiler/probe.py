"""Running the IR on the probe batch.

Records per-node shapes, dtypes, MACs and parameter counts, and measures the numeric drift of
outputs against a reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from compiler import ir, meta


class _AnnotatingInterpreter(fx.Interpreter):
    """Runs the graph on concrete inputs and writes SHAPE, DTYPE, MACS and PARAMS into node.meta."""

    def run_node(self, node: fx.Node) -> object:
        result = super().run_node(node)
        if isinstance(result, torch.Tensor):
            node.meta[meta.SHAPE] = tuple(result.shape)
            node.meta[meta.DTYPE] = str(result.dtype).removeprefix("torch.")
        else:
            node.meta[meta.SHAPE] = None
            node.meta[meta.DTYPE] = type(result).__name__
        node.meta[meta.MACS] = ir.node_macs(node, _positional_values(self, node), result)
        node.meta[meta.PARAMS] = ir.node_parameter_count(self.module, node)
        return result


def _positional_values(interpreter: fx.Interpreter, node: fx.Node) -> list[object]:
    return [interpreter.env[arg] if isinstance(arg, fx.Node) else arg for arg in node.args]


#: Ops counted as Linear/matmul work by :func:`linear_mac_share`.
LINEAR_OPS = ("aten.linear", "aten.matmul", "aten.mm", "aten.bmm", "aten.addmm", "aten.scaled_dot_product_attention")


def linear_mac_share(gm: fx.GraphModule, inputs: tuple) -> float:
    """The share of the model's MACs (on ``inputs``) in Linear and matmul ops: above 0.5 for transformers."""
    run_annotated(gm, inputs)
    macs = {node: node.meta.get(meta.MACS, 0) for node in gm.graph.nodes if node.op == "call_function"}
    total = sum(macs.values())
    linear = sum(count for node, count in macs.items() if ir.op_name(node) in LINEAR_OPS)
    return linear / total if total else 0.0


def run_annotated(gm: fx.GraphModule, inputs: tuple) -> tuple[torch.Tensor, ...]:
    """Run ``gm`` on ``inputs`` without gradients, annotating every node; return flat outputs."""
    with torch.no_grad():
        outputs = _AnnotatingInterpreter(gm).run(*inputs)
    return tuple(pytree.tree_leaves(outputs))


def total_macs(gm: fx.GraphModule) -> int:
    """Sum of the MACS annotations (run :func:`run_annotated` first)."""
    return sum(node.meta.get(meta.MACS, 0) for node in gm.graph.nodes)


@dataclass(frozen=True)
class Drift:
    """How far outputs are from a reference: computed in float64 over all outputs together."""

    max_abs: float
    cosine: float
    sqnr_db: float | None  # None when outputs are identical (infinite SQNR)
    reference_max_abs: float

    def to_dict(self) -> dict[str, float | None]:
        """JSON-able form."""
        return {
            "max_abs": self.max_abs,
            "cosine": self.cosine,
            "sqnr_db": self.sqnr_db,
            "reference_max_abs": self.reference_max_abs,
        }

    @property
    def relative_max_abs(self) -> float:
        """``max_abs`` as a fraction of the reference's largest magnitude."""
        return self.max_abs / self.reference_max_abs if self.reference_max_abs else self.max_abs


def flatten_float64(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """All floating outputs concatenated into one float64 vector."""
    parts = [t.detach().reshape(-1).to(torch.float64) for t in tensors if t.is_floating_point()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def drift(outputs: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...]) -> Drift:
    """Max abs difference, cosine similarity and SQNR of ``outputs`` against ``reference``."""
    if len(outputs) != len(reference):
        raise ValueError(f"{len(outputs)} outputs against {len(reference)} reference outputs")
    for output, expected in zip(outputs, reference, strict=True):
        if output.shape != expected.shape:
            raise ValueError(f"output shape {tuple(output.shape)} != reference {tuple(expected.shape)}")
    actual, expected = flatten_float64(outputs), flatten_float64(reference)
    if actual.numel() == 0:
        return Drift(0.0, 1.0, None, 0.0)
    error = actual - expected
    max_abs = float(error.abs().max())
    noise = float(error.square().sum())
    signal = float(expected.square().sum())
    norms = float(actual.norm() * expected.norm())
    cosine = float(actual.dot(expected) / norms) if norms > 0 else float(max_abs == 0.0)
    sqnr = None if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf
    return Drift(max_abs, cosine, sqnr, float(expected.abs().max()))


def within_tolerance(
    outputs: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...], rtol: float, atol: float
) -> bool:
    """Elementwise ``|out - ref| <= atol + rtol * |ref|`` in float64 for every output."""
    return all(
        torch.allclose(out.to(torch.float64), ref.to(torch.float64), rtol=rtol, atol=atol)
        for out, ref in zip(outputs, reference, strict=True)
    )


def output_step(tensor: torch.Tensor) -> float:
    """One 8-bit quantisation step of ``tensor``'s range: ``(max - min) / 255`` (0 for constants)."""
    values = tensor.detach().to(torch.float64)
    return float(values.max() - values.min()) / 255.0 if values.numel() else 0.0


def within_steps(
    outputs: tuple[torch.Tensor, ...], simulated: tuple[torch.Tensor, ...], steps: float = 1.0
) -> float:
    """The fraction of elements where ``|out - sim| <= steps * output_step(sim)``, over all outputs."""
    inside = total = 0
    for out, sim in zip(outputs, simulated, strict=True):
        if not sim.dtype.is_floating_point:
            inside += int((out == sim).sum())
        else:
            bound = steps * output_step(sim)
            inside += int(((out.to(torch.float64) - sim.to(torch.float64)).abs() <= bound + 1e-12).sum())
        total += sim.numel()
    return inside / total if total else 1.0
