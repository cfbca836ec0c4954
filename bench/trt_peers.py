"""fxpress ``trt-int8`` against NVIDIA ModelOpt's ONNX PTQ, side by side in one process, checked without a GPU.

For each model both tools quantise from the same zoo model with the same calibration samples
(ModelOpt from the fp32 ONNX a user exports, :mod:`bench.modelopt_onnx`; fxpress from the
PyTorch model), and each artifact is then:

- placed: weighted ops (Conv, Gemm, MatMul with a weight) with both inputs quantised, residual
  adds with their skip input quantised and with a Q/DQ on their conv side, the op types that
  run in float (:func:`backends.tensorrt.lint.placement_summary`, one definition for both tools);
- linted against TensorRT's placement rules (:func:`backends.tensorrt.lint.lint_tensorrt`);
- scored against eager fp32 on the zoo's held-out evaluation samples, run by ONNX Runtime with
  graph optimisations disabled (the ONNX reference semantics of Q/DQ): top-1 agreement and SQNR
  of the logits, or the cosine of each sentence embedding (mean and min);
- run with graph optimisations on, counting the integer kernels ONNX Runtime fused (a CPU smoke
  test; TensorRT's own fusions are not claimed).

For fxpress also: the compile time, the layers its ledger keeps in float with the reason, the
agreement of its torch simulation with the reference session (elements within one output
quantisation step, on ``--simulation`` evaluation samples), and the calibration cache read back by
ModelOpt's own reader (``modelopt.onnx.quantization.calib_utils.import_scales_from_calib_cache``).

    python -m bench.trt_peers                                   # resnet18 mobilenet-v2 efficientnet-lite0 minilm-l6
    python -m bench.trt_peers --models efficientnet-lite0 --eval 500 --calib 256 --json trt.json
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.utils._pytree as pytree

from backends.onnxruntime import make_session
from backends.tensorrt.backend import CACHE_FILE
from backends.tensorrt.calibration_cache import activation_scales
from backends.tensorrt.lint import lint_tensorrt, placement_summary
from bench.int8_peers import EVAL_CHUNK, SEQ_LEN, _finite, eager_outputs
from bench.modelopt_onnx import evaluate, fp32_onnx, input_names, modelopt_int8
from compiler import probe

MODELS = ("resnet18", "mobilenet-v2", "efficientnet-lite0", "minilm-l6")
#: Op types of ONNX Runtime's integer kernels (after its QDQ fusions).
INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "QLinearAdd",
                   "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "MatMulIntegerToFloat",
                   "DynamicQuantizeMatMul", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu")

logger = logging.getLogger("bench.trt_peers")


def integer_kernels(model: onnx.ModelProto, workdir: Path) -> dict[str, int]:
    """The integer kernels (by op type) in ONNX Runtime's optimised graph of ``model`` (all optimisations)."""
    path = workdir / "optimized.onnx"
    make_session(model, "all", 1, optimized_path=str(path))
    optimized = onnx.load(str(path))
    counts = collections.Counter(node.op_type for node in optimized.graph.node if node.op_type in INTEGER_KERNELS)
    return dict(counts.most_common())


def artifact_row(model: onnx.ModelProto, evaluation: tuple[torch.Tensor, ...], reference: torch.Tensor,
                 encoder: bool, workdir: Path) -> dict:
    """Placement, lint findings, quality (reference session) and integer kernels of one Q/DQ model."""
    findings = lint_tensorrt(model)
    return {
        "placement": placement_summary(model),
        "lint": [finding.to_dict() for finding in findings],
        "lint_rules": dict(collections.Counter(finding.rule for finding in findings)),
        "quality": evaluate(model, evaluation, reference, encoder),
        "integer_kernels": integer_kernels(model, workdir),
    }


def simulation_agreement(compiled, evaluation: tuple[torch.Tensor, ...], count: int) -> dict:
    """The torch simulation against the reference session on ``count`` samples: elements within one step."""
    runs, sims = [], []
    for start in range(0, count, EVAL_CHUNK):
        chunk = tuple(tensor[start:min(start + EVAL_CHUNK, count)] for tensor in evaluation)
        runs += pytree.tree_leaves(compiled(*chunk))
        sims += pytree.tree_leaves(compiled.simulate(*chunk))
    outputs, simulated = tuple(runs), tuple(sims)
    drift = probe.drift(outputs, simulated)
    return {"samples": count, "within_one_step": probe.within_steps(outputs, simulated, 1.0),
            "cosine": drift.cosine, "max_abs": drift.max_abs}


