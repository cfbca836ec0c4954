"""The artifact directory: ``model.onnx``, ``manifest.json``, ``report.json``, ``report.txt``.

Written into a temporary directory beside the destination and renamed into place, so an
interrupted write leaves any previous artifact whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import onnx

from compiler.errors import ArtifactError
from compiler.report import Ledger

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"


def package_versions() -> dict[str, str]:
    """Versions of fxpress and the libraries that shape the artifact."""
    versions = {}
    for name in ("fxpress", "torch", "onnx", "onnxruntime", "onnxscript"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def write_artifact(directory: Path, model: onnx.ModelProto, manifest: dict, report: Ledger, *, force: bool) -> Path:
    """Write the artifact atomically; refuse an existing non-empty destination unless ``force``."""
    directory = directory.resolve()
    if directory.exists() and not directory.is_dir():
        raise ArtifactError(f"{directory} exists and is not a directory")
    if directory.exists() and any(directory.iterdir()) and not force:
        raise ArtifactError(f"{directory} already exists; pass force=True (--force) to replace it")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    except OSError as error:
        raise ArtifactError(f"cannot write to {directory.parent}: {error.strerror}") from error
    try:
        _write_files(staging, model, manifest, report)
        _swap_into_place(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _write_files(staging: Path, model: onnx.ModelProto, manifest: dict, report: Ledger) -> None:
    data = model.SerializeToString()
    (staging / MODEL_FILE).write_bytes(data)
    manifest = {**manifest, "model_sha256": hashlib.sha256(data).hexdigest()}
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (staging / "report.json").write_text(report.to_json() + "\n")
    (staging / "report.txt").write_text(str(report) + "\n")
    for path in staging.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def _swap_into_place(staging: Path, directory: Path) -> None:
    if not directory.exists():
        os.replace(staging, directory)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
    os.replace(directory, retired / "artifact")
    os.replace(staging, directory)
    shutil.rmtree(retired, ignore_errors=True)
