"""The backend registry: name -> backend class."""

from __future__ import annotations

from backends.onnxruntime import OnnxRuntimeBackend
from compiler.backend_base import Backend

REGISTRY: dict[str, type[Backend]] = {cls.name: cls for cls in (OnnxRuntimeBackend,)}

__all__ = ["REGISTRY"]
