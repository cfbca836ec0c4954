"""Layers point one way: the core imports neither ``passes`` nor ``backends`` nor the driver.

The driver (``compiler.api``, ``compiler.pipeline``, the command under ``compiler.cli``, and what
drives whole compiles: recipes, bisection, search) reaches
``passes`` and ``backends`` through their registries; passes and backends import the core and
never each other; ``models`` imports nothing of ours. An AST walk over every module checks every
``import`` statement, including those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("compiler", "passes", "backends", "models")
DRIVER = ("compiler.api", "compiler.pipeline", "compiler.cli", "compiler.recipe", "compiler.recipe_run",
          "compiler.bisect", "compiler.search")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file; ``from a import b`` counts as ``a.b`` and ``a``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def forbidden_for(importer: str) -> tuple[str, ...]:
    """What ``importer`` may not import."""
    if importer.startswith("models"):
        return ("compiler", "passes", "backends")
    if _within(importer, DRIVER) or importer == "compiler":
        return ()  # the driver and the public package may reach the registries
    if importer.startswith("compiler"):
        return ("passes", "backends", *DRIVER)
    if importer.startswith("passes"):
        return ("backends", *DRIVER)
    if importer.startswith("backends"):
        return ("passes", *DRIVER)
    return ()


def violations(root: Path) -> list[str]:
    """One line per offending import statement: ``file:line: importer imports module``."""
    found: dict[tuple[str, int], str] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            importer = module_name(path, root)
            banned = forbidden_for(importer)
            for line, imported in imported_modules(path):
                if _within(imported, banned):
                    where = str(path.relative_to(root))
                    found.setdefault((where, line), f"{where}:{line}: {importer} imports {imported}")
    return [found[key] for key in sorted(found)]


def test_no_import_points_against_the_layers():
    assert violations(ROOT) == []


@pytest.mark.parametrize(("file", "statement"), [
    ("compiler/ir.py", "from backends.onnxruntime import make_session"),
    ("compiler/ir.py", "import passes"),
    ("passes/cleanup/remove_noops.py", "import backends.onnxruntime"),
    ("backends/onnx/weight_storage.py", "from passes.quant import policy"),
    ("passes/cleanup/remove_noops.py", "from compiler.api import compile"),
    ("models/small.py", "from compiler import meta"),
])
def test_a_planted_reverse_import_is_caught(tmp_path, file, statement):
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            copy = tmp_path / path.relative_to(ROOT)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(path.read_text())
    planted = tmp_path / file
    planted.write_text(planted.read_text() + f"\n\ndef _planted():\n    {statement}\n")
    (found,) = violations(tmp_path)
    assert found.startswith(f"{file}:")


def test_the_driver_may_reach_the_registries():
    assert forbidden_for("compiler.pipeline") == () and forbidden_for("compiler.cli.main") == ()
    assert "backends" in forbidden_for("compiler.capture")
