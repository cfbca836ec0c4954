"""Where int8 formats cap a classifier's agreement with fp32: weights alone, activations alone, input alone.

ONNX Runtime's integer kernels take int8 weights (per output channel) and uint8 activations (one
scale per tensor). This bench compiles a zoo classifier for ``cpu-int8`` and takes its torch
simulation apart, so each part of the int8 error is measured on its own against eager fp32:

- ``onnxruntime int8``: the compiled model as ONNX Runtime runs it;
- ``simulation``: its torch simulation (the IR with every quantisation op);
- ``int8 weights only``: the simulation with every activation quantisation removed;
- ``int8 activations only``: the simulation with every int8 weight and int32 bias replaced by
  the float one of a ``cpu-fp32`` compile (BatchNorm folded the same way), quantised activations kept;
- ``float layers only``: no int8 left; the layers the target keeps in float still read the
  float16 weights the saved model stores;
- ``float32``: the same with those weights back in float32 (a check of the rewiring: it must
  match eager fp32 to rounding);
- ``uint8 input``: eager fp32 fed its inputs rounded to uint8 over the calibration range, what
  an integer first layer sees (``bench.int8_peers.input_rounding_ceiling``).

Each row is top-1 agreement with eager fp32 and the SQNR of the logits, on evaluation data
disjoint from the calibration data. A bar on agreement that even one row alone misses cannot be
met by any pipeline that keeps that part in int8.

    python -m bench.int8_ceilings                                  # efficientnet-lite0, 500 crops
    python -m bench.int8_ceilings --model digits-cnn --eval 300 --calib 64
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import warnings

import torch
import torch.fx as fx

from bench.int8_peers import (
    CLASSIFIERS,
    EVAL_CHUNK,
    _chunks,
    _finite,
    classifier_quality,
    eager_outputs,
    fxpress_target,
    input_rounding_ceiling,
)
from compiler.quant_ops import DEQUANTIZE_PER_CHANNEL, QUANTIZE_DEQUANTIZE


def _float_tensor(float_gm: fx.GraphModule, stored_target: str) -> torch.Tensor:
    """The float tensor of ``float_gm`` that a stored int8/float16 attribute of the int8 IR stands for.

    ``_blocks.0._project_conv.weight_quantized`` -> ``_blocks.0._project_conv.weight``;
    ``...bias_corrected_quantized`` -> ``...bias``; ``...weight_float16`` -> ``...weight``.
    """
    owner, _, attribute = stored_target.rpartition(".")
    kind = attribute.split("_", 1)[0]
    if kind not in ("weight", "bias"):
        raise ValueError(f"{stored_target!r} is neither a weight nor a bias")
    module = float_gm.get_submodule(owner) if owner else float_gm
    return getattr(module, kind).detach()


def _replace_with_float(gm: fx.GraphModule, node: fx.Node, float_gm: fx.GraphModule, stored: fx.Node) -> None:
    """Makes ``node``'s users read the float tensor behind ``stored`` (a get_attr) instead of ``node``."""
    name = stored.target.replace(".", "_") + "_as_float32"
    if not hasattr(gm, name):
        gm.register_buffer(name, _float_tensor(float_gm, stored.target).clone())
    with gm.graph.inserting_before(node):
        replacement = gm.graph.get_attr(name)
    node.replace_all_uses_with(replacement)
    gm.graph.erase_node(node)


def _is_widened_float16(node: fx.Node) -> bool:
    """A ``_to_copy`` of a float16 get_attr: a float layer's weight as ``insert_qdq`` stores it."""
    source = node.args[0] if node.op == "call_function" and node.args else None
    return (node.target == torch.ops.aten._to_copy.default and isinstance(source, fx.Node)
            and source.op == "get_attr" and source.target.endswith("_float16"))


def strip_quantization(gm: fx.GraphModule, float_gm: fx.GraphModule | None, *, activations: bool,
                       weights: bool, float16: bool = False) -> fx.GraphModule:
    """A copy of the int8 simulation ``gm`` with some of its quantisation taken out.

    Args:
        gm: The quantised IR (``compiled.graph_module`` of a cpu-int8 compile).
        float_gm: The IR of a cpu-fp32 compile of the same model: the source of float weights.
        activations: Remove every activation quantisation (``fxpress::quantize_dequantize``).
        weights: Replace every int8 weight and int32 bias (``fxpress::dequantize_per_channel``)
            by the float one.
        float16: Replace the float16-stored weights of the layers kept in float by float32 ones.
    """
    stripped = copy.deepcopy(gm)
    for node in list(stripped.graph.nodes):
        if activations and node.op == "call_function" and node.target == QUANTIZE_DEQUANTIZE:
            node.replace_all_uses_with(node.args[0])
            stripped.graph.erase_node(node)
        elif weights and node.op == "call_function" and node.target == DEQUANTIZE_PER_CHANNEL:
            _replace_with_float(stripped, node, float_gm, node.args[0])
        elif float16 and _is_widened_float16(node):
            _replace_with_float(stripped, node, float_gm, node.args[0])
    stripped.graph.eliminate_dead_code()
    stripped.recompile()
    return stripped


