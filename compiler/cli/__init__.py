"""The ``fxpress`` command and its jobs: the command, the zoo-or-factory model source, workloads, bench, verify.

The driver's outer layer: it imports the public API (:mod:`compiler.api`) and the core; nothing
in the core, ``passes`` or ``backends`` imports it.
"""

from __future__ import annotations

from compiler.cli.main import main

__all__ = ["main"]
