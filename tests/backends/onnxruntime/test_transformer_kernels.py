"""The transformer float kernels against one-op ONNX Runtime sessions (optimisations disabled): equal bit for bit."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from backends.onnxruntime.transformer_kernels import (
    avx512f,
    mlas_erf,
    mlas_matmul,
    mlas_softmax,
    onnx_gelu,
    ort_layer_norm,
)

pytestmark = pytest.mark.skipif(not avx512f(), reason="the kernels emulated are ONNX Runtime's AVX-512F ones")


def _session_run(nodes: list, inputs: dict[str, np.ndarray], initializers: dict[str, np.ndarray] | None = None,
                 threads: int = 1) -> np.ndarray:
    declared = [helper.make_tensor_value_info(name, TensorProto.FLOAT, value.shape) for name, value in inputs.items()]
    graph = helper.make_graph(
        nodes, "g", declared,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(value, name) for name, value in (initializers or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def _normal(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize(("a_shape", "b_shape"), [
    ((3, 40, 384), (384, 384)),  # K in three slices of 128
    ((2, 20, 384), (384, 1536)),
    ((2, 20, 1536), (1536, 384)),
    ((2, 4, 24, 32), (2, 4, 32, 24)),  # attention scores
    ((2, 4, 24, 24), (2, 4, 24, 32)),  # attention-weighted values
])
@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_is_bit_exact(a_shape, b_shape, threads):
    a, b = _normal(a_shape, 0), _normal(b_shape, 1)
    expected = _session_run([helper.make_node("MatMul", ["a", "b"], ["y"])], {"a": a, "b": b}, threads=threads)
    actual = mlas_matmul(torch.from_numpy(a), torch.from_numpy(b))
    assert torch.equal(actual, torch.from_numpy(expected))
    if a_shape[-1] > 128:  # several K slices: PyTorch's summation order differs
        assert not torch.equal(actual, torch.from_numpy(a) @ torch.from_numpy(b))


def test_matmul_of_a_single_row_is_left_to_pytorch():
    assert mlas_matmul(torch.ones(1, 8), torch.ones(8, 4)) is None


@pytest.mark.parametrize("length", [128, 20, 7])
def test_softmax_is_bit_exact_with_masks_and_subnormal_results(length):
    x = _normal((64, length), 2, scale=4.0)
    x[:8, length // 2:] = np.finfo(np.float32).min  # masked positions, as attention masks write them
    x[8:16, 0] = 100.0  # the others' exp(x - max) below float32's normal range
    expected = _session_run([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], {"x": x})
    actual = mlas_softmax(torch.from_numpy(x), -1)
    assert torch.equal(actual, torch.from_numpy(expected))
    assert (expected[8:16, 1:] > 0).any() and (expected[8:16, 1:] < np.finfo(np.float32).tiny).any()


def test_softmax_over_an_inner_axis():
    x = _normal((4, 30, 5), 3, scale=3.0)
    expected = _session_run([helper.make_node("Softmax", ["x"], ["y"], axis=1)], {"x": x})
    assert torch.equal(mlas_softmax(torch.from_numpy(x), 1), torch.from_numpy(expected))


def test_erf_is_bit_exact_across_both_branches_and_the_clamp():
    edges = [0.0, -0.0, 0.921875, -0.921875, np.nextafter(0.921875, 0), 3.725, 3.925, 4.5, -10.0, 1e30]
    x = np.concatenate([_normal((20000,), 4, scale=2.0), np.linspace(-6, 6, 4001), edges]).astype(np.float32)
    expected = _session_run([helper.make_node("Erf", ["x"], ["y"])], {"x": x})
    assert torch.equal(mlas_erf(torch.from_numpy(x)), torch.from_numpy(expected))


def test_gelu_matches_the_exported_erf_decomposition():
    x = _normal((64, 96), 5, scale=3.0)
    constants = {"root2": np.array(2.0**0.5, np.float32), "one": np.array(1.0, np.float32),
                 "half": np.array(0.5, np.float32)}
    nodes = [helper.make_node("Div", ["x", "root2"], ["scaled"]), helper.make_node("Erf", ["scaled"], ["erf"]),
             helper.make_node("Add", ["erf", "one"], ["shifted"]),
             helper.make_node("Mul", ["half", "shifted"], ["gate"]), helper.make_node("Mul", ["x", "gate"], ["y"])]
    expected = _session_run(nodes, {"x": x}, constants)
    assert torch.equal(onnx_gelu(torch.from_numpy(x)), torch.from_numpy(expected))


@pytest.mark.parametrize(("length", "with_bias"), [(384, True), (32, True), (20, True), (384, False)])
def test_layer_norm_is_bit_exact(length, with_bias):
    rows = np.random.default_rng(6)
    x = (_normal((512, length), 6) * rows.uniform(0.1, 5, (512, 1)) + rows.uniform(-3, 3, (512, 1))).astype(np.float32)
    x[:4, :3] = 40.0  # an outlier feature, as BERT's hidden states have
    weight, bias = _normal((length,), 7), _normal((length,), 8)
    initializers = {"w": weight, **({"b": bias} if with_bias else {})}
    node = helper.make_node("LayerNormalization", ["x", "w", *(["b"] if with_bias else [])], ["y"], axis=-1,
                            epsilon=1e-12)
    expected = _session_run([node], {"x": x}, initializers)
    actual = ort_layer_norm(torch.from_numpy(x), length, torch.from_numpy(weight),
                            torch.from_numpy(bias) if with_bias else None, 1e-12)
    assert torch.equal(actual, torch.from_numpy(expected))
    reference = torch.nn.functional.layer_norm(torch.from_numpy(x), (length,), torch.from_numpy(weight),
                                               torch.from_numpy(bias) if with_bias else None, 1e-12)
    assert not torch.equal(actual, reference)  # PyTorch's own kernel rounds differently


def test_layer_norm_of_rows_shorter_than_a_lane_block_is_left_to_pytorch():
    assert ort_layer_norm(torch.ones(2, 7), 7, None, None, 1e-5) is None

