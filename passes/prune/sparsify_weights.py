"""Unstructured magnitude pruning: zero the smallest weights of every conv and linear.

The seeds' first method (L1 / threshold pruning). Each float conv or linear weight loses either the
``sparsity`` fraction of its entries with the smallest magnitude (per layer, or over all layers at
once with ``scope="global"``), or every entry with ``|w| < threshold``. The ledger lists each
layer's sparsity.

The model does **not** get faster or smaller in ONNX Runtime: its CPU kernels (MLAS) are dense, so a
zero costs what any other value costs, and the ONNX file stores every zero. The pass exists to
study sensitivity and for runtimes with sparse kernels; for speed on ONNX Runtime use structured
pruning (``prune_channels``), which removes whole channels.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.fx as fx

from compiler import ir
from compiler.errors import PassError
from compiler.pass_base import Pass, PassContext, PassResult

_WEIGHTED = ("aten.conv2d", "aten.conv1d", "aten.linear")
SPEED_NOTE = "no speed-up on ONNX Runtime: its CPU kernels are dense, zeros cost what other values cost"


class SparsifyWeights(Pass):
    """Zero conv and linear weights by magnitude (a fraction per layer or global) or by threshold."""

    name = "sparsify_weights"
    exact = False
    default_options = {"sparsity": 0.5, "threshold": None, "scope": "layer", "protect": []}

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """A sparsity in [0, 1), or a threshold >= 0, and a known scope."""
        super().requires(gm, ctx)
        sparsity, threshold = self.options["sparsity"], self.options["threshold"]
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
                raise PassError(f"pass {self.name!r}: threshold must be a number >= 0, got {threshold!r}")
        elif isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise PassError(f"pass {self.name!r}: sparsity is the fraction of weights zeroed, in [0, 1); "
                            f"got {sparsity!r}")
        if self.options["scope"] not in ("layer", "global"):
            raise PassError(f"pass {self.name!r}: scope must be 'layer' or 'global', got {self.options['scope']!r}")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Zero the chosen entries in place of each weight; report sparsity per layer."""
        weights = self._weights(gm)
        limits = self._limits(gm, weights)
        per_layer, zeroed, total = {}, 0, 0
        for path, name in weights.items():
            weight = ir.get_attribute(gm, name)
            by_threshold = self.options["threshold"] is not None
            kept = weight.abs() >= limits[name] if by_threshold else weight.abs() > limits[name]
            ir.set_attribute(gm, name, (weight * kept).contiguous())
            zeros = int((~kept).sum())
            per_layer[path] = round(zeros / weight.numel(), 4)
            zeroed, total = zeroed + zeros, total + weight.numel()
        return PassResult(gm, modified=zeroed > 0, stats={
            "sparsity": round(zeroed / total, 4) if total else 0.0, "layers": per_layer, "speed": SPEED_NOTE,
        })

    def _weights(self, gm: fx.GraphModule) -> dict[str, str]:
        """Module path (or node name) -> weight attribute of every unprotected float conv and linear."""
        weights = {}
        for node in gm.graph.nodes:
            if node.op != "call_function" or ir.op_name(node) not in _WEIGHTED:
                continue
            argument, path = node.args[1], ir.module_path(node) or node.name
            if not (isinstance(argument, fx.Node) and argument.op == "get_attr"):
                continue
            if any(fnmatch.fnmatchcase(path, pattern) for pattern in self.options["protect"]):
                continue
            if ir.get_attribute(gm, argument.target).is_floating_point():
                weights[path] = argument.target
        return weights

    def _limits(self, gm: fx.GraphModule, weights: dict[str, str]) -> dict[str, float]:
        """Per weight: entries below the threshold, or at most this magnitude (sparsity), are zeroed."""
        if self.options["threshold"] is not None:
            return dict.fromkeys(weights.values(), float(self.options["threshold"]))
        sparsity = self.options["sparsity"]
        magnitudes = {name: ir.get_attribute(gm, name).detach().abs().flatten() for name in weights.values()}
        if self.options["scope"] == "global" and magnitudes:
            return dict.fromkeys(magnitudes, _kth(torch.cat(list(magnitudes.values())), sparsity))
        return {name: _kth(values, sparsity) for name, values in magnitudes.items()}


def _kth(magnitudes: torch.Tensor, sparsity: float) -> float:
    """The largest magnitude zeroed when ``sparsity`` of ``magnitudes`` are zeroed (-1: none)."""
    count = int(sparsity * magnitudes.numel())
    return float(torch.kthvalue(magnitudes.float(), count).values) if count else -1.0
