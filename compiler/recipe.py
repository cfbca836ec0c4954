"""Recipes: a TOML file that says what to compile, with which data, against which gates.

A recipe names the model (a zoo name or ``file.py:factory``), the target with its float layers
and per-pass option overrides, pruning, low-rank factorisation and recovery, the data
(calibration, training, evaluation), the gates, the benchmark and the output directory. Every
key is checked before any work starts: an unknown key is refused with the closest known one
suggested, a bad value with what is allowed (:class:`~compiler.errors.UsageError`, exit 2).

    [model]
    source = "efficientnet-lite0"

    [compile]
    target = "cpu-int8"
    float_modules = ["_conv_stem"]

    [data.calibration]
    zoo = true
    samples = 256

    gates = ["top1_agreement >= 0.97"]   # top level, before the first table

Relative paths are read from the recipe's directory.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from compiler.errors import FxpressError, UsageError
from compiler.gates import QUALITY_METRICS, Gate, parse_gate
from compiler.input_format import LAYOUTS
from compiler.pruning_options import (
    _BUDGETS,
    _LOW_RANK_BUDGETS,
    _LOW_RANK_OPTIONS,
    _OPTIONS,
    _RECOVER_OPTIONS,
    _UNSTRUCTURED,
    _UNSTRUCTURED_OPTIONS,
)

Check = Callable[[Any, str], None]
#: Keys that each name one data source; a data table holds exactly one of them.
SOURCE_KINDS = ("zoo", "images", "npy", "npz", "text", "factory")


def _fail(where: str, message: str) -> None:
    raise UsageError(f"recipe key {where}: {message}")


def _string(value: Any, where: str) -> None:
    if not isinstance(value, str) or not value:
        _fail(where, f"expected a non-empty string, got {value!r}")


def _boolean(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        _fail(where, f"expected true or false, got {value!r}")


def _integer(low: int) -> Check:
    def check(value: Any, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            _fail(where, f"expected an integer >= {low}, got {value!r}")
    return check


def _number(low: float, high: float | None = None, *, high_open: bool = False) -> Check:
    def check(value: Any, where: str) -> None:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        above = numeric and value >= low
        below = numeric and (high is None or (value < high if high_open else value <= high))
        if not (above and below):
            bound = "" if high is None else f" and {'<' if high_open else '<='} {high:g}"
            _fail(where, f"expected a number >= {low:g}{bound}, got {value!r}")
    return check


def _choice(allowed: tuple[str, ...] | Callable[[], tuple[str, ...]]) -> Check:
    def check(value: Any, where: str) -> None:
        options = allowed() if callable(allowed) else allowed
        if value not in options:
            _fail(where, f"{value!r} is not one of {', '.join(map(repr, options))}{_closest(value, options)}")
    return check


def _list_of(item: Check, *, length: int | None = None) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, list) or not value:
            _fail(where, f"expected a non-empty list, got {value!r}")
        if length is not None and len(value) != length:
            _fail(where, f"expected {length} values, got {len(value)}")
        for index, element in enumerate(value):
            item(element, f"{where}[{index}]")
    return check


def _threads(value: Any, where: str) -> None:
    if value != "auto":
        _integer(1)(value, where)


def _scalar(value: Any, where: str) -> None:
    if not isinstance(value, (str, int, float, bool)):
        _fail(where, f"expected a string, number or boolean, got {value!r}")


def _space_value(value: Any, where: str) -> None:
    """A value a search axis tries: a scalar, or a list of strings (``compile.float_modules``; empty: none)."""
    if not isinstance(value, list):
        _scalar(value, where)
    elif value:
        _list_of(_string)(value, where)


def _any_table(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        _fail(where, f"expected a table, got {value!r}")


def _targets() -> tuple[str, ...]:
    from compiler.targets import TARGETS

    return tuple(TARGETS)


def _calibrators() -> tuple[str, ...]:
    from compiler.targets import CALIBRATORS

    return tuple(CALIBRATORS)


_SOURCE = {
    "zoo": _boolean, "images": _string, "npy": _string, "npz": _string, "text": _string, "factory": _string,
    "samples": _integer(1), "resize": _integer(1), "crop": _integer(1),
    "mean": _list_of(_number(0, 1), length=3), "std": _list_of(_number(1e-6), length=3),
    "tokenizer": _string, "seq_len": _integer(2), "labels": _string, "arrays": _list_of(_string),
}
_INPUT_FORMAT = {
    "dtype": _choice(("uint8",)), "mean": _list_of(_number(0, 1), length=3),
    "std": _list_of(_number(1e-6), length=3), "layout": _choice(LAYOUTS),
}
#: Every key a recipe may hold: a check, or a nested table of them. ``"*"`` matches any key.
SCHEMA: dict[str, Any] = {
    "gates": _list_of(_string),
    "model": {"source": _string},
    "compile": {
        "target": _choice(_targets), "float_modules": _list_of(_string), "float_prefix": _integer(0),
        "float_macs": _number(0, 1),
        "calibrator": _choice(_calibrators), "threads": _threads, "strict": _boolean, "input_format": _INPUT_FORMAT,
    },
    "passes": {"*": _any_table},
    "prune": dict.fromkeys(_BUDGETS + _UNSTRUCTURED + _OPTIONS + _UNSTRUCTURED_OPTIONS),
    "low_rank": dict.fromkeys(_LOW_RANK_BUDGETS + _LOW_RANK_OPTIONS),
    "recover": {"seconds": _number(0), **dict.fromkeys(_RECOVER_OPTIONS)},
    "data": {"calibration": _SOURCE, "train": _SOURCE, "evaluation": _SOURCE},
    "bench": {"batches": _list_of(_integer(1)), "runs": _integer(3), "warmup": _integer(0)},
    "output": {"directory": _string},
    "search": {"space": {"*": _list_of(_space_value)}, "workers": _integer(1),
               "simulation_margin": {name: _number(0) for name in QUALITY_METRICS}},
}
_REQUIRED = ("model.source",)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe: its tables as read, where it came from, and its parsed gates."""

    data: dict[str, Any]
    path: Path | None
    text: str
    gates: tuple[Gate, ...]

    @property
    def sha256(self) -> str:
        """SHA-256 of the recipe's text, recorded in the artifact's manifest."""
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def base(self) -> Path:
        """The directory relative paths are read from."""
        return self.path.parent if self.path is not None else Path.cwd()

    def get(self, dotted: str, default: Any = None) -> Any:
        """The value at ``"compile.target"``, or ``default``."""
        node: Any = self.data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def resolve_path(self, text: str) -> Path:
        """A path from the recipe, relative to the recipe's directory."""
        path = Path(text).expanduser()
        return path if path.is_absolute() else self.base / path

    def with_gates(self, extra: list[str]) -> Recipe:
        """This recipe with gates from the command line added after its own."""
        parsed = tuple(parse_gate(text, where=f"--gate {text!r}") for text in extra)
        return dataclasses.replace(self, gates=self.gates + parsed)

    def patched(self, patch: Mapping[str, Any]) -> Recipe:
        """This recipe with ``patch``'s tables merged in (lists replace, tables merge), re-validated."""
        merged = _merge(copy.deepcopy(self.data), patch)
        return from_dict(merged, path=self.path, text=self.text + "\n# patched\n" + to_toml(dict(patch)))


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file.

    Raises:
        UsageError: the file is missing or not TOML (with its line), or a key or value is bad.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"recipe {path} does not exist")
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"recipe {path} is not valid TOML: {error}") from None
    return from_dict(data, path=path, text=text)


