"""``reconstruct``: refit each int8 layer to what the float model computes, on the int8 model's own inputs.

GPTQ and bias correction fit a layer to its *float* input: they minimise ``|W_q x - W x|``. In
the int8 model the layer reads ``x_q``, the output of every quantised layer before it, and the
errors of those layers add up along the network. This pass runs the fake-quantised IR (after
``insert_qdq``) and the float model it stands for side by side over calibration samples, layer
by layer in graph order, and refits each conv/linear to the float model's output *from the int8
model's input*: ``min |W_q x_q + b - (W x + b_fp)|^2`` (asymmetric reconstruction, as in
BRECQ-style block reconstruction and GPTAQ, solved here in closed form per layer). For each layer:

1. the moments ``E[x_q x_q^T]`` and ``E[x_q x^T]`` of the input patches (a constant 1 appended
   for the bias) are measured on both halves of the samples, output positions subsampled;
2. candidates are fitted on one half: the least-squares optimum at a few ridge strengths (pulled
   towards the float weights), then rounded to the layer's integer grid with GPTQ, whose error
   feedback lands last on the bias, which stays free; and a bias-only refit of the current integers;
3. each candidate's output error is measured on the other half, the best (or the layer as it was)
   is refitted on both halves and written: new int8 weights (same scales) and int32 bias.

Later layers are then fitted to the refitted earlier ones. Scales and activation ranges stay as
calibrated, so the runtime runs the same kernels; only integers change. The float reference needs
the float tensor each dequantised weight and bias stands for (``meta.FLOAT_SOURCE``, written by
``insert_qdq``); a layer without it is left alone. On EfficientNet-Lite0 (all layers int8, 8-bit
pixel input, 128 samples) the model output's SQNR against fp32 rose from 24.7 to 27.4 dB.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.fx as fx

from compiler import ir, meta
from compiler.errors import PassError
from compiler.pass_base import Pass, PassContext, PassResult
from compiler.quant_ops import DEQUANTIZE_PER_CHANNEL, QUANTIZE_DEQUANTIZE
from compiler.quant_policy import WEIGHTED
from compiler.threads import fixed_threads
from passes.quant.calibration_data import CalibrationBatches
from passes.quant.gptq import batch_samples, gptq_round, pair_option

_LAYERS = ("aten.conv2d", "aten.linear")
_INT32_LIMIT = 2.0**31 - 1


class _PerBatch(list):
    """One value per sample batch (as opposed to a constant shared by every batch)."""


class Reconstruct(Pass):
    """Refit every int8 conv/linear, in graph order, to the float model's output on the int8 model's input."""

    name = "reconstruct"
    exact = False
    needs_calibration = True
    # rows: output positions per half and layer, at least ``rows`` and ``rows_per_column`` per input column.
    default_options: dict[str, Any] = {"samples": 128, "batch_size": 16, "ridge": (0.01, 0.1, 1.0), "rows": 2048,
                                       "rows_per_column": 64, "gptq_damping": 0.01}

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Calibration data and sane options."""
        super().requires(gm, ctx)
        if not isinstance(ctx.calibration_data, CalibrationBatches):
            raise PassError(f"pass {self.name!r} needs calibration_data to run the int8 and float models on")
        for key in ("samples", "batch_size", "rows", "rows_per_column"):
            value = self.options[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PassError(f"pass {self.name!r}: option {key} must be a positive int, got {value!r}")
        ridge = self.options["ridge"]
        if not isinstance(ridge, (tuple, list)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in ridge):
            raise PassError(f"pass {self.name!r}: option ridge is a list of strengths > 0, got {ridge!r}")
        damping = self.options["gptq_damping"]
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 < damping < 1:
            raise PassError(f"pass {self.name!r}: option gptq_damping must lie in (0, 1), got {damping!r}")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Run the two models in lockstep and refit each layer on the way; one thread, for reproducible integers."""
        started = time.perf_counter()
        batches = sample_batches(ctx.calibration_data, self.options["samples"], self.options["batch_size"])
        if len(batches) < 2:
            return PassResult(gm, modified=False, stats={"skipped": "needs at least 2 sample batches "
                                                         f"(batch_size {self.options['batch_size']})"})
        layers = {node: layer for node in ir.call_nodes(gm) if (layer := reconstructible(node)) is not None}
        rows: list[dict] = []
        with fixed_threads(1), torch.no_grad():
            Lockstep(gm, batches, lambda op, runner: rows.append(self._refit(gm, layers[op], runner)),
                     set(layers)).run()
        changed = [row for row in rows if row["chosen"] != "kept"]
        if changed:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, modified=bool(changed), stats={
            "samples": sum(batch_samples(batch) for batch in batches), "refitted": len(changed), "layers": rows,
            "seconds": round(time.perf_counter() - started, 2)})

    def _refit(self, gm: fx.GraphModule, layer: Layer, runner: Lockstep) -> dict:
        op = layer.op
        args = runner.arguments(op, quantized=True)
        target = layer.float_weights(runner)
        moments = [measure(op, args, runner.value(op.args[0], False), half, self.options, target) for half in (0, 1)]
        current = layer.current_weights(runner)
        scales = ir.get_attribute(gm, layer.weight.args[1].target).double()
        fits = self._candidates(target, current, scales, layer)
        errors = {name: output_error(fit(*moments[0][:2])[0], moments[1], target) for name, fit in fits.items()}
        chosen = min(errors, key=errors.get)
        signal = moments[1][2]
        row = {"module_path": ir.module_path(op) or op.name, "chosen": chosen,
               "held_out_sqnr_db": {"before": _db(signal, errors["kept"]), "after": _db(signal, errors[chosen])}}
        if chosen != "kept":
            shares = [half[3] / (moments[0][3] + moments[1][3]) for half in moments]  # by patch counts
            both = tuple(shares[0] * first + shares[1] * second
                         for first, second in zip(moments[0][:2], moments[1][:2], strict=True))
            weights, integers = fits[chosen](*both)
            why = layer.write(gm, weights, integers)
            if why:
                row.update(chosen="kept", why=why)
            else:
                runner.refresh(layer)
        return row

    def _candidates(self, target: torch.Tensor, current: torch.Tensor, scales: torch.Tensor, layer: Layer) -> dict:
        """Name -> fit(moment_qq, moment_qf) -> (weights incl. bias column, integers or None)."""
        fits = {"kept": lambda qq, qf: (current, None)}
        if layer.has_bias:
            fits["bias"] = lambda qq, qf: (refit_bias(current, target, qq, qf), None)
        for strength in self.options["ridge"]:
            fits[f"least squares, ridge {strength:g}"] = lambda qq, qf, strength=strength: self._least_squares(
                target, scales, qq, qf, strength, layer)
        return fits

    def _least_squares(self, target: torch.Tensor, scales: torch.Tensor, qq: torch.Tensor, qf: torch.Tensor,
                       strength: float, layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
        optimum = ridge_solution(target, qq, qf, strength)
        step = scales.reshape(target.shape[:2])
        free = 1 if layer.has_bias else 0
        steps = gptq_round(optimum, step, qq, layer.largest, float(self.options["gptq_damping"]), free=free)
        return steps * step.unsqueeze(2), steps[:, :, :steps.shape[2] - free]


def _db(signal: float, error: float) -> float | None:
    total = signal + error  # error is measured up to the constant ``signal``
    return round(10 * math.log10(signal / total), 2) if total > 0 and signal > 0 else None


class Layer:
    """A conv/linear whose weight (and bias, if any) are dequantised from integers, with their float sources."""

    def __init__(self, op: fx.Node, weight: fx.Node, bias: fx.Node | None, largest: int):
        self.op, self.weight, self.bias, self.largest = op, weight, bias, largest
        self.has_bias = bias is not None

    def float_weights(self, runner: Lockstep) -> torch.Tensor:
        """``(groups, rows, K [+1])`` float64: the float model's weights, its bias last."""
        return self._stack(runner.value(self.weight, False), runner.value(self.bias, False) if self.bias else None)

    def current_weights(self, runner: Lockstep) -> torch.Tensor:
        """The same, as the int8 model has them now."""
        return self._stack(runner.value(self.weight, True), runner.value(self.bias, True) if self.bias else None)

    def _stack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        groups = _groups(self.op)
        shaped = weight.double().reshape(groups, weight.shape[0] // groups, -1)
        if bias is None:
            return shaped
        return torch.cat([shaped, bias.double().reshape(groups, -1, 1)], dim=2)

    def write(self, gm: fx.GraphModule, weights: torch.Tensor, integers: torch.Tensor | None) -> str | None:
        """Store new integers (if given) and the bias column; a reason instead if the bias overflows int32."""
        bias_integers = None
        if self.bias is not None:
            step = ir.get_attribute(gm, self.bias.args[1].target).double()
            bias_integers = torch.round(weights[:, :, -1].reshape(-1) / step)
            if bias_integers.abs().max() > _INT32_LIMIT:
                return "the refitted bias overflows int32"
        if integers is not None:
            old = ir.get_attribute(gm, self.weight.args[0].target)
            _replace_integers(gm, self.weight, integers.reshape(old.shape).to(old.dtype))
        if bias_integers is not None:
            _replace_integers(gm, self.bias, bias_integers.to(torch.int32))
        return None


def _replace_integers(gm: fx.GraphModule, dequantize: fx.Node, integers: torch.Tensor) -> None:
    """Point ``dequantize`` at a new integer tensor (the old one may be shared with a snapshot of the IR)."""
    old = dequantize.args[0]
    new = ir.add_get_attr(gm, f"{old.target}_reconstructed", integers, before=dequantize)
    dequantize.replace_input_with(old, new)


def reconstructible(op: fx.Node) -> Layer | None:
    """The op as a :class:`Layer` if its weight and bias are dequantised integers with float sources, else None."""
    if ir.op_name(op) not in _LAYERS:
        return None
    weight = op.args[WEIGHTED[ir.op_name(op)][1]]
    bias = op.args[2] if len(op.args) > 2 else op.kwargs.get("bias")
    if not _dequantized_from_float(weight, "weight") or len(weight.users) != 1 or weight.args[2] != 0:
        return None
    if bias is not None and not (_dequantized_from_float(bias, "bias") and len(bias.users) == 1):
        return None
    return Layer(op, weight, bias, int(weight.meta[meta.QUANT_PARAMS]["largest"]))


def _dequantized_from_float(node: object, kind: str) -> bool:
    return (isinstance(node, fx.Node) and node.target is DEQUANTIZE_PER_CHANNEL
            and node.meta.get(meta.QUANT_PARAMS, {}).get("kind") == kind and meta.FLOAT_SOURCE in node.meta
            and all(isinstance(arg, fx.Node) and arg.op == "get_attr" for arg in node.args[:2]))


def _groups(op: fx.Node) -> int:
    return op.args[6] if ir.op_name(op) == "aten.conv2d" and len(op.args) > 6 else 1


# --------------------------------------------------------------------------------------------
# The two models in lockstep


class Lockstep:
    """Runs the fake-quantised graph and its float counterpart node by node over the same sample batches.

    The float run reads each dequantised weight's float source and passes activations through
    the fake-quantisers unchanged. ``hook(op, self)`` is called before each op in ``watched``
    runs, with both models' inputs to it at hand; values are freed after their last use.
    """

    def __init__(self, gm: fx.GraphModule, batches: list[tuple[torch.Tensor, ...]], hook, watched: set[fx.Node]):
        self.gm, self.batches, self.hook, self.watched = gm, batches, hook, watched
        self.values: tuple[dict, dict] = ({}, {})  # (float, quantised)

    def run(self) -> None:
        """Evaluate every node up to the output."""
        nodes = list(self.gm.graph.nodes)
        last_use = {used: index for index, node in enumerate(nodes) for used in node.all_input_nodes}
        placeholders = 0
        for index, node in enumerate(nodes):
            if node.op == "output":
                break
            if node in self.watched:
                self.hook(node, self)
            if node.op == "placeholder":
                inputs = _PerBatch(batch[placeholders] for batch in self.batches)
                self.values[0][node] = self.values[1][node] = inputs
                placeholders += 1
                continue
            for quantized in (False, True):
                self.values[quantized][node] = self._evaluate(node, quantized)
            for used in node.all_input_nodes:
                if last_use.get(used) == index:
                    self.values[0].pop(used, None)
                    self.values[1].pop(used, None)

    def value(self, node: fx.Node, quantized: bool) -> object:
        """A node's value in one of the two models."""
        return self.values[quantized][node]

    def arguments(self, node: fx.Node, quantized: bool) -> tuple:
        """The node's arguments (batched ones as :class:`_PerBatch`)."""
        return fx.node.map_arg(node.args, lambda used: self.values[quantized][used])

    def refresh(self, layer: Layer) -> None:
        """Re-read the int8 model's weight and bias after ``layer`` was rewritten."""
        for node in (layer.weight, layer.bias):
            if node is not None:
                self.values[1][node] = self._call(node, True)

    def _evaluate(self, node: fx.Node, quantized: bool) -> object:
        if node.op == "get_attr":
            return ir.get_attribute(self.gm, node.target)
        if not quantized and node.target is QUANTIZE_DEQUANTIZE:
            return self.values[0][node.args[0]]
        if not quantized and node.target is DEQUANTIZE_PER_CHANNEL and meta.FLOAT_SOURCE in node.meta:
            return ir.get_attribute(self.gm, node.meta[meta.FLOAT_SOURCE])
        return self._call(node, quantized)

    def _call(self, node: fx.Node, quantized: bool) -> object:
        env = self.values[quantized]

        def read(used: fx.Node) -> object:  # a get_attr added by a refit is read where it stands
            return env[used] if used in env or used.op != "get_attr" else ir.get_attribute(self.gm, used.target)

        function = self._function(node)
        if not any(isinstance(env.get(used), _PerBatch) for used in node.all_input_nodes):
            return function(*fx.node.map_arg(node.args, read), **fx.node.map_arg(node.kwargs, read))
        results = _PerBatch()
        for index in range(len(self.batches)):
            def pick(used: fx.Node, index: int = index) -> object:
                value = read(used)
                return value[index] if isinstance(value, _PerBatch) else value
            results.append(function(*fx.node.map_arg(node.args, pick), **fx.node.map_arg(node.kwargs, pick)))
        return results

    def _function(self, node: fx.Node):
        if node.op == "call_function":
            return node.target
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)
        if node.op == "call_method":
            return lambda receiver, *args, **kwargs: getattr(receiver, node.target)(*args, **kwargs)
        raise PassError(f"pass 'reconstruct' cannot run node {node.name!r} ({node.op})")


def sample_batches(data: CalibrationBatches, samples: int, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """Up to ``samples`` calibration samples in batches of ``batch_size``.

    Batches whose shapes differ (token data of several lengths) are kept as given.
    """
    taken, count = [], 0
    for batch in data:
        size = min(batch_samples(batch), samples - count)
        taken.append(tuple(t[:size] if t.dim() else t for t in batch))
        count += size
        if count >= samples:
            break
    if not taken:
        return []
    scalars = any(t.dim() == 0 for batch in taken for t in batch)
    if scalars or len({tuple(t.shape[1:] for t in batch) for batch in taken}) > 1:
        return taken
    joined = tuple(torch.cat([batch[i] for batch in taken]) for i in range(len(taken[0])))
    return [tuple(t[start:start + batch_size] for t in joined) for start in range(0, count, batch_size)]


# --------------------------------------------------------------------------------------------
# Moments and fits


def measure(op: fx.Node, args: tuple, float_input: _PerBatch, half: int, options: dict,
            target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """``(E[x~_q x~_q^T], E[x~_q x~^T], E|T~ x~|^2, patches)`` over one half (even or odd) of the batches.

    ``x~`` is the patch with a constant 1 appended when the op has a bias, ``T~`` the float weights.
    """
    quantized_input, weight = args[0], args[WEIGHTED[ir.op_name(op)][1]]
    bias = (args[2] if len(args) > 2 else None) is not None
    picked = range(half, len(quantized_input), 2)
    samples = sum(quantized_input[i].shape[0] for i in picked)
    wanted = max(options["rows"], options["rows_per_column"] * (weight[0].numel() + 1))
    per_sample = max(1, math.ceil(wanted / max(1, samples)))
    sums: list[torch.Tensor | float] = [0.0] * 5
    weights = target[:, :, :target.shape[2] - 1] if bias else target
    count = 0
    for i in picked:
        quantized = patches(op, args, quantized_input[i], per_sample)
        reference = patches(op, args, float_input[i], per_sample)
        sums[0] = sums[0] + _gram(quantized, quantized)
        sums[1] = sums[1] + _gram(quantized, reference)
        sums[2] = sums[2] + quantized.sum(dim=(0, 3)).double()
        sums[3] = sums[3] + reference.sum(dim=(0, 3)).double()
        output = torch.einsum("grk,bgkp->bgrp", weights.float(), reference)
        if bias:
            output = output + target[:, :, -1].float()[None, :, :, None]
        sums[4] = sums[4] + float(output.double().square().sum())
        count += quantized.shape[0] * quantized.shape[3]
    qq, qf, mean_q, mean_f, signal = (total / count for total in sums)
    if bias:
        qq, qf = _with_ones(qq, mean_q, mean_q), _with_ones(qf, mean_q, mean_f)
    return qq, qf, signal, count


def _gram(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``sum_{b,p} left[b,g,k,p] right[b,g,l,p]`` as float64 ``(groups, K, K)``.

    One GEMM per image for grouped convolutions (many small products), one over all rows otherwise.
    """
    if left.shape[1] > 1:
        return sum(torch.bmm(left[i], right[i].transpose(1, 2)) for i in range(left.shape[0])).double()
    flat_left = left.permute(1, 2, 0, 3).reshape(1, left.shape[2], -1)
    flat_right = right.permute(1, 2, 0, 3).reshape(1, right.shape[2], -1)
    return (flat_left @ flat_right.transpose(1, 2)).double()


def _with_ones(moment: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``E[[a; 1][b; 1]^T]`` from ``E[a b^T]`` and the means of ``a`` (``left``) and ``b`` (``right``)."""
    top = torch.cat([moment, left.unsqueeze(2)], dim=2)
    bottom = torch.cat([right, torch.ones_like(right[:, :1])], dim=1).unsqueeze(1)
    return torch.cat([top, bottom], dim=1)


def patches(op: fx.Node, args: tuple, x: torch.Tensor, per_sample: int) -> torch.Tensor:
    """``(batch, groups, K, positions)``: the input patch of each sampled output position, float32.

    A linear layer's rows are its positions (tokens). A convolution's output positions are taken
    on a grid of about ``per_sample`` per image (neighbouring positions tell the same story), and
    only the input pixels under that grid are gathered, zeros where the padding lies.
    """
    x = x.detach().float()
    if ir.op_name(op) == "aten.linear":
        return x.reshape(1, 1, -1, x.shape[-1]).transpose(2, 3)
    weight = args[WEIGHTED[ir.op_name(op)][1]]
    stride, padding, dilation = pair_option(args, 3, 1), pair_option(args, 4, 0), pair_option(args, 5, 1)
    if isinstance(padding, str):
        raise PassError(f"pass 'reconstruct': conv {op.name!r} has string padding {padding!r}, not handled")
    kernel = tuple(weight.shape[2:])
    lengths = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in (0, 1)]
    every = max(1, math.ceil(math.sqrt(lengths[0] * lengths[1] / per_sample)))
    if any(padding):
        x = torch.nn.functional.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    if dilation != (1, 1):  # rare: unfold does the dilated gather
        columns = torch.nn.functional.unfold(x, kernel, dilation, 0, (stride[0] * every, stride[1] * every))
        return columns.reshape(x.shape[0], args[6] if len(args) > 6 else 1, -1, columns.shape[2])
    windows = x.unfold(2, kernel[0], stride[0] * every).unfold(3, kernel[1], stride[1] * every)  # a view
    batch, channels, rows, columns = windows.shape[:4]
    groups = args[6] if len(args) > 6 else 1
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(batch, groups, -1, rows * columns)


def output_error(weights: torch.Tensor, moments: tuple[torch.Tensor, ...], target: torch.Tensor) -> float:
    """``E|W~ x~_q - T~ x~|^2`` less its constant ``E|T~ x~|^2``, summed over channels, from one half's moments."""
    qq, qf = moments[0], moments[1]
    return float(torch.einsum("grk,gkl,grl->", weights, qq, weights)
                 - 2 * torch.einsum("grk,gkl,grl->", weights, qf, target))


def ridge_solution(target: torch.Tensor, qq: torch.Tensor, qf: torch.Tensor, strength: float) -> torch.Tensor:
    """``argmin_W E|W x~_q - T x~|^2 + lambda |W - T|^2``, ``lambda`` = ``strength`` x mean ``diag E[x_q x_q^T]``."""
    scale = strength * torch.diagonal(qq, dim1=1, dim2=2).mean(dim=1).clamp(min=1e-12)
    eye = torch.eye(qq.shape[1], dtype=qq.dtype)
    system = qq + scale[:, None, None] * eye
    right = torch.einsum("grk,glk->grl", target, qf) + scale[:, None, None] * target
    return torch.linalg.solve(system, right.transpose(1, 2)).transpose(1, 2)


def refit_bias(current: torch.Tensor, target: torch.Tensor, qq: torch.Tensor, qf: torch.Tensor) -> torch.Tensor:
    """The current weights with the bias that cancels the mean output error: ``b = T~ E[x~] - W E[x_q]``."""
    refitted = current.clone()
    mean_float, mean_quantized = qf[:, -1, :], qq[:, -1, :-1]
    refitted[:, :, -1] = (torch.einsum("grk,gk->gr", target, mean_float)
                          - torch.einsum("grk,gk->gr", current[:, :, :-1], mean_quantized))
    return refitted
