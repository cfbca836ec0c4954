"""Everything true of ONNX Runtime alone: sessions and their options, its graph rewrites, dynamic int8, int8 tables.

Imports the core and :mod:`backends.onnx`; the driver reaches it through ``backends.REGISTRY``.
"""

from __future__ import annotations

from backends.onnxruntime.backend import (
    DISABLED_OPTIMIZERS,
    OnnxRuntimeBackend,
    OnnxRuntimeRunner,
    make_session,
)

__all__ = ["DISABLED_OPTIMIZERS", "OnnxRuntimeBackend", "OnnxRuntimeRunner", "make_session"]