def from_dict(data: dict[str, Any], *, path: Path | None = None, text: str | None = None) -> Recipe:
    """Validate recipe tables given as a dict (as ``tomllib`` reads them)."""
    _check_table(data, SCHEMA, "")
    for dotted in _REQUIRED:
        if _lookup(data, dotted) is None:
            _fail(dotted, "is required, e.g. source = \"efficientnet-lite0\" or \"model.py:build\"")
    for kind in ("calibration", "train", "evaluation"):
        _check_source(data.get("data", {}).get(kind), f"data.{kind}")
    gates = tuple(parse_gate(text, where=f"recipe key gates[{index}]")
                  for index, text in enumerate(data.get("gates", [])))
    recipe = Recipe(data, path, text if text is not None else to_toml(data), gates)
    if data.get("search", {}).get("space"):
        _check_search_space(data, path)  # each trial's recipe is checked whole: the space may complete the base
    else:
        _check_options(recipe)
    return recipe


def _check_search_space(data: dict[str, Any], path: Path | None) -> None:
    """Every value of ``search.space`` makes a valid recipe (its key and value checked as if written there)."""
    from compiler.search import UNSET, apply

    for key, values in data.get("search", {}).get("space", {}).items():
        for value in values:
            try:
                from_dict(apply(data, {key: value}), path=path, text="")
            except UsageError as error:
                if value == UNSET:
                    continue
                raise UsageError(f"recipe key search.space.{key!r} value {value!r}: {error}") from None


