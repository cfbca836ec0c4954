"""The ledger as one self-contained HTML page: ``report.html`` in every artifact.

The page shows the model, target and capture; the pass table; a per-layer table sortable by harm
with SQNR charts; the gates with their verdicts; and, given a benchmark report, the latency
distributions. Charts are inline SVG and the table sorting is a few lines of inline script: the
page loads nothing (no network, no external script, font, stylesheet or image), so it opens
offline, from a CI archive or an e-mail. Every text taken from the ledger is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from compiler.report import Ledger, LedgerEntry, dynamic_lines, short_count

__all__ = ["layer_rows", "render_html", "render_latency_html"]


def render_html(ledger: Ledger, *, latency: dict[str, Any] | None = None) -> str:
    """The whole report as an HTML page.

    ``latency``: what ``run_benchmark`` returned, drawn when given; by default the benchmark a run
    recorded in ``ledger.lowering["benchmark"]`` (percentiles only when it kept no samples).
    """
    latency = latency or ledger.lowering.get("benchmark")
    sections = [
        _summary_section(ledger), _gates_section(ledger.gates), _capture_section(ledger), _passes_section(ledger),
        _layers_section(ledger), _lowering_section(ledger),
        _latency_section(latency) if latency else "", _stats_section(ledger),
    ]
    return _page(f"fxpress report: {ledger.model or 'model'} for {ledger.target or 'target'}", sections)


def render_latency_html(latency: dict[str, Any]) -> str:
    """A page of the benchmark alone: latency distributions per runner and batch, with the percentiles."""
    return _page(f"fxpress bench: {latency.get('model', '')}", [_latency_section(latency)])


# ---------------------------------------------------------------------------------------------- page


_STYLE = """
:root { --ink: #1d2330; --muted: #5b6475; --line: #d9dde5; --soft: #f4f6f9; --accent: #2f6fde;
        --good: #1f8a4c; --bad: #c2372f; --warn: #d98a1c; }
* { box-sizing: border-box; }
body { margin: 0 auto; padding: 24px 24px 48px; max-width: 1440px; color: var(--ink); background: #fff;
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 32px 0 8px; border-bottom: 1px solid
var(--line); padding-bottom: 4px; } h3 { font-size: 14px; margin: 18px 0 6px; }
p.note, .muted { color: var(--muted); } p.note { margin: 4px 0 10px; max-width: 980px; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12.5px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 14px 0 4px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px; min-width: 150px;
        background: var(--soft); }
.card b { display: block; font-size: 17px; } .card span { color: var(--muted); font-size: 12px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 13px; }
th, td { padding: 3px 5px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.name { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12px; }
td.wrap { min-width: 150px; max-width: 360px; color: var(--muted); font-size: 11.5px; overflow-wrap: break-word; }
table.layers td { white-space: nowrap; }
ul.ratios { margin: 4px 0; padding-left: 20px; color: var(--muted); }
tbody tr:nth-child(even) { background: #fafbfc; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th:hover, table.sortable th:focus { text-decoration: underline; }
table.sortable th[aria-sort=ascending]::after { content: " \\2191"; color: var(--ink); }
table.sortable th[aria-sort=descending]::after { content: " \\2193"; color: var(--ink); }
table.kv th { text-align: left; background: none; color: var(--muted); font-weight: 500; }
.pass { color: var(--good); font-weight: 700; } .fail { color: var(--bad); font-weight: 700; }
.float { color: var(--warn); font-weight: 600; }
details { margin: 2px 0; } summary { cursor: pointer; }
pre { background: var(--soft); padding: 8px; overflow-x: auto; font-size: 12px; max-height: 420px; }
svg { display: block; max-width: 100%; height: auto; margin: 6px 0 14px; }
svg text { font: 11px system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; fill: var(--ink); }
svg .grid { stroke: #e6e9ef; } svg .axis { stroke: #9aa2b1; } svg .tick { fill: var(--muted); }
svg .bar { fill: var(--accent); } svg .bar.float { fill: var(--warn); } svg .bar.before { fill: #b9cdf3; }
svg .marker { stroke: var(--ink); stroke-width: 2; } svg .dot { fill: var(--accent); fill-opacity: .35; }
svg .box { fill: #dfe8fb; stroke: var(--accent); } svg .median { stroke: var(--bad); stroke-width: 2.5; }
svg .whisker { stroke: var(--muted); } svg .legend { fill: var(--muted); }
"""

# Click (or Enter on) a header of a table.sortable: rows sort by the cells' data-sort (numbers) or text;
# empty cells stay last in either direction.
_SCRIPT = """
(function () {
  function key(row, column) {
    var cell = row.cells[column];
    if (!cell) { return null; }
    var value = cell.getAttribute("data-sort");
    if (value === null) { value = cell.textContent.trim(); }
    if (value === "") { return null; }
    var number = Number(value);
    return isNaN(number) ? value.toLowerCase() : number;
  }
  function sortBy(header) {
    var table = header.closest("table"), body = table.tBodies[0], column = header.cellIndex;
    var descending = header.getAttribute("aria-sort") !== "descending";
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (cell) { cell.removeAttribute("aria-sort"); });
    header.setAttribute("aria-sort", descending ? "descending" : "ascending");
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var left = key(a, column), right = key(b, column);
      if (left === null || right === null) { return (left === null) - (right === null); }
      var order = left < right ? -1 : left > right ? 1 : 0;
      return descending ? -order : order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }
  document.querySelectorAll("table.sortable th").forEach(function (header) {
    header.tabIndex = 0;
    header.addEventListener("click", function () { sortBy(header); });
    header.addEventListener("keydown", function (event) { if (event.key === "Enter") { sortBy(header); } });
  });
})();
"""


def _page(title: str, sections: Iterable[str]) -> str:
    body = "\n".join(section for section in sections if section)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_text(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{_text(title)}</h1>\n{body}\n<script>{_SCRIPT}</script>\n</body>\n</html>\n"
    )


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _td(text: Any, sort: float | str | None = None, *, css: str = "", title: str = "") -> str:
    """One cell, its text escaped; ``sort``: the key the sorting script uses instead of the text."""
    attributes = f' class="{css}"' if css else ""
    if sort is not None:
        attributes += f' data-sort="{_text(_sort_key(sort))}"'
    if title:
        attributes += f' title="{_text(title)}"'
    return f"<td{attributes}>{_text(text)}</td>"


def _sort_key(value: float | str) -> str:
    return f"{value:.9g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class _Column:
    label: str
    numeric: bool = False
    title: str = ""


def _table(columns: Sequence[_Column], rows: Iterable[Sequence[str]], *, sortable: bool = False,
           sorted_by: int | None = None, css: str = "") -> str:
    """A table of ``rows`` (lists of ``<td>`` markup); ``sorted_by``: the column they arrive sorted by, descending."""
    heads = []
    for index, column in enumerate(columns):
        classes = ' class="num"' if column.numeric else ""
        title = f' title="{_text(column.title)}"' if column.title else ""
        order = ' aria-sort="descending"' if index == sorted_by else ""
        heads.append(f"<th{classes}{title}{order}>{_text(column.label)}</th>")
    table_css = " ".join(part for part in (css, "sortable" if sortable else "") if part)
    body = "\n".join(f"<tr>{''.join(row)}</tr>" for row in rows)
    return (f'<div class="scroll"><table class="{table_css}"><thead><tr>{"".join(heads)}</tr></thead>'
            f"<tbody>\n{body}\n</tbody></table></div>")


def _key_values(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_text(key)}</th><td>{_text(value)}</td></tr>" for key, value in pairs if value != "")
    return f'<table class="kv">{rows}</table>' if rows else ""


def _section(anchor: str, title: str, *parts: str) -> str:
    return f'<section id="{anchor}">\n<h2>{_text(title)}</h2>\n' + "\n".join(part for part in parts if part) + \
        "\n</section>"


def _note(text: str) -> str:
    return f'<p class="note">{_text(text)}</p>'


# ---------------------------------------------------------------------------------- numbers as text


def _db(value: float | None) -> str:
    return "\u221e" if value is None else f"{value:.1f}"


def _db_sort(value: float | None) -> float:
    return 1e9 if value is None else float(value)  # an exact result (infinite SQNR) sorts as the best


def _change(before: int, after: int) -> str:
    return short_count(after) if before == after else f"{short_count(before)} \u2192 {short_count(after)}"


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


# -------------------------------------------------------------------------------------------- summary


def _summary_section(ledger: Ledger) -> str:
    initial, final = ledger.initial, ledger.entries[-1] if ledger.entries else None
    drift = ledger.lowering.get("drift") or (final.drift if final else {})
    cards = [
        ("float params", _change(initial.get("params", 0), final.params_after) if final else ""),
        ("MACs", _change(initial.get("macs", 0), final.macs_after) if final else ""),
        ("ONNX nodes", ledger.lowering.get("onnx_nodes", "")),
        ("output SQNR vs original (dB)", _db(drift.get("sqnr_db")) if drift else ""),
        ("cosine vs original", f"{drift['cosine']:.6f}" if drift.get("cosine") is not None else ""),
        ("compile time (s)", f"{_compile_seconds(ledger):.1f}"),
    ]
    if ledger.gates:
        passed = sum(1 for gate in ledger.gates if gate.get("passed"))
        cards.append(("gates passed", f"{passed} of {len(ledger.gates)}"))
    markup = "".join(f'<div class="card"><b>{_text(value)}</b><span>{_text(label)}</span></div>'
                     for label, value in cards if value != "")
    return f'<div class="cards">{markup}</div>'


def _compile_seconds(ledger: Ledger) -> float:
    return (ledger.capture.get("seconds", 0.0) + sum(entry.seconds for entry in ledger.entries)
            + ledger.lowering.get("seconds", 0.0))


# -------------------------------------------------------------------------------------------- gates


def _gates_section(gates: list[dict[str, Any]]) -> str:
    if not gates:
        return ""
    columns = [_Column("verdict"), _Column("gate"), _Column("measured", numeric=True)]
    rows = [[_verdict(gate.get("passed")), _td(gate.get("gate", ""), css="name"),
             _td(_gate_value(gate.get("value")), css="num")] for gate in gates]
    return _section("gates", "Gates", _table(columns, rows))


def _verdict(passed: Any) -> str:
    return '<td class="pass">PASS</td>' if passed else '<td class="fail">FAIL</td>'


def _gate_value(value: Any) -> str:
    if value is None:
        return "inf"  # an infinite SQNR: the outputs are exact
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------------ capture


def _capture_section(ledger: Ledger) -> str:
    capture, initial = ledger.capture, ledger.initial
    threads = capture.get("threads") or {}
    int8 = (capture.get("isa") or {}).get("int8_format") or {}
    choice = capture.get("target_choice") or {}
    failed = [f"{attempt.get('front_end')}: {attempt.get('error')}" for attempt in capture.get("attempts", [])
              if attempt.get("error")]
    pairs = [
        ("model", ledger.model), ("target", ledger.target),
        ("front end", f"{capture.get('front_end', '?')} ({capture.get('seconds', 0.0):.1f} s)"),
        ("front ends that failed", "; ".join(failed)),
        ("inputs", ", ".join(map(str, capture.get("inputs", [])))),
        *(("dynamic dims", line.removeprefix("dynamic dims: ")) if index == 0 else ("", line)
          for index, line in enumerate(dynamic_lines(capture))),
        ("captured graph", f"{initial.get('nodes', 0)} nodes, {short_count(initial.get('params', 0))} params, "
                           f"{short_count(initial.get('macs', 0))} MACs" if initial else ""),
        ("target choice", _target_choice(choice)),
        ("calibration", capture.get("calibration", "")),
        ("int8 format", f"{int8['name']}: {int8.get('reason', '')}" if int8.get("name") else ""),
        ("compile threads", f"{threads['threads']} ({threads.get('policy', '')}; {threads.get('reason', '')})"
                            if threads.get("threads") else ""),
        ("fallbacks", "; ".join(ledger.fallbacks) or "none"),
    ]
    return _section("capture", "Model, target and capture", _key_values(pairs))


def _target_choice(choice: dict[str, Any]) -> str:
    if not choice:
        return ""
    text = f"requested {choice.get('requested')}, chosen {choice.get('chosen')}"
    if "linear_mac_share" in choice:
        text += f" (Linear share of MACs {choice['linear_mac_share']:.1%}, threshold {choice.get('threshold')})"
    return text


# ------------------------------------------------------------------------------------------- passes

_PASS_COLUMNS = (
    _Column("#", numeric=True), _Column("pass"), _Column("changed"), _Column("time (ms)", numeric=True),
    _Column("ops delta"), _Column("nodes", numeric=True),
    _Column("float params", numeric=True, title="elements of the floating-point tensors the graph reads "
                                                 "(int8 weights are not counted)"),
    _Column("MACs", numeric=True),
    _Column("SQNR (dB)", numeric=True, title="the model output's SQNR after this pass against the original's"),
    _Column("cosine", numeric=True), _Column("max |diff|", numeric=True), _Column("stats"),
)


def _passes_section(ledger: Ledger) -> str:
    rows = [_pass_row(index, entry) for index, entry in enumerate(ledger.entries, 1)]
    note = _note("Drift is measured against the original model on the probe batch, after each pass. "
                 "Click a header to sort; every pass's full statistics are at the end of the page.")
    return _section("passes", "Passes", note, _table(_PASS_COLUMNS, rows, sortable=True))


def _pass_row(index: int, entry: LedgerEntry) -> list[str]:
    drift = entry.drift or {}
    cosine, max_abs = drift.get("cosine"), drift.get("max_abs")
    return [
        _td(index, index, css="num"), _td(entry.name, css="name"), _td("yes" if entry.modified else "no"),
        _td(f"{entry.seconds * 1000:.1f}", entry.seconds, css="num"), _td(_op_delta(entry.op_delta), css="name"),
        _td(_change(entry.nodes_before, entry.nodes_after), entry.nodes_after, css="num"),
        _td(_change(entry.params_before, entry.params_after), entry.params_after, css="num"),
        _td(_change(entry.macs_before, entry.macs_after), entry.macs_after, css="num"),
        _td(_db(drift.get("sqnr_db")), _db_sort(drift.get("sqnr_db")), css="num"),
        _td("" if cosine is None else f"{cosine:.6f}", cosine, css="num"),
        _td("" if max_abs is None else f"{max_abs:.1e}", max_abs, css="num"),
        _stats_cell(entry.stats),
    ]


def _stats_cell(stats: dict[str, Any]) -> str:
    """The short statistics, allowed to break after ``_`` and ``=`` (``tensor_elements_dropped=49`` is wide)."""
    text = _text(_scalar_stats(stats)).replace("_", "_<wbr>").replace("=", "=<wbr>")
    return f'<td class="wrap">{text}</td>'


def _op_delta(delta: dict[str, int]) -> str:
    return " ".join(f"{op.split('.')[-1]}\u00a0{count:+d}" for op, count in delta.items())  # no break inside


def _scalar_stats(stats: dict[str, Any], limit: int = 160) -> str:
    """The pass's plain-valued statistics (numbers, words), shortened; lists and tables are left to the JSON."""
    parts = [f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
             for key, value in stats.items() if isinstance(value, (int, float, str, bool)) and value != ""]
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _stats_section(ledger: Ledger) -> str:
    items = [f"<details><summary><code>{index} {_text(entry.name)}</code></summary>"
             f"<pre>{_text(json.dumps(entry.stats, indent=1, default=str))}</pre></details>"
             for index, entry in enumerate(ledger.entries, 1) if entry.stats]
    return _section("stats", "Every pass's statistics", "\n".join(items)) if items else ""


# ----------------------------------------------------------------------------------------- lowering


def _lowering_section(ledger: Ledger) -> str:
    lowering = ledger.lowering
    if not lowering:
        return ""
    drift = lowering.get("drift") or {}
    agreement = lowering.get("simulation_agreement") or {}
    dynamic = lowering.get("dynamic_quantization") or {}
    embeddings = lowering.get("embedding_quantization") or {}
    pairs = [
        ("backend", f"{lowering.get('backend', '')} ({lowering.get('seconds', 0.0):.1f} s)"),
        ("ONNX", f"{lowering.get('onnx_nodes', 0)} nodes, opset {lowering.get('opset')}, "
                 f"IR version {lowering.get('ir_version')}"),
        ("runtime", " ".join(str(lowering[key]) for key in ("onnxruntime", "provider") if lowering.get(key))),
        ("vs the original (eager)", _drift_text(drift) if drift else ""),
        ("vs the torch simulation", f"{agreement.get('fraction', 0.0):.2%} of outputs within "
                                    f"{agreement.get('within_steps')} step(s); {_drift_text(agreement['drift'])}"
                                    if agreement.get("drift") else ""),
        ("dynamic int8", f"{dynamic.get('matmuls')} Linear layers, {dynamic.get('activation_quantizations')} "
                         "run-time activation quantisations" if dynamic else ""),
        ("int8 embedding tables", _embedding_tables(embeddings)),
    ]
    return _section("lowering", "Lowering", _key_values(pairs))


def _embedding_tables(embeddings: dict[str, Any]) -> str:
    if not embeddings:
        return ""
    names = ", ".join(str(table.get("name", "")) for table in embeddings.get("tables", [])) or "none"
    return f"{names} ({embeddings.get('bytes_saved', 0) / 1e6:.1f} MB saved)"


def _drift_text(drift: dict[str, Any]) -> str:
    return (f"SQNR {_db(drift.get('sqnr_db'))} dB, cosine {drift.get('cosine', 1.0):.6f}, "
            f"max |diff| {drift.get('max_abs', 0.0):.1e}")


# ------------------------------------------------------------------------------------------- layers


def layer_rows(ledger: Ledger) -> list[dict[str, Any]]:
    """One row per layer, merged from what the passes recorded, in the order of the last pass that lists layers.

    Keys, where a pass recorded them: ``module_path``, ``op``, ``weights``, ``decision``,
    ``sqnr_alone_db`` (quant_sensitivity: model output SQNR with only this op in int8),
    ``held_out_db`` (``(before, after)``) and ``refit`` (reconstruct: the SQNR of the layer's output in
    the int8 model against the float model's, on held-out samples, before and after its refit),
    ``gptq_gain_db``, ``width``, ``rank``, ``macs_kept``, ``energy_lost``, ``sparsity``, and ``harm``:
    the largest noise-power share measured at the layer (``10 ** (-SQNR / 10)``, or the output energy a
    factorisation dropped).
    """
    rows: dict[str, dict[str, Any]] = {}
    for entry in reversed(ledger.entries):  # the last pass lists the layers as they are in the final graph
        for path, fields in _LAYER_SOURCES.get(entry.name, _no_layers)(entry.stats):
            _merge(rows, path or "<root>", fields)
    for row in rows.values():
        row["harm"] = _harm(row)
    return list(rows.values())


def _merge(rows: dict[str, dict[str, Any]], path: str, fields: dict[str, Any]) -> None:
    """Add ``fields`` to the row of ``path``; a second op under one module path (two adds) gets a row of its own."""
    key, copy = path, 1
    while key in rows and set(fields) & (set(rows[key]) - {"module_path", "decision"}):
        copy += 1
        key = f"{path} #{copy}"
    rows.setdefault(key, {"module_path": key}).update(fields)


def _harm(row: dict[str, Any]) -> float | None:
    measured = [row["sqnr_alone_db"]] if "sqnr_alone_db" in row else []
    if "held_out_db" in row:
        measured.append(row["held_out_db"][1])
    shares = [0.0 if sqnr is None else 10 ** (-sqnr / 10) for sqnr in measured]
    if row.get("energy_lost") is not None:
        shares.append(float(row["energy_lost"]))
    return max(shares) if shares else None


def _no_layers(stats: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return []


def _insert_qdq_layers(stats: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for layer in stats.get("layers", []):
        if layer.get("kind") != "weight":
            continue
        weights = f"int{layer['bits']}" if "bits" in layer else layer.get("dtype", "float")
        if layer.get("rounding") == "gptq":
            weights += ", GPTQ"
        # its sqnr_db, where present, is quant_sensitivity's, which that pass's rows carry
        fields = {"weights": weights, "decision": layer.get("decision", "int8")}
        found.append((layer.get("module_path") or layer.get("tensor", ""), fields))
    return found


def _sensitivity_layers(stats: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(layer.get("module_path") or layer.get("op", ""),
             {"op": str(layer.get("kind", "")).split(".")[-1], "sqnr_alone_db": layer.get("sqnr_db"),
              "decision": layer.get("decision", "")})
            for layer in stats.get("layers", [])]


def _reconstruct_layers(stats: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for layer in stats.get("layers", []):
        held_out = layer.get("held_out_sqnr_db") or {}
        found.append((layer.get("module_path", ""), {"held_out_db": (held_out.get("before"), held_out.get("after")),
                                                     "refit": layer.get("chosen", "")}))
    return found


def _gptq_layers(stats: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(layer.get("module_path", ""), {"gptq_gain_db": layer.get("held_out_gain_db")})
            for layer in stats.get("layers", [])]


def _prune_layers(stats: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(path, {"width": (int(widths[0]), int(widths[1]))}) for path, widths in stats.get("widths", {}).items()]


def _low_rank_layers(stats: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(layer.get("module", node), {"rank": f"{layer.get('kind', '')} {'x'.join(map(str, layer['rank']))}",
                                         "macs_kept": layer.get("macs_kept"), "energy_lost": layer.get("energy_lost")})
            for node, layer in stats.get("layers", {}).items()]


def _sparsity_layers(stats: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(path, {"sparsity": share}) for path, share in stats.get("layers", {}).items()]


_LAYER_SOURCES = {
    "insert_qdq": _insert_qdq_layers, "quant_sensitivity": _sensitivity_layers, "reconstruct": _reconstruct_layers,
    "gptq": _gptq_layers, "prune_channels": _prune_layers, "low_rank": _low_rank_layers,
    "sparsify_weights": _sparsity_layers,
}


@dataclass(frozen=True)
class _LayerColumn:
    key: str
    column: _Column

    def cell(self, row: dict[str, Any]) -> str:
        value = row.get(self.key)
        if value is None and self.key not in row:
            return _td("")
        return _LAYER_CELLS.get(self.key, _plain_cell)(value)


def _plain_cell(value: Any) -> str:
    return _td("" if value is None else value, css="name" if isinstance(value, str) else "")


def _db_cell(value: float | None) -> str:
    return _td(_db(value), _db_sort(value), css="num")


def _refit_cell(value: tuple[float | None, float | None]) -> str:
    before, after = value
    return _td(f"{_db(before)} \u2192 {_db(after)}", _db_sort(after), css="num")


def _share_cell(value: float | None) -> str:
    return _td("" if value is None else f"{value:.1%}", value, css="num")


def _harm_cell(value: float | None) -> str:
    return _td("" if value is None else f"{100 * value:.3g} %", value, css="num")


def _width_cell(value: tuple[int, int]) -> str:
    return _td(f"{value[0]} \u2192 {value[1]}", value[1] / max(value[0], 1), css="num")


def _decision_cell(value: str | None) -> str:
    return _td(value or "", css="float" if value == "float" else "")


_LAYER_CELLS = {
    "sqnr_alone_db": _db_cell, "held_out_db": _refit_cell,
    "gptq_gain_db": lambda value: _td("" if value is None else f"{value:+.2f}", value, css="num"),
    "macs_kept": _share_cell, "energy_lost": _share_cell, "sparsity": _share_cell, "harm": _harm_cell,
    "width": _width_cell, "decision": _decision_cell,
}

_LAYER_COLUMNS = (
    _LayerColumn("module_path", _Column("module path")),
    _LayerColumn("op", _Column("op")),
    _LayerColumn("weights", _Column("weights")),
    _LayerColumn("decision", _Column("decision")),
    _LayerColumn("harm", _Column("harm", True, "the largest noise-power share measured for the layer: "
                                               "100 x 10^(-SQNR/10) %, or the output energy a factorisation dropped")),
    _LayerColumn("sqnr_alone_db", _Column("SQNR alone (dB)", True, "model output SQNR when only this op is int8")),
    _LayerColumn("held_out_db", _Column("held-out SQNR (dB)", True,
                                              "the layer's output in the int8 model (its own rounding and all "
                                              "upstream error) against the float model's, before and "
                                              "after the refit (reconstruct); sorted by the SQNR after")),
    _LayerColumn("refit", _Column("refit")),
    _LayerColumn("gptq_gain_db", _Column("GPTQ gain (dB)", True, "held-out SQNR gained by GPTQ rounding")),
    _LayerColumn("width", _Column("channels", True, "output channels before and after pruning")),
    _LayerColumn("rank", _Column("low rank")),
    _LayerColumn("macs_kept", _Column("MACs kept", True)),
    _LayerColumn("energy_lost", _Column("energy lost", True, "share of the layer's output energy dropped")),
    _LayerColumn("sparsity", _Column("sparsity", True, "share of the weights zeroed")),
)


def _layers_section(ledger: Ledger) -> str:
    rows = layer_rows(ledger)
    if not rows:
        return ""
    columns = [column for column in _LAYER_COLUMNS if column.key == "module_path"
               or any(column.key in row and row[column.key] != "" for row in rows)]
    rows.sort(key=lambda row: (row["harm"] is None, -(row["harm"] or 0.0)))  # stable: ties keep graph order
    harm = next((index for index, column in enumerate(columns) if column.key == "harm"), None)
    table = _table([column.column for column in columns], ([column.cell(row) for column in columns] for row in rows),
                   sortable=True, sorted_by=harm, css="layers")
    note = _note("Harm: the largest noise-power share measured at the layer, 100 x 10^(-SQNR/10) % (SQNR alone: the "
                 "model output's with only this op in int8; held-out SQNR: the layer's output in the int8 model, its "
                 "own rounding and all upstream error, against the float model's), or the share of its output energy "
                 "a low-rank factorisation dropped. Sorted by harm, worst first; click a header to sort by another "
                 "column.")
    return _section("layers", f"Layers ({len(rows)})", *_layer_charts(ledger), note, table)


# ------------------------------------------------------------------------------------------- charts


@dataclass(frozen=True)
class _Bar:
    label: str
    value: float | None  # None: infinite (exact), drawn full length
    marker: float | None = None  # a second value drawn as a tick (the SQNR before a refit)
    css: str = ""


def _layer_charts(ledger: Ledger) -> list[str]:
    """A bar chart per pass that measured each layer's SQNR, in graph order."""
    charts = {"quant_sensitivity": _sensitivity_chart, "reconstruct": _reconstruct_chart}
    return [charts[entry.name](entry.stats["layers"]) for entry in ledger.entries
            if entry.name in charts and entry.stats.get("layers")]


def _sensitivity_chart(layers: list[dict[str, Any]]) -> str:
    bars = [_Bar(layer.get("module_path") or layer.get("op", ""), layer.get("sqnr_db"),
                 css="float" if layer.get("decision") == "float" else "") for layer in layers]
    return _bar_chart("SQNR alone per op: the model output's with only that op in int8 (orange: kept in float)", bars)


def _reconstruct_chart(layers: list[dict[str, Any]]) -> str:
    held_out = [layer.get("held_out_sqnr_db") or {} for layer in layers]
    bars = [_Bar(layer.get("module_path", ""), sqnr.get("after"), sqnr.get("before"))
            for layer, sqnr in zip(layers, held_out, strict=True)]
    return _bar_chart("Held-out SQNR of each layer's output in the int8 model against the float model's: after "
                      "reconstruct (bar), before it (tick)", bars)


_WIDTH, _ROW, _TOP = 960, 15, 22


def _bar_chart(title: str, bars: list[_Bar], unit: str = "dB") -> str:
    """Horizontal bars in the given order, labelled, on a shared axis from 0."""
    finite = [value for bar in bars for value in (bar.value, bar.marker) if value is not None]
    top = max(10.0, math.ceil(max(finite, default=10.0) / 10) * 10)
    label_width = min(300, 8 + 6.2 * max((len(bar.label) for bar in bars), default=4))
    plot = _WIDTH - label_width - 50
    height = _TOP + _ROW * len(bars) + 24

    def x(value: float) -> float:
        return label_width + plot * min(max(value, 0.0), top) / top

    parts = [f'<text x="{label_width}" y="12" class="legend">{_text(title)}</text>']
    step = 10 if top <= 80 else 20
    for tick in range(0, int(top) + 1, step):
        parts.append(f'<line class="grid" x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{_TOP - 4}" y2="{height - 20}"/>'
                     f'<text class="tick" x="{x(tick):.1f}" y="{height - 6}" text-anchor="middle">{tick}</text>')
    for index, bar in enumerate(bars):
        parts.append(_bar(bar, _TOP + index * _ROW, x, label_width, top))
    parts.append(f'<text class="tick" x="{_WIDTH - 4}" y="{height - 6}" text-anchor="end">{_text(unit)}</text>')
    return _svg(title, height, parts)


def _bar(bar: _Bar, y: float, x, label_width: float, top: float) -> str:
    value = top if bar.value is None else bar.value
    shown = _db(bar.value) + (f" (from {_db(bar.marker)})" if bar.marker is not None else "")
    label = bar.label if len(bar.label) <= 46 else "\u2026" + bar.label[-45:]
    markup = (f'<g><title>{_text(bar.label)}: {_text(shown)}</title>'
              f'<text x="{label_width - 6}" y="{y + 11}" text-anchor="end">{_text(label)}</text>'
              f'<rect class="bar {bar.css}" x="{label_width}" y="{y + 2}" width="{x(value) - label_width:.1f}" '
              f'height="{_ROW - 4}"/>'
              f'<text class="tick" x="{x(value) + 4:.1f}" y="{y + 11}">{_text(_db(bar.value))}</text>')
    if bar.marker is not None:
        tick = x(bar.marker)
        markup += f'<line class="marker" x1="{tick:.1f}" x2="{tick:.1f}" y1="{y + 1}" y2="{y + _ROW - 1}"/>'
    return markup + "</g>"


def _svg(title: str, height: float, parts: list[str]) -> str:
    return (f'<svg viewBox="0 0 {_WIDTH} {height:.0f}" width="{_WIDTH}" '
            f'height="{height:.0f}" role="img" aria-label="{_text(title)}">' + "".join(parts) + "</svg>")


# ------------------------------------------------------------------------------------------ latency

_LANE = 44


def _latency_section(latency: dict[str, Any]) -> str:
    """One panel per batch size, the percentile table, and fxpress's speed ratios."""
    batches = sorted({result["batch"] for result in latency.get("results", [])})
    ratios = [f"batch {comparison['batch']}: fxpress is {speed:.2f}x the speed of {name} (p50 ratio)"
              for comparison in latency.get("comparisons", []) for name, speed in comparison["speedup_vs"].items()]
    drawn = ("Each dot is one run; the box spans the 25th to 75th percentile, the red line is the median (p50), "
             "the whiskers reach the 1st and 99th percentiles." if latency.get("samples_ms") else
             "Only percentiles were kept: the line spans the fastest run to p99, the red line is the median (p50).")
    note = _note(f"{latency.get('runs', '?')} timed runs per runner after {latency.get('warmup', '?')} warm-up, "
                 f"runners in rotation. {drawn}")
    listed = "".join(f"<li>{_text(line)}</li>" for line in ratios)
    return _section("latency", "Latency", note, *(_latency_panel(latency, batch) for batch in batches),
                    _latency_table(latency.get("results", [])), f'<ul class="ratios">{listed}</ul>' if listed else "")


def _latency_table(results: list[dict[str, Any]]) -> str:
    columns = [_Column("runner"), _Column("batch", True), _Column("p50 ms", True), _Column("p90 ms", True),
               _Column("p99 ms", True), _Column("mean ms", True), _Column("samples/s", True)]
    rows = [[_td(result["runner"], css="name"), _td(result["batch"], result["batch"], css="num"),
             *(_td(_ms(result[key]), result[key], css="num") for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms")),
             _td(f"{result['throughput']:.1f}", result["throughput"], css="num")] for result in results]
    return _table(columns, rows, sortable=True)


def _latency_panel(latency: dict[str, Any], batch: int) -> str:
    runners = [result["runner"] for result in latency["results"] if result["batch"] == batch]
    samples = {runner: sorted(latency.get("samples_ms", {}).get(f"{runner}@{batch}", [])) for runner in runners}
    summaries = {result["runner"]: result for result in latency["results"] if result["batch"] == batch}
    values = [value for runner in runners for value in samples[runner] or _summary_points(summaries[runner])]
    low, high = min(values), max(values)
    scale = _Scale(low, high, logarithmic=high / max(low, 1e-9) > 8)
    title = f"{latency.get('model', '')}, batch {batch}: latency per run (ms{', log scale' if scale.log else ''})"
    height = _TOP + _LANE * len(runners) + 26
    parts = [f'<text x="{_LABEL}" y="12" class="legend">{_text(title)}</text>', *scale.grid(height)]
    for index, runner in enumerate(runners):
        parts.append(_lane(runner, samples[runner], summaries[runner], _TOP + index * _LANE, scale))
    return _svg(title, height, parts)


def _summary_points(result: dict[str, Any]) -> list[float]:
    return [result[key] for key in ("min_ms", "p50_ms", "p90_ms", "p99_ms")]


_LABEL, _MEDIAN_TEXT = 120, 110


class _Scale:
    """Milliseconds to x, linear or logarithmic, over the plot area, with round tick values."""

    def __init__(self, low: float, high: float, *, logarithmic: bool):
        self.log = logarithmic
        self.left, self.right = _LABEL, _WIDTH - _MEDIAN_TEXT
        if logarithmic:
            self.low, self.high = math.log10(low * 0.9), math.log10(high * 1.1)
        else:
            pad = (high - low) * 0.05 or max(high * 0.05, 1e-3)
            self.low, self.high = max(0.0, low - pad), high + pad

    def x(self, value: float) -> float:
        """The x coordinate of ``value`` ms."""
        position = math.log10(max(value, 1e-9)) if self.log else value
        return self.left + (self.right - self.left) * (position - self.low) / ((self.high - self.low) or 1.0)

    def ticks(self) -> list[float]:
        """Round values inside the range: 1-2-5 per decade on a log scale, a 1-2-5 step on a linear one."""
        if self.log:
            decades = range(math.floor(self.low), math.ceil(self.high) + 1)
            candidates = [m * 10.0**e for e in decades for m in (1, 2, 5)]
            return [value for value in candidates if self.low <= math.log10(value) <= self.high]
        raw = (self.high - self.low) / 6
        magnitude = 10 ** math.floor(math.log10(raw))
        step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
        first = math.ceil(self.low / step) * step
        return [first + index * step for index in range(int((self.high - first) / step) + 1)]

    def grid(self, height: float) -> list[str]:
        """Vertical grid lines with their labels."""
        return [f'<line class="grid" x1="{self.x(t):.1f}" x2="{self.x(t):.1f}" y1="{_TOP - 4}" y2="{height - 20}"/>'
                f'<text class="tick" x="{self.x(t):.1f}" y="{height - 6}" text-anchor="middle">{_text(f"{t:g}")}</text>'
                for t in self.ticks()]


def _lane(runner: str, samples: list[float], result: dict[str, Any], y: float, scale: _Scale) -> str:
    """One runner: its runs as dots, a box from p25 to p75, whiskers p1..p99, the median as a line and a number."""
    middle = y + _LANE / 2
    median = result.get("p50_ms", statistics.median(samples) if samples else 0.0)
    parts = [f'<text x="{_LABEL - 8}" y="{middle + 4}" text-anchor="end">{_text(runner)}</text>']
    if len(samples) >= 2:
        p01, p25, p75, p99 = (_percentile(samples, share) for share in (0.01, 0.25, 0.75, 0.99))
        parts.append(f'<line class="whisker" x1="{scale.x(p01):.1f}" x2="{scale.x(p99):.1f}" y1="{middle}" '
                     f'y2="{middle}"/><rect class="box" x="{scale.x(p25):.1f}" y="{middle - 11}" '
                     f'width="{max(scale.x(p75) - scale.x(p25), 1):.1f}" height="22"/>')
    elif "min_ms" in result and "p99_ms" in result:  # percentiles only: the fastest run to p99
        parts.append(f'<line class="whisker" x1="{scale.x(result["min_ms"]):.1f}" '
                     f'x2="{scale.x(result["p99_ms"]):.1f}" y1="{middle}" y2="{middle}"/>')
    parts += [f'<circle class="dot" cx="{scale.x(value):.1f}" cy="{middle + _jitter(index):.1f}" r="2"/>'
              for index, value in enumerate(samples)]
    parts.append(f'<line class="median" x1="{scale.x(median):.1f}" x2="{scale.x(median):.1f}" y1="{middle - 14}" '
                 f'y2="{middle + 14}"/><text x="{scale.right + 8}" y="{middle + 4}">p50 {_text(_ms(median))} ms</text>')
    return f"<g><title>{_text(runner)}: median {_text(_ms(median))} ms over {len(samples)} runs</title>" + \
        "".join(parts) + "</g>"


def _jitter(index: int) -> float:
    """A fixed vertical spread of the dots (golden-ratio sequence): the same page for the same samples."""
    return ((index * 0.6180339887) % 1.0 - 0.5) * 20


def _percentile(ordered: list[float], share: float) -> float:
    """Linear interpolation between the two nearest of the sorted samples, as numpy's default."""
    position = share * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


# ------------------------------------------------------------------------------------------- search


def render_search_html(summary: dict[str, Any]) -> str:
    """A search's page: latency against quality of the timed trials (the chosen one marked), and every trial."""
    trials = summary.get("trials", [])
    metric = next((gate["metric"] for trial in trials for gate in trial.get("gates", [])), None)
    chosen = (summary.get("chosen") or {}).get("key")
    note = (f"{len(trials)} trials of a {summary.get('grid_size')}-point grid, {summary.get('reused', 0)} reused from "
            f"the cache, {len(summary.get('skipped', []))} skipped by dominance; {summary.get('executor', '')}, "
            f"{summary.get('seconds', 0)} s.")
    front = {item["key"] for item in summary.get("front", []) if "key" in item}
    note += " Blue line: the front (no trial is both faster and better); dashed: the gate."
    sections = [_section("front", "Latency against quality", _note(note), _front_chart(trials, metric, chosen, front)),
                _section("trials", "Trials", _trial_table(trials, chosen))]
    return _page("fxpress search", sections)


def _front_chart(trials: list[dict[str, Any]], metric: str | None, chosen: str | None, front: set[str]) -> str:
    timed = [trial for trial in trials if trial.get("latency_ms") is not None and metric in trial.get("metrics", {})]
    if not timed or metric is None:
        return _note("no trial passed every gate, so none was timed")
    width, height, margin = 720.0, 300.0, 56.0
    xs = [trial["latency_ms"] for trial in timed]
    ys = [trial["metrics"][metric] for trial in timed]
    threshold = next((gate["threshold"] for trial in timed for gate in trial.get("gates", [])
                      if gate.get("metric") == metric), None)
    ys += [] if threshold is None else [threshold]
    x_low, x_high = min(xs) * 0.95, max(xs) * 1.05
    y_low, y_high = min(ys) - 0.005, max(ys) + 0.005

    def place(x: float, y: float) -> tuple[float, float]:
        return (margin + (x - x_low) / (x_high - x_low or 1) * (width - 2 * margin),
                height - margin - (y - y_low) / (y_high - y_low or 1) * (height - 2 * margin))

    parts = [f'<line x1="{margin}" y1="{height - margin}" x2="{width - margin}" y2="{height - margin}" '
             'stroke="#5b6475"/>', f'<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{height - margin}" '
             'stroke="#5b6475"/>',
             f'<text x="{width / 2}" y="{height - 16}" text-anchor="middle">median latency (ms)</text>',
             f'<text x="14" y="{margin - 14}">{_text(metric)}</text>']
    for x, y in ((x_low, y_low), (x_high, y_high)):
        px, py = place(x, y)
        parts += [f'<text x="{px:.1f}" y="{height - margin + 16}" text-anchor="middle">{x:.3g}</text>',
                  f'<text x="{margin - 6}" y="{py + 4:.1f}" text-anchor="end">{y:.4g}</text>']
    if threshold is not None:
        _, gy = place(x_low, threshold)
        parts.append(f'<line x1="{margin}" y1="{gy:.1f}" x2="{width - margin}" y2="{gy:.1f}" stroke="#c2372f" '
                     f'stroke-dasharray="6 4"><title>gate: {_text(metric)} {threshold:g}</title></line>')
    steps = sorted((trial for trial in timed if trial["key"] in front), key=lambda item: item["latency_ms"])
    if len(steps) > 1:
        points = " ".join("{:.1f},{:.1f}".format(*place(t["latency_ms"], t["metrics"][metric])) for t in steps)
        parts.append(f'<polyline points="{points}" fill="none" stroke="#2f6fde" stroke-width="1.5"/>')
    for trial in sorted(timed, key=lambda item: item["key"] == chosen):
        px, py = place(trial["latency_ms"], trial["metrics"][metric])
        mark = trial["key"] == chosen
        label = ", ".join(f"{key}={value}" for key, value in trial["patch"].items())
        parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="{7 if mark else 5}" fill="'
                     f'{"#c2372f" if mark else "#2f6fde"}"><title>{_text(label)}</title></circle>')
        if mark:
            parts.append(f'<text x="{px + 10:.1f}" y="{py - 8:.1f}">chosen: {_text(label)}</text>')
    return (f'<svg viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}" role="img" '
            f'aria-label="latency against {_text(metric)}">' + "".join(parts) + "</svg>")


def _trial_table(trials: list[dict[str, Any]], chosen: str | None) -> str:
    columns = [_Column("trial"), _Column("recipe patch"), _Column("stage"), _Column("verdict"),
               _Column("gates"), _Column("p50 ms", numeric=True)]
    rows = []
    for index, trial in enumerate(trials, 1):
        gates = "; ".join(f"{gate['gate']}: {_gate_value(gate.get('value'))}" for gate in trial.get("gates", []))
        latency = trial.get("latency_ms")
        patch = ", ".join(f"{key} = {value}" for key, value in trial["patch"].items())
        rows.append([_td(f"{index}{' (chosen)' if trial.get('key') == chosen else ''}"), _td(patch),
                     _td(trial["stage"] + (" (cached)" if trial.get("cached") else "")),
                     _verdict(trial["passed"]), _td(gates), _td("" if latency is None else f"{latency:.3f}",
                                                                    -1.0 if latency is None else float(latency))])
    return _table(columns, rows, sortable=True)
