"""fxpress: capture a PyTorch model, run verified passes with a per-pass ledger, lower to ONNX.

The core (capture, IR, meta, pass base and manager, targets, artifact, report, errors) imports
neither ``passes`` nor ``backends``; the driver (``api``, ``pipeline``, ``cli``) reaches them through
their registries. This package's public surface:

from compiler import compile
compiled = compile(model, target="cpu-fp32", example_inputs=(x,))
compiled(x); compiled.save("out/"); print(compiled.report)

Pipelines: ``load_recipe("recipe.toml")`` and ``run_recipe(recipe, output)`` (``fxpress run``), and
``bisect(model, target, example_inputs, eval_inputs=..., gates=[parse_gate("top1_agreement >= 0.97")])``
(``fxpress bisect``), and ``search(recipe, "out/")`` (``fxpress search``: the fastest trial of the
recipe's ``[search.space]`` that passes its gates).
"""

from __future__ import annotations

from compiler.api import compile, inspect, load
from compiler.bisect import BisectReport, bisect
from compiler.compiled import CompiledModel
from compiler.errors import (
    AccuracyError,
    ArtifactError,
    CalibrationDataError,
    CaptureError,
    EmulationError,
    FallbackError,
    FxpressError,
    InputError,
    LoweringError,
    PassError,
    TargetError,
    UnsupportedOperatorError,
    UsageError,
    VerificationError,
)
from compiler.gates import Gate, parse_gate
from compiler.recipe import Recipe, load_recipe
from compiler.recipe_run import run_recipe
from compiler.report import Ledger, LedgerEntry
from compiler.search import SearchReport, search
from compiler.targets import TARGETS, PassSpec, Target, Tolerance

__all__ = [
    "TARGETS", "AccuracyError", "BisectReport", "Gate", "Recipe", "bisect", "load_recipe", "parse_gate",
    "run_recipe", "SearchReport", "search", "ArtifactError", "CalibrationDataError", "CaptureError",
    "CompiledModel", "EmulationError", "FallbackError", "FxpressError", "InputError", "Ledger", "LedgerEntry",
    "LoweringError", "PassError",
    "PassSpec", "Target", "TargetError", "Tolerance", "UnsupportedOperatorError", "UsageError",
    "VerificationError", "compile", "inspect", "load",
]
