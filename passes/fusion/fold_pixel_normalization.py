"""Fold the pixel normalisation of an ``input_format`` compile into the first convolution, exactly.

``PixelInput`` feeds the model ``(p / 255 - m_c) / s_c`` per channel of the pixels ``p``, and the
first convolution pads that with zeros. Folding the affine map into the weights alone
(``W_c / (255 s_c)``, the offset into the bias) is exact inside the image but not at its borders,
where the padding is a normalised zero, i.e. the pixel value ``255 m_c``, not 0. Here the offset
goes into a fourth input channel instead: the pixels get a constant channel of 255 (zero in the
padding, like every channel), weighted ``-sum_c W_c m_c / (255 s_c)``. Then

    conv(W, pad0(normalised)) = conv([W_c / (255 s_c) ..., offset weight], pad0([p, 255]))

at every output position, borders included, and the convolution reads integers in [0, 255]: the
quantiser before it is given exactly that range (``meta.FIXED_RANGE``), so with uint8 activations
it is scale 1, zero point 0 and loses nothing.

Where the normalised image feeds anything but one (optionally zero-padded) conv2d with its own
constant weight and groups 1, the normalisation stays as float ops (div, sub, div) and the
stats say why.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from compiler import ir, meta
from compiler.input_format import NORMALIZE_PIXELS, PIXEL_MAX
from compiler.pass_base import Pass, PassContext, PassResult

aten = torch.ops.aten
_PADS = (aten.pad.default, aten.constant_pad_nd.default)
FIXED_PIXEL_RANGE = (0.0, PIXEL_MAX)


class FoldPixelNormalization(Pass):
    """Fold ``fxpress::normalize_pixels`` into the conv it feeds (see the module docstring)."""

    name = "fold_pixel_normalization"
    exact = True

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Fold every pixel normalisation that feeds one conv; expand the others into float ops."""
        rows = []
        for node in [node for node in gm.graph.nodes if node.target is NORMALIZE_PIXELS]:
            conv, reason = _foldable(gm, node)
            if conv is None:
                _expand(gm, node)
                rows.append({"folded": False, "reason": reason})
            else:
                rows.append({"folded": True, "conv": ir.module_path(conv) or conv.name})
                _fold(gm, node, conv)
        if rows:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified=bool(rows), stats={"normalizations": rows})


def _foldable(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node | None, str]:
    """The conv2d the normalised image feeds (through at most one zero pad), or None and the reason."""
    reader = ir.single_user(node)
    if reader is not None and reader.target in _PADS and _zero_constant_pad(reader):
        reader = ir.single_user(reader)
    if reader is None or reader.target is not aten.conv2d.default:
        return None, "the normalised image feeds something other than one conv2d (through at most a zero pad)"
    weight = reader.args[1]
    groups = reader.args[6] if len(reader.args) > 6 else reader.kwargs.get("groups", 1)
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and len(weight.users) == 1):
        return None, f"{ir.describe(reader)}: its weight is not a constant of its own"
    if groups != 1 or ir.get_attribute(gm, weight.target).shape[1] != len(node.args[1]):
        return None, f"{ir.describe(reader)}: a grouped conv, or its input channels differ from the image's"
    return reader, ""


def _zero_constant_pad(pad: fx.Node) -> bool:
    if pad.target is aten.constant_pad_nd.default:
        value = pad.args[2] if len(pad.args) > 2 else pad.kwargs.get("value", 0.0)
        return value == 0
    mode = pad.args[2] if len(pad.args) > 2 else pad.kwargs.get("mode", "constant")
    value = pad.args[3] if len(pad.args) > 3 else pad.kwargs.get("value", None)
    return mode == "constant" and (value is None or value == 0)


def _fold(gm: fx.GraphModule, node: fx.Node, conv: fx.Node) -> None:
    pixels, mean, std = node.args
    weight_node = conv.args[1]
    original = ir.get_attribute(gm, weight_node.target)
    weight = original.double()
    mean_t, std_t = (torch.tensor(values, dtype=torch.float64).reshape(1, -1, 1, 1) for values in (mean, std))
    scaled = weight / (PIXEL_MAX * std_t)
    offset = -(weight * mean_t / std_t).sum(dim=1, keepdim=True) / PIXEL_MAX
    ir.set_attribute(gm, weight_node.target, torch.cat([scaled, offset], dim=1).to(original.dtype))
    with gm.graph.inserting_before(node):
        first = gm.graph.call_function(aten.slice.Tensor, (pixels, 1, 0, 1))
        constant = gm.graph.call_function(aten.full_like.default, (first, PIXEL_MAX))
        augmented = gm.graph.call_function(aten.cat.default, ([pixels, constant], 1))
    if meta.NN_MODULE_STACK in node.meta:  # the nodes stand where the normalisation stood
        for new in (first, constant, augmented):
            new.meta[meta.NN_MODULE_STACK] = node.meta[meta.NN_MODULE_STACK]
    node.replace_all_uses_with(augmented)
    gm.graph.erase_node(node)
    augmented.meta[meta.FIXED_RANGE] = FIXED_PIXEL_RANGE
    pad = conv.args[0]
    if pad is not augmented:
        pad.meta[meta.FIXED_RANGE] = FIXED_PIXEL_RANGE


def _expand(gm: fx.GraphModule, node: fx.Node) -> None:
    """``(x / 255 - mean) / std`` as float ops with constant ``[1, C, 1, 1]`` tensors."""
    pixels, mean, std = node.args
    mean_node = ir.add_get_attr(gm, "pixel_mean", torch.tensor(mean).reshape(1, -1, 1, 1), before=node)
    std_node = ir.add_get_attr(gm, "pixel_std", torch.tensor(std).reshape(1, -1, 1, 1), before=node)
    with gm.graph.inserting_before(node):
        scaled = gm.graph.call_function(aten.div.Tensor, (pixels, PIXEL_MAX))
        centred = gm.graph.call_function(aten.sub.Tensor, (scaled, mean_node))
        normalised = gm.graph.call_function(aten.div.Tensor, (centred, std_node))
    node.replace_all_uses_with(normalised)
    gm.graph.erase_node(node)
