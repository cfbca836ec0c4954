"""The int8 format follows the CPU, and the kernel fact behind the choice holds on this machine."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from backends.onnxruntime.isa import CpuIsa, detect_isa, int8_format

AVX2 = CpuIsa("x86_64", False, ("avx2",), "test")
VNNI = CpuIsa("x86_64", True, ("avx512_vnni",), "test")


def test_vnni_takes_u8s8_with_full_weights():
    chosen = int8_format(VNNI)
    assert (chosen.activation_dtype, chosen.weight_bits, chosen.name) == ("uint8", 8, "U8S8")


def test_without_vnni_weights_use_seven_bits():
    chosen = int8_format(AVX2)
    assert (chosen.activation_dtype, chosen.weight_bits) == ("uint8", 7)


def test_other_machines_take_full_weights():
    assert int8_format(CpuIsa("aarch64", False, ("asimddp",), "test")).weight_bits == 8


def _conv_error(weight: int, seed: int = 0) -> float:
    """Largest error, in output steps, of a u8 x s8 1x1 QLinearConv with +-``weight`` weights against exact integers."""
    rng = np.random.default_rng(seed)
    channels, dtype, zero = 64, np.uint8, 128
    x = rng.integers(0, 256, (1, channels, 8, 8))
    w = np.where(rng.random((channels, channels, 1, 1)) < 0.5, weight, -weight).astype(np.int8)
    x_scale, w_scale, y_scale = 0.01, np.full(channels, 0.01, np.float32), 0.1
    inits = [nh.from_array(np.array(x_scale, np.float32), "xs"), nh.from_array(np.array(zero, dtype), "xz"),
             nh.from_array(w, "w"), nh.from_array(w_scale, "ws"), nh.from_array(np.zeros(channels, np.int8), "wz"),
             nh.from_array(np.array(y_scale, np.float32), "ys"), nh.from_array(np.array(zero, dtype), "yz")]
    elem = TensorProto.UINT8
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", elem, list(x.shape))],
                              [helper.make_tensor_value_info("y", elem, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x.astype(dtype)})[0].astype(np.int64)
    exact = np.einsum("nchw,kc->nkhw", x - zero, w[:, :, 0, 0].astype(np.int64))
    info = np.iinfo(dtype)
    expected = np.clip(np.round(exact * x_scale * w_scale[0] / y_scale) + zero, info.min, info.max)
    return float(np.abs(y - expected).max())


def test_seven_bit_weights_are_exact_in_u8s8_kernels():
    assert _conv_error(63) <= 1


@pytest.mark.skipif(detect_isa().vnni or detect_isa().machine != "x86_64", reason="VNNI U8S8 does not saturate")
def test_eight_bit_weights_saturate_u8s8_kernels_without_vnni():
    assert _conv_error(127) > 10


@pytest.mark.skipif(not detect_isa().vnni, reason="without VNNI, 8-bit weights saturate (the test above)")
def test_eight_bit_weights_are_exact_in_u8s8_kernels_with_vnni():
    assert int8_format().weight_bits == 8
    assert _conv_error(127) <= 1
