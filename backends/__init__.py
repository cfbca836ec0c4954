"""The backends, one folder each (plus ``onnx/``, what ONNX backends share), and their registry: name -> class.

Backends import the core and never ``passes`` or the driver; the driver reaches them through ``REGISTRY``.
"""

from __future__ import annotations

from backends.onnxruntime import OnnxRuntimeBackend
from backends.tensorrt.backend import TensorRTBackend
from compiler.backend_base import Backend

REGISTRY: dict[str, type[Backend]] = {cls.name: cls for cls in (OnnxRuntimeBackend, TensorRTBackend)}

__all__ = ["REGISTRY"]
