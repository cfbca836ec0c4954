"""ModelOpt's int8 PTQ on CPU through bench.modelopt_onnx, on a tiny residual CNN (skipped without ModelOpt)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("modelopt.onnx.quantization")

from backends.tensorrt.lint import lint_tensorrt, placement_summary  # noqa: E402
from bench.modelopt_onnx import fp32_onnx, input_names, modelopt_int8  # noqa: E402


class TinyResidual(torch.nn.Module):
    """Conv-BN-ReLU, a residual block (conv-BN plus skip), pooling and a 32-to-16 linear head."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32),
                                        torch.nn.ReLU())
        self.branch = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.BatchNorm2d(32))
        self.head = torch.nn.Linear(32, 16)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(self.branch(y) + y)
        return self.head(y.mean((2, 3)))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyResidual().eval()
    with torch.no_grad():  # non-trivial BN statistics
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model, torch.randn(64, 3, 12, 12)


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory):
    model, data = tiny
    fp32 = onnx.load_from_string(fp32_onnx(model, (data[:2],)))
    calibration = {input_names(fp32)[0]: data[:48].numpy()}
    return fp32, *modelopt_int8(fp32, calibration, workdir=tmp_path_factory.mktemp("modelopt"), calibration_batch=8)


def test_the_export_has_a_dynamic_batch(quantized):
    fp32, _, _ = quantized
    batch = fp32.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.HasField("dim_value")


def test_modelopt_places_trt_style_qdq_in_int8_with_per_channel_weights(quantized):
    _, model, facts = quantized
    sites = placement_summary(model)
    assert [site["op"] for site in sites["weighted_quantized"]].count("Conv") == 2
    assert model.opset_import[0].version >= 19
    # ModelOpt's residual rule: the skip input of the Add gets Q/DQ, the conv branch does not
    residual = (sites["residual_adds"], sites["residual_skip_quantized"], sites["residual_conv_side_quantized"])
    assert residual == (1, 1, 0)
    # symmetric int8 zero points, per-channel weights with an explicit axis: nothing for the linter to find
    assert lint_tensorrt(model) == []
    assert facts["options"]["high_precision_dtype"] == "fp32" and facts["calibration_samples"] == 48
    assert facts["seconds"] > 0 and facts["modelopt"]


def test_the_quantized_model_runs_in_ort_close_to_fp32(tiny, quantized):
    from backends.onnxruntime import make_session

    model, data = tiny
    _, qdq, _ = quantized
    session = make_session(qdq, level="disable")
    held_out = data[48:]
    actual = session.run(None, {session.get_inputs()[0].name: held_out.numpy()})[0]
    with torch.no_grad():
        expected = model(held_out).numpy()
    assert actual.shape == expected.shape  # a batch other than the calibration one: still dynamic
    sqnr = 10 * np.log10((expected**2).sum() / ((expected - actual) ** 2).sum())
    assert sqnr > 20


def test_only_entropy_and_max_are_accepted(tmp_path):
    with pytest.raises(ValueError, match="entropy"):
        modelopt_int8(b"", {}, method="percentile", workdir=tmp_path)


def test_onnx_runtimes_quantizer_is_itself_again_after_modelopt():
    """ModelOpt patches ORT's calibrators in-process; ``modelopt_int8`` undoes it, so quantize_static still works."""
    from modelopt.onnx.quantization.ort_patching import patch_ort_modules
    from onnxruntime.quantization import calibrate

    from bench.modelopt_onnx import _ort_quantization_restored

    originals = (calibrate.CalibraterBase.__init__, calibrate.MinMaxCalibrater.compute_data,
                 calibrate.create_calibrator)
    with _ort_quantization_restored():
        patch_ort_modules()
        assert calibrate.MinMaxCalibrater.compute_data is not originals[1]
    assert (calibrate.CalibraterBase.__init__, calibrate.MinMaxCalibrater.compute_data,
            calibrate.create_calibrator) == originals