def _lookup(data: dict, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _check_table(table: Any, schema: dict[str, Any], prefix: str) -> None:
    if not isinstance(table, dict):
        _fail(prefix.rstrip("."), f"expected a table, got {table!r}")
    for key, value in table.items():
        where = f"{prefix}{key}"
        rule = schema.get(key, schema.get("*", _UNKNOWN))
        if rule is _UNKNOWN:
            known = [name for name in schema if name != "*"]
            _fail(where, f"unknown key{_closest(key, known, prefix)}; allowed in "
                  f"{prefix.rstrip('.') or 'the top level'}: {', '.join(known)}")
        if isinstance(rule, dict):
            _check_table(value, rule, f"{where}.")
        elif rule is not None:
            rule(value, where)


_UNKNOWN = object()


def _closest(word: Any, known, prefix: str = "") -> str:
    close = difflib.get_close_matches(str(word), [str(name) for name in known], n=1, cutoff=0.6)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def _check_source(source: dict | None, where: str) -> None:
    if source is None:
        return
    kinds = [kind for kind in SOURCE_KINDS if kind in source]
    if len(kinds) != 1:
        _fail(where, f"give exactly one data source of {', '.join(SOURCE_KINDS)}; got "
              f"{', '.join(kinds) or 'none'}")
    if source.get("zoo") is False:
        _fail(f"{where}.zoo", "false names no data; give another source or drop the table")
    if "arrays" in source and "npz" not in source:
        _fail(f"{where}.arrays", "applies to npz sources only")
    for key in ("resize", "crop", "mean", "std"):
        if key in source and "images" not in source:
            _fail(f"{where}.{key}", "applies to images sources only")
    for key in ("tokenizer", "seq_len"):
        if key in source and "text" not in source and not (key == "seq_len" and "zoo" in source):
            _fail(f"{where}.{key}", "applies to text sources (seq_len also to zoo text data) only")


def _check_options(recipe: Recipe) -> None:
    """Pass options, pruning, low-rank and recovery options, checked against the target before any work."""
    from compiler.pipeline import build_passes
    from compiler.pruning_options import compression_passes

    target = recipe_target(recipe)
    try:
        build_passes(target)
        compression_passes(recipe.get("prune"), recipe.get("low_rank"), recipe_recover_seconds(recipe),
                           recipe_recover_options(recipe))
    except FxpressError as error:
        raise UsageError(f"recipe: {error}") from None


def recipe_target(recipe: Recipe):
    """The recipe's target with its float layers, fallback budget, calibrator and pass overrides applied."""
    from compiler.targets import get_target, with_calibrator, with_float_fallback, with_float_layers

    target = get_target(recipe.get("compile.target", "cpu-fp32"))
    if floats := recipe.get("compile.float_modules"):
        target = _checked(lambda: with_float_layers(target, modules=floats), "compile.float_modules")
    if prefix := recipe.get("compile.float_prefix"):
        target = _checked(lambda: with_float_layers(target, prefix=prefix), "compile.float_prefix")
    if (budget := recipe.get("compile.float_macs")) is not None:
        target = _checked(lambda: with_float_fallback(target, budget), "compile.float_macs")
    if (calibrator := recipe.get("compile.calibrator")) is not None:
        target = _checked(lambda: with_calibrator(target, calibrator), "compile.calibrator")
    return _with_pass_options(target, recipe.get("passes", {}))


def _checked(make: Callable[[], Any], where: str) -> Any:
    try:
        return make()
    except FxpressError as error:
        raise UsageError(f"recipe key {where}: {error}") from None


def _with_pass_options(target, overrides: dict[str, dict]):
    names = [spec.name for spec in target.pipeline]
    for name in overrides:
        if name not in names:
            _fail(f"passes.{name}", f"target {target.name!r} runs no such pass{_closest(name, names)}; "
                  f"its passes: {', '.join(dict.fromkeys(names))}")
    from compiler.pipeline import registry
    from compiler.targets import PassSpec

    passes = registry("passes")
    for name, options in overrides.items():
        known = tuple(passes[name].default_options) if name in passes else ()
        for option in options:
            if option not in known:
                _fail(f"passes.{name}.{option}", f"pass {name!r} has no such option{_closest(option, known)}; "
                      f"its options: {', '.join(known) or 'none'}")
    pipeline = tuple(PassSpec(spec.name, {**spec.options, **overrides.get(spec.name, {})})
                     for spec in target.pipeline)
    return dataclasses.replace(target, pipeline=pipeline)


def recipe_recover_seconds(recipe: Recipe) -> float:
    """The recovery budget: ``recover.seconds``, 180 by default as in ``compile``."""
    return float(recipe.get("recover.seconds", 180.0))


def recipe_recover_options(recipe: Recipe) -> dict | None:
    """Recovery options other than its budget, or None."""
    options = {key: value for key, value in recipe.get("recover", {}).items() if key != "seconds"}
    return options or None


def _merge(base: dict, patch: Mapping[str, Any]) -> dict:
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def to_toml(data: Mapping[str, Any]) -> str:
    """Recipe tables as TOML text (strings, numbers, booleans, lists and nested tables)."""
    lines: list[str] = []
    _emit(data, [], lines)
    return "\n".join(lines).strip() + "\n"


def _emit(table: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = {key: value for key, value in table.items() if not isinstance(value, Mapping)}
    tables = {key: value for key, value in table.items() if isinstance(value, Mapping)}
    if scalars and path:
        lines.append(f"\n[{'.'.join(path)}]")
    lines += [f"{_key(key)} = {_value(value)}" for key, value in scalars.items()]
    for key, value in tables.items():
        _emit(value, [*path, _key(key)], lines)


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _value(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
