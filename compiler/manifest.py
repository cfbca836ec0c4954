"""The manifest: what a deployment must know about an artifact, and nothing that varies by run.

No timestamps, paths or timings (those live in ``report.json``), so compiling the same model
twice gives the same bytes.
"""

from __future__ import annotations

import hashlib
from importlib import metadata

import torch
import torch.utils._pytree as pytree

from compiler.artifact import FORMAT
from compiler.errors import ArtifactError

_JSON_SCALARS = (type(None), bool, int, float, str)


def package_versions() -> dict[str, str]:
    """Versions of fxpress and the libraries that shape the artifact."""
    versions = {}
    for name in ("fxpress", "torch", "onnx", "onnxruntime", "onnxscript"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def build_manifest(result, output_names: tuple[str, ...], info: dict, calibration_data: object = None) -> dict:
    """The manifest of a compile (``result`` is a ``compiler.pipeline.PipelineResult``)."""
    captured = result.captured
    target = result.target.to_dict()
    target["pipeline"] = [{"name": entry.name, "options": entry.options} for entry in result.ledger.entries]
    pixel_format = result.ledger.capture.get("input_format")
    return {
        **({"input_format": pixel_format} if pixel_format else {}),  # the uint8 pixels the model takes
        "format": FORMAT,
        "model": result.ledger.model,
        "versions": package_versions(),
        "target": target,
        "front_end": captured.front_end,
        "inputs": _input_records(captured, result.inputs),
        "outputs": [
            {"name": name, "dtype": _dtype(tensor), "shape": list(tensor.shape)}
            for name, tensor in zip(output_names, result.reference, strict=True)
        ],
        "output_structure": pytree.treespec_dumps(captured.output_spec),
        "output_constants": _constants(captured.output_constants),
        "calibration_data_sha256": hash_calibration_data(calibration_data),
        "opset": info.get("opset"),
        "ir_version": info.get("ir_version"),
    }


def _input_records(captured, inputs: tuple[torch.Tensor, ...]) -> list[dict]:
    return [
        {
            "name": name,
            "dtype": _dtype(tensor),
            "shape": list(tensor.shape),
            "dynamic_dims": {str(dim): list(spec) for dim, spec in captured.dynamic_dims.get(index, {}).items()},
        }
        for index, (name, tensor) in enumerate(zip(captured.input_names, inputs, strict=True))
    ]


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _constants(constants: dict[int, object]) -> dict[str, object]:
    for index, value in constants.items():
        if not isinstance(value, _JSON_SCALARS):
            raise ArtifactError(
                f"output {index} is a constant {type(value).__name__}, which an artifact cannot store; "
                "return tensors, numbers, strings or None"
            )
    return {str(index): value for index, value in sorted(constants.items())}


def hash_calibration_data(data: object) -> str | None:
    """SHA-256 over the dtypes, shapes and bytes of calibration tensors; None when there are none.

    Only materialised data (a tensor, or a list/tuple/dict of them) is hashed: hashing a one-pass
    iterator here would consume it.
    """
    if data is None:
        return None
    digest = hashlib.sha256()
    if not _feed(digest, data):
        return "not hashed: a one-pass iterable"
    return digest.hexdigest()


def _feed(digest, data: object) -> bool:
    if isinstance(data, torch.Tensor):
        tensor = data.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return True
    if isinstance(data, dict):
        for key in sorted(data):
            digest.update(str(key).encode())
            if not _feed(digest, data[key]):
                return False
        return True
    if isinstance(data, (list, tuple)):
        return all(_feed(digest, item) for item in data)
    return False
