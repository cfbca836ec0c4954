"""The ledger: one entry per pass, rendered as a readable table or as JSON.

Each entry says what the pass changed, what it cost, and what it did to the outputs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LedgerEntry:
    """What one pass did."""

    name: str
    options: dict[str, Any]
    modified: bool
    seconds: float
    stats: dict[str, Any]
    op_delta: dict[str, int]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    nodes_before: int
    nodes_after: int
    drift: dict[str, float | None]  # from the original model on the probe batch

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


@dataclass
class Ledger:
    """Everything fxpress did to a model, in order."""

    model: str
    target: str
    capture: dict[str, Any] = field(default_factory=dict)
    initial: dict[str, Any] = field(default_factory=dict)
    entries: list[LedgerEntry] = field(default_factory=list)
    lowering: dict[str, Any] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    # Accuracy and speed gates with their verdicts: GateResult.to_dict() ({"gate", "value", "passed", ...}).
    gates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def front_end(self) -> str:
        """The capture front end that worked."""
        return self.capture.get("front_end", "")

    def entry(self, name: str) -> LedgerEntry:
        """The first entry of the pass called ``name``."""
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(f"no pass {name!r} in the ledger; passes: {[e.name for e in self.entries]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; the pass entries are under ``"passes"``."""
        return {
            "model": self.model,
            "target": self.target,
            "capture": self.capture,
            "initial": self.initial,
            "passes": [entry.to_dict() for entry in self.entries],
            "lowering": self.lowering,
            "fallbacks": list(self.fallbacks),
            "gates": [dict(gate) for gate in self.gates],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ledger:
        """Rebuild a ledger from :meth:`to_dict` output (as stored in ``report.json``)."""
        return cls(
            model=data.get("model", ""), target=data.get("target", ""), capture=data.get("capture", {}),
            initial=data.get("initial", {}), entries=[LedgerEntry(**entry) for entry in data.get("passes", [])],
            lowering=data.get("lowering", {}), fallbacks=list(data.get("fallbacks", [])),
            gates=[dict(gate) for gate in data.get("gates", [])],
        )

    def to_json(self) -> str:
        """Indented JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def __str__(self) -> str:
        return render_table(self)


_COLUMNS = ("#", "pass", "mod", "ms", "stats", "ops delta", "params", "MACs", "max|diff|", "cosine")


def render_table(ledger: Ledger) -> str:
    """The ledger as a fixed-width text table."""
    rows = [_initial_row(ledger)] + [_entry_row(i, e) for i, e in enumerate(ledger.entries, 1)]
    widths = [max(len(str(row[col])) for row in rows + [_COLUMNS]) for col in range(len(_COLUMNS))]
    lines = [_header(ledger), *dynamic_lines(ledger.capture), _format_row(_COLUMNS, widths),
             _format_row(["-" * w for w in widths], widths)]
    lines += [_format_row(row, widths) for row in rows]
    lines += _lowering_lines(ledger)
    lines += [f"fallback: {text}" for text in ledger.fallbacks]
    lines += quantization_lines(ledger)
    lines += gate_lines(ledger)
    return "\n".join(lines)


def gate_lines(ledger: Ledger) -> list[str]:
    """The gates a recipe run measured, one line each with its value and verdict."""
    if not ledger.gates:
        return []
    lines = ["", "gates:"]
    for gate in ledger.gates:
        value = "inf" if gate.get("value") is None else f"{gate['value']:.4f}"
        lines.append(f"  {'PASS' if gate.get('passed') else 'FAIL'}  {gate.get('gate')}  (measured {value})")
    return lines


_QUANT_COLUMNS = ("module path", "tensor", "format", "scale", "range", "calibrator", "SQNR alone", "decision")


def quantization_lines(ledger: Ledger) -> list[str]:
    """Per layer, from ``insert_qdq`` (and ``quant_sensitivity``): how each tensor was quantised, and why."""
    entry = next((e for e in ledger.entries if e.name == "insert_qdq"), None)
    if entry is None or not entry.stats.get("layers"):
        return []
    rows = [_quant_row(layer) for layer in entry.stats["layers"]]
    widths = [max(len(row[col]) for row in [*rows, list(_QUANT_COLUMNS)]) for col in range(len(_QUANT_COLUMNS))]
    return ["", "quantisation, per layer (SQNR alone: the model output's when only that op is int8):",
            _format_row(_QUANT_COLUMNS, widths), _format_row(["-" * w for w in widths], widths),
            *(_format_row(row, widths) for row in rows)]


def _quant_row(layer: dict[str, Any]) -> list[str]:
    weight = layer.get("kind") == "weight"
    if weight and layer.get("decision") == "float":
        fmt, scale, span = layer.get("dtype", "float"), "", ""
    elif weight:
        fmt = f"int{layer['bits']} per-channel, bias {layer.get('bias', '')}"
        scale = f"{layer['scale'][0]:.2e}..{layer['scale'][1]:.2e}"
        span = f"[{layer['range'][0]:.3g}, {layer['range'][1]:.3g}]"
    else:
        fmt = f"{layer.get('dtype', '')} zp {layer.get('zero_point', '')}"
        scale, span = f"{layer['scale']:.3e}", f"[{layer['range'][0]:.3g}, {layer['range'][1]:.3g}]"
    sqnr = f"{layer['sqnr_db']:.1f} dB" if "sqnr_db" in layer else ""
    decision = layer.get("decision", "int8")
    calibrator = layer.get("calibrator", "") + (", gptq" if layer.get("rounding") == "gptq" else "")
    return [layer.get("module_path") or "<root>", f"{layer.get('kind', '')} {layer.get('tensor', '')}", fmt, scale,
            span, calibrator, sqnr, decision]


def _header(ledger: Ledger) -> str:
    capture = ledger.capture
    threads = capture.get("threads")
    why = f"; {threads['reason']}" if threads and threads.get("reason") else ""
    return (
        f"fxpress ledger: model {ledger.model}, target {ledger.target}, front end "
        f"{capture.get('front_end', '?')} ({capture.get('seconds', 0.0):.1f} s)"
        + (f", {threads['threads']} compile thread(s) ({threads['policy']}{why})" if threads else "")
    )


def dynamic_lines(capture: dict[str, Any]) -> list[str]:
    """The dimensions that may vary, with the bounds found, e.g. ``input_ids: batch >= 1, sequence 1..512``."""
    dims = capture.get("dynamic_dims")
    if dims is None:
        return []
    described = []
    for name, per_input in dims.items():
        ranges = [f"{spec[0]} {spec[1]}..{spec[2]}" if spec[2] is not None else f"{spec[0]} >= {spec[1]}"
                  for _, spec in sorted(per_input.items())]
        described.append(f"{name}: {', '.join(ranges) or 'static'}")
    lines = [f"dynamic dims: {'; '.join(described)}"]
    lines += [f"bound probed: {name} <= {record['max']}: {record['reason']}"
              for name, record in capture.get("probed_bounds", {}).items()]
    return lines


def _initial_row(ledger: Ledger) -> list[str]:
    initial = ledger.initial
    return ["0", "capture", "", "", f"nodes={initial.get('nodes', 0)}", "",
            short_count(initial.get("params", 0)), short_count(initial.get("macs", 0)), "", ""]


def _entry_row(index: int, entry: LedgerEntry) -> list[str]:
    stats = " ".join(f"{key}={_short(value)}" for key, value in entry.stats.items())
    delta = " ".join(f"{op.split('.')[-1]}{count:+d}" for op, count in entry.op_delta.items())
    return [
        str(index), entry.name, "yes" if entry.modified else "no", f"{entry.seconds * 1000:.0f}",
        stats[:72], delta[:48], _change(entry.params_before, entry.params_after),
        _change(entry.macs_before, entry.macs_after), f"{entry.drift['max_abs']:.1e}",
        f"{entry.drift['cosine']:.6f}",
    ]


def _lowering_lines(ledger: Ledger) -> list[str]:
    lowering = ledger.lowering
    if not lowering:
        return []
    drift = lowering.get("drift", {})
    lines = [
        f"lowered by {lowering.get('backend')} in {lowering.get('seconds', 0.0):.1f} s: "
        f"{lowering.get('onnx_nodes', 0)} ONNX nodes, opset {lowering.get('opset')}, "
        f"IR version {lowering.get('ir_version')}; vs eager max|diff| {drift.get('max_abs', 0.0):.1e}, "
        f"cosine {drift.get('cosine', 1.0):.6f}"
    ]
    if dynamic := lowering.get("dynamic_quantization"):
        lines.append(f"dynamic int8: {dynamic['matmuls']} Linear layers, {dynamic['activation_quantizations']} "
                     f"run-time activation quantisations, weight bits {_short(dynamic['weight_bits'])}")
    if embeddings := lowering.get("embedding_quantization"):
        tables = ", ".join(f"{table['name']} {'x'.join(map(str, table['shape']))}" for table in embeddings["tables"])
        lines.append(f"embedding tables as int8 rows: {tables or 'none'} "
                     f"({embeddings['bytes_saved'] / 1e6:.1f} MB saved)")
    return lines


def _format_row(row, widths) -> str:
    return "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()


def short_count(value: int) -> str:
    """``1234567`` as ``1.23M``."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def _change(before: int, after: int) -> str:
    return short_count(after) if before == after else f"{short_count(before)}->{short_count(after)}"


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{v}" for k, v in value.items()) + "}"
    return str(value)