def cache_round_trip(directory: Path, model: onnx.ModelProto) -> dict:
    """``calibration.cache`` read by ModelOpt's reader against the model's activation scales."""
    from modelopt.onnx.quantization.calib_utils import import_scales_from_calib_cache

    read = import_scales_from_calib_cache(str(directory / CACHE_FILE))  # keys: "<tensor>_scale"
    expected = activation_scales(model)
    equal = read.keys() == {f"{name}_scale" for name in expected} and all(
        np.float32(read[f"{name}_scale"]) == np.float32(scale) for name, scale in expected.items())
    return {"tensors": len(expected), "read": len(read), "identical": bool(equal)}


def ledger_floats(compiled) -> list[dict]:
    """The weighted layers the ledger keeps in float, with the reason it gives."""
    rows = next((entry.stats.get("layers", []) for entry in compiled.report.entries
                 if entry.name == "insert_qdq"), [])
    return [{"module_path": row["module_path"], "why": row.get("why")} for row in rows
            if row.get("kind") == "weight" and row.get("decision") == "float"]


def bench_model(name: str, args: argparse.Namespace) -> dict:
    """Both tools on one zoo model."""
    import models
    from compiler import compile

    zoo = models.load(name)
    encoder = zoo.task == "embedding"
    options = {"seq_len": SEQ_LEN} if encoder else {}
    calibration = tuple(zoo.calibration_data(args.calib, **options))
    evaluation = tuple(zoo.eval_data(args.eval, **options))
    reference = eager_outputs(zoo.model, evaluation)
    batches = [tuple(tensor[start:start + 32] for tensor in calibration) for start in range(0, args.calib, 32)]
    result = {"model": name, "kind": zoo.task, "calibration_samples": args.calib, "evaluation_samples": args.eval}
    with tempfile.TemporaryDirectory(prefix="trt-peers-") as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        compiled = compile(zoo.model, "trt-int8", zoo.example_inputs, calibration_data=batches, model_name=name)
        fxpress = {"compile_s": time.perf_counter() - started, "ledger_float": ledger_floats(compiled),
                   "fallbacks": list(compiled.report.fallbacks)}
        fxpress.update(artifact_row(compiled.onnx, evaluation, reference, encoder, workdir))
        fxpress["simulation"] = simulation_agreement(compiled, evaluation, min(args.simulation, args.eval))
        directory = compiled.save(workdir / "fxpress")
        fxpress["cache_round_trip"] = cache_round_trip(directory, compiled.onnx)
        result["fxpress"] = fxpress
        fp32 = onnx.load_from_string(fp32_onnx(zoo.model, tuple(tensor[:2] for tensor in calibration)))
        data = {key: tensor.numpy() for key, tensor in zip(input_names(fp32), calibration, strict=True)}
        quantized, facts = modelopt_int8(fp32, data, method=args.method, workdir=workdir)
        result["modelopt"] = {"facts": facts, **artifact_row(quantized, evaluation, reference, encoder, workdir)}
        name_weighted_sites(quantized, result["modelopt"]["placement"])
    result["weighted_comparison"] = weighted_comparison(result)
    return result


def name_weighted_sites(model: onnx.ModelProto, placement: dict) -> None:
    """Give ModelOpt's weighted sites the module path of their weight (its nodes lose the exporter's scopes).

    The exporter names weight initializers by parameter (``layer1.0.conv1.weight``) and ModelOpt
    keeps those names, so the weight behind each op, through Q/DQ, Transpose and Cast, names it.
    """
    nodes = {node.name: node for node in model.graph.node}
    producers = {output: node for node in model.graph.node for output in node.output}
    initializers = {tensor.name for tensor in model.graph.initializer}
    for key in ("weighted_quantized", "weighted_float"):
        for site in placement[key]:
            node = nodes[site["node"]]
            names = [_initializer_behind(name, producers, initializers) for name in node.input[:2]]
            weight = next((name for name in names if name is not None), None)
            site["module_path"] = weight.rsplit(".weight", 1)[0] if weight and ".weight" in weight else weight


def _initializer_behind(name: str, producers: dict, initializers: set[str]) -> str | None:
    while name not in initializers and name in producers and producers[name].op_type in (
            "QuantizeLinear", "DequantizeLinear", "Transpose", "Cast"):
        name = producers[name].input[0]
    return name if name in initializers else None


