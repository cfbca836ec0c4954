"""Backend conformance: every ONNX file we write is valid, loads in ONNX Runtime with all graph
optimisations and with none, agrees with itself and with eager, and names its module paths."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from backends.onnx.export import MODULE_PATH_KEY, max_runtime_ir_version
from backends.onnxruntime import make_session
from compiler import ArtifactError, compile
from tests.support import randomize_batch_norm

RTOL, ATOL = 1e-3, 1e-5
EXAMPLE_BATCH, OTHER_BATCH = 2, 5


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
            nn.Conv2d(8, 16, 1), nn.ReLU(),
        )
        self.classifier = nn.Linear(16, 10)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x)).softmax(-1)


def make_cnn():
    torch.manual_seed(0)
    return randomize_batch_norm(SmallCNN()), (3, 8, 8)


def make_mlp():
    torch.manual_seed(0)
    return MLP().eval(), (12,)


@pytest.fixture(scope="module", params=["cnn", "mlp"])
def case(request):
    model, feature_shape = {"cnn": make_cnn, "mlp": make_mlp}[request.param]()
    torch.manual_seed(1)
    example = torch.randn(EXAMPLE_BATCH, *feature_shape)
    compiled = compile(model, target="cpu-fp32", example_inputs=(example,))
    return model, feature_shape, compiled


def inputs_at(feature_shape, batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, *feature_shape, generator=torch.Generator().manual_seed(seed))


def run_session(session, x: torch.Tensor) -> np.ndarray:
    (name,) = [value.name for value in session.get_inputs()]
    (output,) = session.run(None, {name: x.numpy()})
    return output


def test_checker_full_check_passes(case):
    _, _, compiled = case
    onnx.checker.check_model(compiled.onnx, full_check=True)


def test_strict_shape_inference_passes_and_keeps_batch_symbolic(case):
    _, _, compiled = case
    inferred = onnx.shape_inference.infer_shapes(compiled.onnx, check_type=True, strict_mode=True)
    (graph_input,) = inferred.graph.input
    (graph_output,) = inferred.graph.output
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # dynamic batch, not a number
    assert graph_output.type.tensor_type.shape.dim[0].dim_param


def test_ir_version_and_opset(case):
    _, _, compiled = case
    model = compiled.onnx
    assert model.ir_version <= max_runtime_ir_version()
    default_opsets = [entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")]
    assert default_opsets and default_opsets[0] >= 17
    assert compiled.report.lowering["ir_version"] == model.ir_version
    assert compiled.report.lowering["opset"] == default_opsets[0]


@pytest.mark.parametrize("batch", [EXAMPLE_BATCH, OTHER_BATCH])
def test_all_and_no_graph_optimisations_agree_with_each_other_and_eager(case, batch):
    model, feature_shape, compiled = case
    x = inputs_at(feature_shape, batch, seed=batch)
    optimised = run_session(make_session(compiled.onnx, "all"), x)
    plain = run_session(make_session(compiled.onnx, "disable"), x)
    np.testing.assert_allclose(optimised, plain, rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        expected = model(x).double().numpy()
    np.testing.assert_allclose(plain.astype(np.float64), expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(optimised.astype(np.float64), expected, rtol=RTOL, atol=ATOL)
    actual = compiled(x)
    assert isinstance(actual, torch.Tensor) and actual.shape == (batch, expected.shape[1])
    np.testing.assert_allclose(actual.double().numpy(), expected, rtol=RTOL, atol=ATOL)


def test_lowering_drift_is_recorded(case):
    _, _, compiled = case
    drift = compiled.report.lowering["drift"]
    assert drift["max_abs"] <= ATOL + RTOL * drift["reference_max_abs"]
    assert drift["cosine"] > 0.99999


def test_every_node_names_its_module_path(case):
    model, _, compiled = case
    module_paths = dict(model.named_modules())
    nodes = list(compiled.onnx.graph.node)
    assert nodes
    names = [node.name for node in nodes]
    assert len(set(names)) == len(names)
    for node in nodes:
        metadata = {prop.key: prop.value for prop in node.metadata_props}
        assert MODULE_PATH_KEY in metadata, f"{node.op_type} {node.name} has no module path"
        path = metadata[MODULE_PATH_KEY]
        assert path == "" or path in module_paths, f"{node.op_type}: {path!r} is not a module"
        assert node.name.startswith(f"{path or 'root'}/")


def test_conv_nodes_name_the_conv_modules(case):
    model, _, compiled = case
    convs = {name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    paths = [
        {prop.key: prop.value for prop in node.metadata_props}[MODULE_PATH_KEY]
        for node in compiled.onnx.graph.node if node.op_type == "Conv"
    ]
    assert sorted(paths) == sorted(convs)  # one Conv per conv module, the BatchNorms folded in
    gemms = [node for node in compiled.onnx.graph.node if node.op_type in ("Gemm", "MatMul")]
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    gemm_paths = {{p.key: p.value for p in node.metadata_props}[MODULE_PATH_KEY] for node in gemms}
    assert gemm_paths == linears


def test_no_batch_normalization_survives(case):
    _, _, compiled = case
    assert "BatchNormalization" not in {node.op_type for node in compiled.onnx.graph.node}


def test_save_writes_the_artifact(case, tmp_path):
    _, _, compiled = case
    directory = compiled.save(tmp_path / "artifact")
    assert sorted(path.name for path in directory.iterdir()) == [
        "manifest.json", "model.onnx", "report.html", "report.json", "report.txt",
    ]
    data = (directory / "model.onnx").read_bytes()
    assert data == compiled.onnx.SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["files"]["model.onnx"] == hashlib.sha256(data).hexdigest()
    assert manifest["target"]["name"] == "cpu-fp32"
    assert manifest["inputs"][0]["dynamic_dims"] == {"0": ["batch", 1, None]}
    report = json.loads((directory / "report.json").read_text())
    assert [entry["name"] for entry in report["passes"]] == [e.name for e in compiled.report.entries]
    assert (directory / "report.txt").read_text().strip() == str(compiled.report).strip()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging left


def test_save_refuses_a_non_empty_directory_without_force(case, tmp_path):
    _, _, compiled = case
    directory = tmp_path / "taken"
    directory.mkdir()
    (directory / "keep.txt").write_text("user data")
    with pytest.raises(ArtifactError, match="force"):
        compiled.save(directory)
    assert [path.name for path in directory.iterdir()] == ["keep.txt"]
    assert not [path for path in tmp_path.iterdir() if path.name != "taken"]  # no partial artifact
    compiled.save(directory, force=True)
    assert sorted(path.name for path in directory.iterdir()) == [
        "manifest.json", "model.onnx", "report.html", "report.json", "report.txt",
    ]


def test_save_accepts_an_existing_empty_directory(case, tmp_path):
    _, _, compiled = case
    directory = tmp_path / "empty"
    directory.mkdir()
    compiled.save(directory)
    assert (directory / "model.onnx").exists()
