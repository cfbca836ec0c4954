"""The artifact directory: exact round trips through ``load``, and every bad file of TESTING.md.

A loaded artifact must reproduce the compiled model's outputs bit for bit (same ONNX bytes, same
runtime). Anything changed, truncated, garbled, pointing outside the directory or too new for the
runtime is refused with an ArtifactError naming the file, and writing is atomic: a failed or
refused write leaves any previous artifact byte-identical and no staging directory behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from onnx import TensorProto, helper, numpy_helper

import compiler
import compiler.artifact as artifact
from compiler import ArtifactError, load
from compiler.artifact import sha256_of

ARTIFACT_FILES = ["manifest.json", "model.onnx", "report.html", "report.json", "report.txt"]


# --- models and helpers -----------------------------------------------------------------------


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.fc1(x).relu())


class StructuredOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        y = self.linear(x)
        return {"logits": y, "aux": None, "pair": (y.relu(), (y * 2, y.sum(1))), "scale": 2.5}


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative name -> bytes)."""
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file()}


def staging_left(parent: Path) -> list[str]:
    return sorted(path.name for path in parent.iterdir() if ".partial-" in path.name)


def rehash(directory: Path, name: str = "model.onnx") -> None:
    """Make the manifest's checksum of ``name`` match the file again (to reach the checks after it)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"][name] = sha256_of(directory / name)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def edit_manifest(directory: Path, change) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    change(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def assert_same_outputs(actual, expected) -> None:
    """Same structure, and every tensor leaf bit-identical (not merely close)."""
    assert pytree.tree_structure(actual) == pytree.tree_structure(expected)
    for got, want in zip(pytree.tree_leaves(actual), pytree.tree_leaves(expected), strict=True):
        if isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got, want)
        else:
            assert got == want


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = SmallNet().eval()
    return model, compiler.compile(model, example_inputs=(torch.randn(2, 16),))


@pytest.fixture(scope="module")
def saved(small, tmp_path_factory) -> Path:
    """A pristine artifact of ``SmallNet``; tests copy it before changing anything."""
    return small[1].save(tmp_path_factory.mktemp("pristine") / "small")


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    destination = tmp_path / "artifact"
    shutil.copytree(saved, destination)
    return destination


# --- round trip -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [2, 7], ids=["export-batch", "other-batch"])
def test_load_reproduces_outputs_exactly(small, saved, batch):
    model, compiled = small
    loaded = load(saved)
    x = torch.randn(batch, 16)
    assert_same_outputs(loaded(x), compiled(x))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-3, atol=1e-5)
    assert loaded.onnx.SerializeToString() == compiled.onnx.SerializeToString()
    assert loaded.manifest == json.loads((saved / "manifest.json").read_text())
    assert loaded.report.to_dict() == compiled.report.to_dict()


def test_artifact_holds_exactly_its_files_with_checksums_and_no_paths(saved):
    assert sorted(path.name for path in saved.iterdir()) == ARTIFACT_FILES
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["format"] == artifact.FORMAT
    assert manifest["files"] == {"model.onnx": sha256_of(saved / "model.onnx")}
    # Paths and machine details would break reproducibility and leak into deployments.
    assert str(saved.parent) not in (saved / "manifest.json").read_text()
    assert not any(prop.key == "pkg.torch.onnx.stack_trace"
                   for node in onnx.load(str(saved / "model.onnx")).graph.node for prop in node.metadata_props)


def test_load_keeps_dict_none_nested_and_constant_outputs(tmp_path):
    torch.manual_seed(0)
    model = StructuredOutputs().eval()
    compiled = compiler.compile(model, example_inputs=(torch.randn(2, 4),))
    loaded = load(compiled.save(tmp_path / "structured"))
    for batch in (2, 5):
        x = torch.randn(batch, 4)
        output = loaded(x)
        assert type(output) is dict and list(output) == ["logits", "aux", "pair", "scale"]
        assert output["aux"] is None and output["scale"] == 2.5
        assert type(output["pair"]) is tuple and type(output["pair"][1]) is tuple
        assert_same_outputs(output, compiled(x))
        with torch.no_grad():
            torch.testing.assert_close(output["pair"][1][1], model(x)["pair"][1][1], rtol=1e-3, atol=1e-5)


def test_load_accepts_a_str_path_and_an_artifact_without_report(copy, small):
    (copy / "report.json").unlink()
    loaded = load(str(copy))
    x = torch.randn(3, 16)
    assert_same_outputs(loaded(x), small[1](x))
    assert loaded.report.entries == [] and loaded.report.model == small[1].manifest["model"]


# --- changed, truncated, empty or random model.onnx ---------------------------------------------

_CORRUPTIONS = {
    "flipped-byte": lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:],
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "random-bytes": lambda data: np.random.default_rng(0).bytes(len(data)),
    "appended": lambda data: data + b"\0",
}


@pytest.mark.parametrize("corrupt", list(_CORRUPTIONS.values()), ids=list(_CORRUPTIONS))
def test_changed_model_is_refused_by_its_checksum(copy, corrupt):
    path = copy / "model.onnx"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ArtifactError, match="does not match the SHA-256 in the manifest") as raised:
        load(copy)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("corrupt", [_CORRUPTIONS[name] for name in ("truncated", "empty", "random-bytes")],
                         ids=["truncated", "empty", "random-bytes"])
def test_unreadable_model_is_refused_even_when_its_checksum_matches(copy, corrupt):
    path = copy / "model.onnx"
    path.write_bytes(corrupt(path.read_bytes()))
    rehash(copy)
    with pytest.raises(ArtifactError, match="not a readable ONNX model|cannot be loaded by the runtime") as raised:
        load(copy)
    assert str(path) in str(raised.value)


def test_missing_model_file_is_refused(copy):
    (copy / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="model.onnx is missing; the artifact is incomplete"):
        load(copy)


def test_newer_ir_version_than_the_runtime_reads_is_refused(copy):
    from backends.onnx.export import max_runtime_ir_version

    path = copy / "model.onnx"
    model = onnx.load(str(path))
    model.ir_version = max_runtime_ir_version() + 1
    onnx.save_model(model, str(path))
    rehash(copy)
    with pytest.raises(ArtifactError, match=f"IR version {max_runtime_ir_version() + 1}, newer than onnxruntime") \
            as raised:
        load(copy)
    assert "upgrade onnxruntime or recompile" in str(raised.value)


# --- manifest ---------------------------------------------------------------------------------


def test_not_a_directory_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="is not an artifact directory"):
        load(tmp_path / "nothing-here")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="is not an artifact directory"):
        load(tmp_path / "file")


def test_missing_manifest_is_refused(copy):
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="has no manifest.json; it was not written by fxpress"):
        load(copy)


@pytest.mark.parametrize(("text", "message"), [
    ('{"format": "fxpress-artifact/1", ', "is not valid JSON"),
    ("\xff\xfe garbage", "is not valid JSON"),
    ("[1, 2]", "is not an fxpress-artifact/1 manifest"),
    ('{"format": "something-else/9", "files": {}}', "is not an fxpress-artifact/1 manifest"),
], ids=["cut-json", "binary", "json-list", "other-format"])
def test_garbled_manifest_is_refused(copy, text, message):
    (copy / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ArtifactError, match=message):
        load(copy)


def test_manifest_without_model_checksum_is_refused(copy):
    edit_manifest(copy, lambda manifest: manifest.pop("files"))
    with pytest.raises(ArtifactError, match="lists no model.onnx checksum; refusing an unverified model"):
        load(copy)


@pytest.mark.parametrize("structure", [None, "not a treespec", 7], ids=["missing", "garbled", "wrong-type"])
def test_manifest_without_readable_output_structure_is_refused(copy, structure):
    def change(manifest):
        if structure is None:
            del manifest["output_structure"]
        else:
            manifest["output_structure"] = structure

    edit_manifest(copy, change)
    with pytest.raises(ArtifactError, match="has no readable output_structure"):
        load(copy)


def test_garbled_report_is_refused(copy):
    (copy / "report.json").write_text("{ not json")
    with pytest.raises(ArtifactError, match="report.json is not a readable fxpress report"):
        load(copy)


def test_manifest_file_entry_outside_the_directory_is_refused(copy, tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    edit_manifest(copy, lambda manifest: manifest["files"].update({"../outside.bin": sha256_of(outside)}))
    with pytest.raises(ArtifactError, match=r"'\.\./outside\.bin' points outside"):
        load(copy)


# --- external data ----------------------------------------------------------------------------


def _hand_built_external_model(directory: Path, location: str, weights_path: Path) -> np.ndarray:
    """``y = x + w`` with ``w`` stored as external data at ``location``; returns ``w``."""
    weights = np.arange(12, dtype=np.float32).reshape(3, 4)
    weights_path.write_bytes(weights.tobytes())
    tensor = numpy_helper.from_array(weights, "w")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(weights.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["output"])], "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])], initializer=[tensor],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    (directory / "model.onnx").write_bytes(model.SerializeToString())
    rehash(directory)
    return weights


def test_external_data_inside_the_directory_loads(copy):
    """The control for the refusals below: the same hand-built model loads when its data is inside."""
    weights = _hand_built_external_model(copy, "weights.bin", copy / "weights.bin")

    def describe_hand_built_model(manifest):
        manifest["files"].update({"weights.bin": sha256_of(copy / "weights.bin")})
        manifest["inputs"] = [{"name": "x", "dtype": "float32", "shape": [3, 4],
                               "dynamic_dims": {"0": ["batch", 1, None]}}]

    edit_manifest(copy, describe_hand_built_model)
    x = torch.randn(3, 4)
    assert torch.equal(load(copy)(x), x + torch.from_numpy(weights))


@pytest.mark.parametrize("kind", ["dot-dot", "absolute"])
def test_external_data_path_outside_the_directory_is_refused(copy, tmp_path, kind):
    weights_path = tmp_path / "weights.bin"  # a real, readable file: only the path check stops it
    location = "../weights.bin" if kind == "dot-dot" else str(weights_path)
    _hand_built_external_model(copy, location, weights_path)
    with pytest.raises(ArtifactError, match="points outside") as raised:
        load(copy)
    assert repr(location) in str(raised.value)


def test_external_data_symlinked_outside_the_directory_is_refused(copy, tmp_path):
    weights_path = tmp_path / "weights.bin"
    _hand_built_external_model(copy, "weights.bin", weights_path)
    (copy / "weights.bin").symlink_to(weights_path)
    with pytest.raises(ArtifactError, match="points outside"):
        load(copy)


@pytest.fixture
def external_threshold(monkeypatch):
    monkeypatch.setattr(artifact, "EXTERNAL_DATA_THRESHOLD", 1024)


def test_large_model_keeps_weights_in_hashed_external_data(small, tmp_path, external_threshold):
    _, compiled = small
    directory = compiled.save(tmp_path / "external")
    assert sorted(path.name for path in directory.iterdir()) == sorted([*ARTIFACT_FILES, "model.onnx.data"])
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["files"] == {name: sha256_of(directory / name) for name in ("model.onnx", "model.onnx.data")}
    # fc1's 16x32 weight (over onnx's 1 KiB per-tensor threshold) lives in the data file.
    stored = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    external = [tensor.name for tensor in stored.graph.initializer if tensor.data_location == TensorProto.EXTERNAL]
    assert external and (directory / "model.onnx.data").stat().st_size >= 16 * 32 * 4
    x = torch.randn(5, 16)
    assert_same_outputs(load(directory)(x), compiled(x))


def test_saving_with_external_data_leaves_the_compiled_model_unchanged(small, saved, tmp_path, monkeypatch):
    _, compiled = small
    before = compiled.onnx.SerializeToString()
    monkeypatch.setattr(artifact, "EXTERNAL_DATA_THRESHOLD", 1024)
    first = compiled.save(tmp_path / "first")
    assert compiled.onnx.SerializeToString() == before  # saving must not strip the weights out of it
    second = compiled.save(tmp_path / "second")
    assert snapshot(first) == snapshot(second)
    x = torch.randn(2, 16)
    assert_same_outputs(load(second)(x), compiled(x))
    monkeypatch.undo()
    assert snapshot(compiled.save(tmp_path / "inline")) == snapshot(saved)


def test_changed_external_data_is_refused(small, tmp_path, external_threshold):
    directory = small[1].save(tmp_path / "external")
    data = directory / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ArtifactError, match="model.onnx.data does not match the SHA-256"):
        load(directory)


# --- writing ----------------------------------------------------------------------------------


def test_existing_output_is_refused_without_force_and_kept_intact(small, tmp_path):
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "keep.txt").write_text("old")
    with pytest.raises(ArtifactError, match=r"already exists; pass --force \(force=True\) to replace it"):
        small[1].save(destination)
    assert snapshot(destination) == {"keep.txt": b"old"}
    assert staging_left(tmp_path) == []


def test_force_replaces_the_existing_output(small, saved, tmp_path):
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "stale.txt").write_text("old")
    small[1].save(destination, force=True)
    assert snapshot(destination) == snapshot(saved)
    assert staging_left(tmp_path) == []


def test_empty_existing_directory_is_written_without_force(small, tmp_path):
    (tmp_path / "out").mkdir()
    small[1].save(tmp_path / "out")
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ARTIFACT_FILES


def test_output_that_is_a_file_is_refused(small, tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(ArtifactError, match="exists and is not a directory"):
        small[1].save(tmp_path / "out", force=True)
    assert (tmp_path / "out").read_text() == "a file"


def test_output_below_a_file_is_refused(small, tmp_path):
    (tmp_path / "blocker").write_text("a file")
    with pytest.raises(ArtifactError, match="blocker is not a directory; choose another output path"):
        small[1].save(tmp_path / "blocker" / "sub" / "out")
    assert (tmp_path / "blocker").read_text() == "a file"
    assert staging_left(tmp_path) == []


def test_unwritable_output_directory_is_refused(small, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running as a user whom permissions do not stop (root)")
        with pytest.raises(ArtifactError, match="locked: permission denied; choose a writable path"):
            small[1].save(parent / "out")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o700)


def _fail_while_writing(monkeypatch, error: BaseException) -> None:
    """Make the write fail after model.onnx is half written into the staging directory."""
    def half_then_fail(model, path, *args, **kwargs):
        data = model.SerializeToString()
        Path(path).write_bytes(data[: len(data) // 2])
        raise error

    monkeypatch.setattr(onnx, "save_model", half_then_fail)


@pytest.mark.parametrize(("error", "raised_type", "message"), [
    (RuntimeError("boom"), RuntimeError, "boom"),
    (KeyboardInterrupt(), KeyboardInterrupt, None),
    (OSError(errno.ENOSPC, "No space left on device"), ArtifactError, "No space left on device.*nothing was replaced"),
], ids=["exception", "interrupt", "disk-full"])
def test_failed_write_keeps_the_old_artifact_and_leaves_no_staging(small, saved, tmp_path, monkeypatch, error,
                                                                   raised_type, message):
    destination = tmp_path / "out"
    shutil.copytree(saved, destination)
    before = snapshot(destination)
    _fail_while_writing(monkeypatch, error)
    with pytest.raises(raised_type, match=message):
        small[1].save(destination, force=True)
    assert snapshot(destination) == before
    assert staging_left(tmp_path) == []
    with pytest.raises(raised_type):
        small[1].save(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert staging_left(tmp_path) == []


def test_failed_swap_puts_the_old_artifact_back(small, saved, tmp_path, monkeypatch):
    destination = tmp_path / "out"
    shutil.copytree(saved, destination)
    (destination / "old-marker").write_text("old")
    before = snapshot(destination)
    real_rename = os.rename

    def rename(source, target):
        if ".partial-" in Path(source).name and Path(target) == destination:
            raise OSError(errno.EIO, "Input/output error")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(ArtifactError, match="Input/output error"):
        small[1].save(destination, force=True)
    assert snapshot(destination) == before
    assert staging_left(tmp_path) == []


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_staging_of_dead_writers_is_removed_and_live_ones_kept(small, tmp_path):
    dead = _dead_pid()
    stale_same = tmp_path / f".out.partial-{dead}-abc"
    stale_sibling = tmp_path / f".other.partial-{dead}-def"
    live = tmp_path / f".out.partial-{os.getpid()}-live"
    for directory in (stale_same, stale_sibling, live):
        directory.mkdir()
        (directory / "model.onnx").write_bytes(b"half")
    unrelated = tmp_path / ".notes.partial-x"  # not fxpress's pattern (no pid): left alone
    unrelated.mkdir()
    small[1].save(tmp_path / "out")
    assert staging_left(tmp_path) == sorted([live.name, unrelated.name])
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ARTIFACT_FILES