def weighted_comparison(result: dict) -> dict:
    """The layers ModelOpt quantises that fxpress leaves float, by module path, each with the ledger's reason.

    ModelOpt's sites are named by their weight initializer; one it renamed (a MatMul weight it
    transposed becomes ``val_N``) matches no fxpress layer and is only counted (``unnamed``).
    """
    placement = result["fxpress"]["placement"]
    ours = {site["module_path"] for site in placement["weighted_quantized"]}
    known = ours | {site["module_path"] for site in placement["weighted_float"]}
    theirs = {site["module_path"] for site in result["modelopt"]["placement"]["weighted_quantized"]}
    reasons = {row["module_path"]: row["why"] for row in result["fxpress"]["ledger_float"]}
    missing = sorted((theirs & known) - ours)
    return {"fxpress": len(ours), "modelopt": len(theirs), "only_modelopt": missing,
            "only_modelopt_with_reason": [path for path in missing if reasons.get(path)],
            "only_fxpress": sorted(ours - theirs), "unnamed": len(theirs - known)}


# --------------------------------------------------------------------------------------------
# Output


def _quality(row: dict) -> str:
    quality = row["quality"]
    if "cosine_mean" in quality:
        return f"cos {quality['cosine_mean']:.4f} (min {quality['cosine_min']:.4f})"
    return f"top1 {100 * quality['top1_agreement']:.1f}%, {quality['sqnr_db']:.1f} dB"


def _placement(row: dict) -> str:
    placement = row["placement"]
    return (f"{len(placement['weighted_quantized'])}/{placement['weighted_ops']} weighted, "
            f"skip {placement['residual_skip_quantized']}/{placement['residual_adds']}, "
            f"conv-side {placement['residual_conv_side_quantized']}")


def render(report: dict) -> str:
    """The side-by-side table, then per-model details."""
    lines = [f"ONNX Runtime {ort.__version__} with graph optimisations disabled as the reference; "
             f"{report['calibration_samples']} calibration, {report['evaluation_samples']} evaluation samples; "
             f"ModelOpt {report['modelopt_version']} ({report['method']})", ""]
    header = f"{'model':<19} {'tool':<9} {'Q/DQ placement':<40} {'lint':<18} {'quality vs eager fp32':<28} int8 kernels"
    lines += [header, "-" * len(header)]
    for result in report["results"]:
        for tool in ("fxpress", "modelopt"):
            row = result[tool]
            lint = ", ".join(f"{rule} x{count}" for rule, count in row["lint_rules"].items()) or "0 findings"
            kernels = sum(row["integer_kernels"].values())
            lines.append(f"{result['model']:<19} {tool:<9} {_placement(row):<40} {lint:<18} {_quality(row):<28} "
                         f"{kernels}")
    lines.append("")
    for result in report["results"]:
        ours, comparison = result["fxpress"], result["weighted_comparison"]
        simulation = ours["simulation"]
        lines.append(f"{result['model']}: compile {ours['compile_s']:.1f} s; simulation within one step on "
                     f"{100 * simulation['within_one_step']:.2f}% of {simulation['samples']} samples' outputs "
                     f"(cosine {simulation['cosine']:.6f}); cache read back by ModelOpt: "
                     f"{ours['cache_round_trip']['read']}/{ours['cache_round_trip']['tensors']} tensors, "
                     f"identical {ours['cache_round_trip']['identical']}")
        only = comparison["only_modelopt"] or "none"
        lines.append(f"  weighted layers ModelOpt quantises and fxpress keeps float: {only}"
                     f" (with a ledger reason: {len(comparison['only_modelopt_with_reason'])}); ModelOpt sites "
                     f"not matched by name: {comparison['unnamed']}")
        for row in ours["ledger_float"]:
            lines.append(f"  fxpress float: {row['module_path']}: {row['why']}")
        for tool in ("fxpress", "modelopt"):
            lines.append(f"  {tool} float op types: {result[tool]['placement']['float_islands']['op_types']}; "
                         f"ONNX Runtime integer kernels: {result[tool]['integer_kernels'] or 'none'}")
    return "\n".join(lines)


def main() -> None:
    """Run the comparison; print the table; optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--eval", type=int, default=500)
    parser.add_argument("--simulation", type=int, default=64, help="evaluation samples for the simulation check")
    parser.add_argument("--method", choices=("entropy", "max"), default="entropy", help="ModelOpt's calibrator")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    import modelopt

    results = []
    for name in args.models:
        results.append(bench_model(name, args))
        print(f"done {name}", flush=True)
    report = {"calibration_samples": args.calib, "evaluation_samples": args.eval, "method": args.method,
              "modelopt_version": modelopt.__version__, "onnxruntime": ort.__version__, "torch": torch.__version__,
              "results": results}
    print(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps(_finite(report), indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