def _first_output(outputs) -> torch.Tensor:
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def simulated_outputs(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``gm`` on ``inputs`` in chunks, without gradients."""
    with torch.no_grad():
        return torch.cat([_first_output(gm(*chunk)) for chunk in _chunks(inputs, EVAL_CHUNK)])


def runtime_outputs(compiled, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The compiled model's ONNX Runtime outputs on ``inputs`` in chunks."""
    return torch.cat([_first_output(compiled(*chunk)) for chunk in _chunks(inputs, EVAL_CHUNK)])


def compile_pair(zoo, calibration: tuple[torch.Tensor, ...], target, name: str):
    """The zoo model compiled for ``target`` (a cpu-int8 Target) and for cpu-fp32."""
    from compiler import compile

    model = zoo.model.eval()
    compiled = compile(model, target=target, example_inputs=zoo.example_inputs,
                       calibration_data=list(_chunks(calibration, EVAL_CHUNK)), model_name=name)
    float_compiled = compile(model, target="cpu-fp32", example_inputs=zoo.example_inputs, model_name=name)
    return compiled, float_compiled


def ceiling_rows(model: torch.nn.Module, compiled, float_compiled, calibration: tuple[torch.Tensor, ...],
                 evaluation: tuple[torch.Tensor, ...]) -> dict[str, dict]:
    """Top-1 agreement and SQNR against eager fp32 for every row of the table."""
    reference = eager_outputs(model, evaluation)
    gm, float_gm = compiled.graph_module, float_compiled.graph_module
    stripped = {
        "int8 weights only": {"activations": True, "weights": False},
        "int8 activations only": {"activations": False, "weights": True},
        "float layers only": {"activations": True, "weights": True},
        "float32": {"activations": True, "weights": True, "float16": True},
    }
    rows = {"onnxruntime int8": classifier_quality(reference, runtime_outputs(compiled, evaluation), None),
            "simulation": classifier_quality(reference, simulated_outputs(gm, evaluation), None)}
    for label, options in stripped.items():
        outputs = simulated_outputs(strip_quantization(gm, float_gm, **options), evaluation)
        rows[label] = classifier_quality(reference, outputs, None)
    rows["uint8 input"] = input_rounding_ceiling(model, calibration, evaluation, reference)
    return rows


def ceilings(name: str, evaluations: int, calibrations: int, max_float_macs: float | None) -> dict:
    """The table for one zoo classifier."""
    import models

    zoo = models.load(name)
    calibration = tuple(zoo.calibration_data(calibrations))
    target = fxpress_target(max_float_macs)
    compiled, float_compiled = compile_pair(zoo, calibration, target, name)
    rows = ceiling_rows(zoo.model.eval(), compiled, float_compiled, calibration, tuple(zoo.eval_data(evaluations)))
    return {"model": name, "eval": evaluations, "calib": calibrations, "target": target.to_dict(), "rows": rows}


def render(result: dict) -> str:
    lines = [f"{result['model']}: {result['eval']} evaluation samples, {result['calib']} calibration samples; "
             "against eager fp32", f"{'':24s} {'top-1 agreement':>16s} {'SQNR dB':>8s}"]
    for label, quality in result["rows"].items():
        lines.append(f"{label:24s} {100 * quality['top1_agreement']:15.1f}% {quality['sqnr_db']:8.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet-lite0", choices=CLASSIFIERS)
    parser.add_argument("--eval", type=int, default=500, help="evaluation samples (default 500)")
    parser.add_argument("--calib", type=int, default=256, help="calibration samples (default 256)")
    parser.add_argument("--float-macs", type=float, default=None,
                        help="float-MAC budget of the sensitivity fallback (default: the target's)")
    parser.add_argument("--json", default=None, help="also write every number to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = ceilings(args.model, args.eval, args.calib, args.float_macs)
    print(render(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(_finite(result), handle, indent=2)


if __name__ == "__main__":
    main()
