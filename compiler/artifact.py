"""The artifact directory: ``model.onnx``, ``manifest.json``, ``report.json``, ``report.txt``, ``report.html``.

Writing goes into a staging directory beside the destination, renamed into place at the end, so
an interrupted write leaves any previous artifact whole. A process killed outright (SIGKILL)
cannot clean up after itself: its staging directory (``.NAME.partial-PID-...``) is removed by the
next fxpress write beside it. Reading checks the SHA-256 of every model file against the
manifest and never unpickles anything. The reports hold timings, so they are not checksummed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import onnx

from compiler.errors import ArtifactError
from compiler.report import Ledger
from compiler.report_html import render_html

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MANIFEST_FILE = "manifest.json"
REPORT_JSON = "report.json"
REPORT_TEXT = "report.txt"
REPORT_HTML = "report.html"
FORMAT = "fxpress-artifact/1"
_RESERVED = (MODEL_FILE, DATA_FILE, MANIFEST_FILE, REPORT_JSON, REPORT_TEXT, REPORT_HTML)
# protobuf cannot serialise a message of 2 GiB or more: larger models keep weights beside it.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24


def write_artifact(directory: Path, model: onnx.ModelProto, manifest: dict, report: Ledger, *, force: bool,
                   files: dict[str, bytes] | None = None) -> Path:
    """Write the artifact atomically; refuse an existing non-empty destination unless ``force``.

    ``files``: further files (name -> bytes, plain names in the directory), checksummed like the model.
    """
    directory = Path(os.path.abspath(directory))
    check_destination(directory, force)
    _remove_stale_staging(directory)
    staging = _make_staging(directory)
    try:
        _write_files(staging, model, manifest, report, files or {})
        _swap_into_place(staging, directory, force)
    except OSError as error:  # disk full, permissions changed mid-write: an I/O error, not our bug
        shutil.rmtree(staging, ignore_errors=True)
        raise ArtifactError(f"cannot write the artifact {directory}: {error}; nothing was replaced") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def check_destination(directory: Path, force: bool) -> None:
    """Refuse a file, an existing non-empty directory without ``force``, or an unwritable parent."""
    if directory.exists() and not directory.is_dir():
        raise ArtifactError(f"{directory} exists and is not a directory; choose another output path")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise ArtifactError(f"{directory} already exists; pass --force (force=True) to replace it")
    _check_writable_parent(directory)


def _check_writable_parent(directory: Path) -> None:
    """Refuse a destination whose nearest existing ancestor is a file or not writable."""
    ancestor = directory.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ArtifactError(f"cannot write {directory}: {ancestor} is not a directory; choose another output path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot write into {ancestor}: permission denied; choose a writable path")


def _make_staging(directory: Path) -> Path:
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-{os.getpid()}-", dir=directory.parent))
    except OSError as error:
        message = f"cannot write into {directory.parent}: {error.strerror}; choose a writable path"
        raise ArtifactError(message) from error


def _remove_stale_staging(directory: Path) -> None:
    """Delete staging directories beside ``directory`` (any name) whose writing process no longer exists."""
    if not directory.parent.is_dir():
        return
    for candidate in directory.parent.glob(".*.partial-*"):
        pid_text = candidate.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        if candidate.is_dir() and pid_text.isdigit() and not _process_alive(int(pid_text)):
            shutil.rmtree(candidate, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_files(staging: Path, model: onnx.ModelProto, manifest: dict, report: Ledger,
                 extra: dict[str, bytes]) -> None:
    external = model.ByteSize() >= EXTERNAL_DATA_THRESHOLD
    if external:  # saving with external data strips the weights out of the proto: save a copy
        model = _copy(model)
    onnx.save_model(
        model, str(staging / MODEL_FILE), save_as_external_data=external,
        all_tensors_to_one_file=True, location=DATA_FILE,
    )
    files = [MODEL_FILE] + ([DATA_FILE] if external else [])
    for name, data in sorted(extra.items()):
        if Path(name).name != name or name in _RESERVED:
            raise ArtifactError(f"artifact file name {name!r} is not a plain, free file name")
        (staging / name).write_bytes(data)
        files.append(name)
    manifest = {**manifest, "files": {name: sha256_of(staging / name) for name in files}}
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (staging / REPORT_JSON).write_text(report.to_json() + "\n")
    (staging / REPORT_TEXT).write_text(str(report) + "\n")
    (staging / REPORT_HTML).write_text(render_html(report), encoding="utf-8")
    for path in staging.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied


def _swap_into_place(staging: Path, directory: Path, force: bool) -> None:
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
    if not directory.exists():
        try:
            os.rename(staging, directory)
        except OSError as error:
            message = f"{directory} appeared while writing (another compile?); nothing was replaced"
            raise ArtifactError(message) from error
        return
    if not force:
        raise ArtifactError(f"{directory} appeared while writing (another compile?); pass --force to replace it")
    _replace(staging, directory)


def _replace(staging: Path, directory: Path) -> None:
    """Move the old artifact aside, the new one into place, then delete the old; undo on failure."""
    retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-{os.getpid()}-old-", dir=directory.parent))
    old = retired / "artifact"
    try:
        os.rename(directory, old)
        try:
            os.rename(staging, directory)
        except OSError:
            os.rename(old, directory)  # put the old artifact back before reporting
            raise
    except OSError:
        if not old.exists():
            retired.rmdir()
        raise
    shutil.rmtree(retired, ignore_errors=True)


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict:
    """The manifest of an artifact directory, refusing anything that is not one."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not an artifact directory (expected {MANIFEST_FILE} and {MODEL_FILE})")
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except FileNotFoundError as error:
        raise ArtifactError(f"{directory} has no {MANIFEST_FILE}; it was not written by fxpress") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{directory / MANIFEST_FILE} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{directory / MANIFEST_FILE} is not an {FORMAT} manifest")
    return manifest


def read_model(directory: Path, manifest: dict) -> onnx.ModelProto:
    """Load ``model.onnx`` after checking every file's SHA-256 and every external-data path."""
    directory = Path(directory)
    for name, expected in sorted(manifest.get("files", {}).items()):
        path = _inside(directory, name)
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; the artifact is incomplete")
        if sha256_of(path) != expected:
            raise ArtifactError(f"{path} does not match the SHA-256 in the manifest: it was changed or truncated")
    if MODEL_FILE not in manifest.get("files", {}):
        raise ArtifactError(f"the manifest in {directory} lists no {MODEL_FILE} checksum; refusing an unverified model")
    try:
        model = onnx.load(str(directory / MODEL_FILE), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - protobuf raises several types for bad bytes
        raise ArtifactError(f"{directory / MODEL_FILE} is not a readable ONNX model: {error}") from error
    _check_external_paths(directory, model)
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(directory))
    except (OSError, ValueError) as error:
        raise ArtifactError(f"cannot read the external weights of {directory / MODEL_FILE}: {error}") from error
    return model


def _inside(directory: Path, name: str) -> Path:
    path = (directory / name).resolve()
    if directory.resolve() not in path.parents:
        raise ArtifactError(f"artifact file {name!r} points outside {directory}; refusing it")
    return path


def _check_external_paths(directory: Path, model: onnx.ModelProto) -> None:
    # onnx has no public iterator over every tensor (initializers and attributes); this one is stable.
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if onnx.external_data_helper.uses_external_data(tensor):
            location = {entry.key: entry.value for entry in tensor.external_data}.get("location", "")
            _inside(directory, location)
