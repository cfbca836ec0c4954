"""``fxpress compile --input-format uint8``: a zoo image model compiled to take 8-bit pixels."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import torch
from click.testing import CliRunner

import models
from compiler.cli import main
from models.images import normalise


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_an_nhwc_pixel_artifact_of_a_zoo_model_matches_the_float_model(tmp_path):
    out = tmp_path / "out"
    result = run("compile", "mobilenet-v2", "--input-format", "uint8", "--input-layout", "NHWC", "-o", str(out))
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out / "model.onnx"))
    (declared,) = model.graph.input
    assert declared.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [dim.dim_value for dim in declared.type.tensor_type.shape.dim][1:] == [224, 224, 3]
    zoo = models.load("mobilenet-v2")
    (pixels,) = zoo.eval_data(2, pixels=True)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {declared.name: pixels.permute(0, 2, 3, 1).contiguous().numpy()})
    mean, std = zoo.input_format["mean"], zoo.input_format["std"]
    with torch.no_grad():
        reference = zoo.model(normalise(pixels.float() / 255, (tuple(mean), tuple(std)))).numpy()
    assert np.allclose(logits, reference, rtol=1e-3, atol=1e-3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input_format"] == {**zoo.input_format, "layout": "NHWC"}
    verified = run("verify", str(out), "--samples", "4", "--json")  # feeds the zoo's pixels, NHWC
    assert verified.exit_code == 0, verified.output


def test_a_model_without_pixel_data_is_a_usage_error(tmp_path):
    result = run("compile", "digits-cnn", "--input-format", "uint8", "-o", str(tmp_path / "out"))
    assert result.exit_code != 0 and "zoo image model with bundled pixel data" in result.output


def test_a_malformed_mean_is_refused(tmp_path):
    result = run("compile", "mobilenet-v2", "--input-format", "uint8", "--input-mean", "0.4,x,0.4",
                 "-o", str(tmp_path / "out"))
    assert result.exit_code != 0 and "--input-mean" in result.output
