"""``report.html``: a self-contained page of the ledger, written into every artifact.

Unit tests render hand-made ledgers (escaping, the sortable layer table, gates, latency charts, no
external resource). The browser test opens a real artifact's page in headless Chromium and checks
that it requests nothing but itself, logs no error, and shows the passes, layers and gates. It skips
where Chromium or playwright is missing, except under CI (``CI`` set), where it fails instead.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import compiler
from compiler import ArtifactError, load
from compiler.cli.benchmark import plot_benchmark, ratios, summarize
from compiler.errors import UsageError
from compiler.gates import GateResult, parse_gate
from compiler.report import Ledger, LedgerEntry
from compiler.report_html import layer_rows, render_html, render_latency_html

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# --- hand-made ledgers ------------------------------------------------------------------------


def _entry(name: str, stats: dict | None = None, *, sqnr: float | None = 40.0) -> LedgerEntry:
    return LedgerEntry(
        name=name, options={}, modified=True, seconds=0.012, stats=stats or {}, op_delta={"aten.batch_norm": -1},
        params_before=1000, params_after=900, macs_before=5000, macs_after=5000, nodes_before=10, nodes_after=9,
        drift={"max_abs": 1e-3, "cosine": 0.9999, "sqnr_db": sqnr, "reference_max_abs": 3.0},
    )


def _quantised_ledger() -> Ledger:
    """quant_sensitivity, insert_qdq and reconstruct rows as those passes record them."""
    sensitivity = {"layers": [
        {"op": "conv2d", "module_path": "stem.conv", "kind": "aten.conv2d", "sqnr_db": 35.0, "decision": "int8"},
        {"op": "conv2d_1", "module_path": "body.conv", "kind": "aten.conv2d", "sqnr_db": 18.0, "decision": "float"},
        {"op": "linear", "module_path": "head", "kind": "aten.linear", "sqnr_db": None, "decision": "int8"},
    ]}
    qdq = {"layers": [
        {"tensor": "x", "module_path": "", "kind": "activation", "scale": 0.1, "zero_point": 0, "range": [0, 1]},
        {"tensor": "stem.conv.weight", "module_path": "stem.conv", "kind": "weight", "bits": 8, "decision": "int8",
         "rounding": "gptq", "sqnr_db": 35.0},
        {"tensor": "body.conv.weight", "module_path": "body.conv", "kind": "weight", "dtype": "float16",
         "decision": "float", "sqnr_db": 18.0},
    ]}
    rebuilt = {"layers": [
        {"module_path": "stem.conv", "chosen": "least squares, ridge 0.1",
         "held_out_sqnr_db": {"before": 30.0, "after": 31.5}},
        {"module_path": "head", "chosen": "kept", "held_out_sqnr_db": {"before": 25.0, "after": 25.0}},
    ]}
    return Ledger(model="TinyNet", target="cpu-int8", capture={"front_end": "torch.fx.symbolic_trace", "seconds": 0.5},
                  initial={"nodes": 10, "params": 1000, "macs": 5000},
                  entries=[_entry("fold_conv_bn", sqnr=None), _entry("quant_sensitivity", sensitivity),
                           _entry("insert_qdq", qdq), _entry("reconstruct", rebuilt)])


def _latency() -> dict:
    """The shape run_benchmark returns: summaries, ratios and every run's milliseconds."""
    stats = [summarize("fxpress", batch, [0.001 * batch * (1 + (i % 7) / 50) for i in range(40)]) for batch in (1, 8)]
    stats += [summarize("eager", batch, [0.004 * batch * (1 + (i % 5) / 20) for i in range(40)]) for batch in (1, 8)]
    return {"model": "TinyNet", "runs": 40, "warmup": 2, "results": [item.to_dict() for item in stats],
            "comparisons": [{"batch": batch, "speedup_vs": ratios([s for s in stats if s.batch == batch], "fxpress")}
                            for batch in (1, 8)],
            "samples_ms": {f"{item.runner}@{item.batch}": item.samples_ms for item in stats}}


def _external_references(page: str) -> list[str]:
    """Anything in ``page`` that would make a browser fetch a resource."""
    patterns = [r"https?://", r"<script[^>]*\ssrc\s*=", r"<link[^>]*\shref\s*=", r"<img[^>]*\ssrc\s*=",
                r"<iframe", r"url\(", r"@import", r"<object", r"<embed"]
    return [pattern for pattern in patterns if re.search(pattern, page, re.IGNORECASE)]


# --- render_html --------------------------------------------------------------------------------


def test_every_text_from_the_ledger_is_escaped():
    ledger = _quantised_ledger()
    ledger.model = "<script>alert('model')</script>"
    ledger.entries[0].stats = {"note": "a <b>bold</b> & \"quoted\" claim"}
    ledger.gates = [{"gate": "sqnr_db >= 30 <img src=x onerror=alert(1)>", "value": 31.0, "passed": True}]
    page = render_html(ledger)
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#x27;model&#x27;)&lt;/script&gt;" in page
    assert "<b>bold</b>" not in page and "a &lt;b&gt;bold&lt;/b&gt; &amp; &quot;quoted&quot; claim" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


def test_the_page_loads_nothing_from_outside():
    ledger = _quantised_ledger()
    ledger.gates = [GateResult(parse_gate("cosine_mean >= 0.99"), 0.995).to_dict()]
    page = render_html(ledger, latency=_latency())
    assert _external_references(page) == []
    assert page.count("<script>") == 1 and "<style>" in page and page.startswith("<!DOCTYPE html>")


def test_the_layer_table_is_sortable_and_starts_worst_first():
    page = render_html(_quantised_ledger())
    table = re.search(r'<table class="layers sortable">.*?</table>', page, re.DOTALL).group(0)
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", table)
    assert headers[:5] == ["module path", "op", "weights", "decision", "harm"]
    assert re.search(r'<th class="num" title="[^"]*" aria-sort="descending">harm</th>', table)
    paths = re.findall(r'<tr><td class="name">([^<]*)</td>', table)
    assert paths == ["body.conv", "head", "stem.conv"]  # 18 dB alone; 25 dB held out; 31.5 dB held out
    assert 'data-sort="0.0158489319"' in table  # body.conv's harm: 10 ** (-18 / 10)
    assert "table.sortable th" in page and "addEventListener(\"click\"" in page


def test_layer_rows_merge_what_each_pass_recorded():
    rows = {row["module_path"]: row for row in layer_rows(_quantised_ledger())}
    assert set(rows) == {"stem.conv", "body.conv", "head"}  # the activation row of insert_qdq is no layer
    assert rows["stem.conv"] == {
        "module_path": "stem.conv", "held_out_db": (30.0, 31.5), "refit": "least squares, ridge 0.1",
        "weights": "int8, GPTQ", "decision": "int8", "op": "conv2d", "sqnr_alone_db": 35.0,
        "harm": pytest.approx(10 ** -3.15),
    }
    assert rows["body.conv"]["weights"] == "float16" and rows["body.conv"]["decision"] == "float"
    assert rows["head"]["harm"] == pytest.approx(10 ** -2.5)  # SQNR alone infinite (None): the held-out SQNR rules


def test_layer_rows_of_pruning_low_rank_and_sparsity():
    ledger = Ledger(model="m", target="cpu-fp32", entries=[
        _entry("prune_channels", {"widths": {"conv1": [16, 12]}}),
        _entry("low_rank", {"layers": {"conv2d_1": {"module": "conv2", "kind": "tucker", "rank": [9, 20],
                                                    "macs_kept": 0.75, "energy_lost": 0.1}}}),
        _entry("sparsify_weights", {"layers": {"fc": 0.5}}),
    ])
    rows = {row["module_path"]: row for row in layer_rows(ledger)}
    assert rows["conv1"]["width"] == (16, 12) and rows["conv1"]["harm"] is None
    assert rows["conv2"]["rank"] == "tucker 9x20" and rows["conv2"]["harm"] == pytest.approx(0.1)
    assert rows["fc"]["sparsity"] == 0.5
    page = render_html(ledger)
    assert "16 \u2192 12" in page and "tucker 9x20" in page and "50.0%" in page


def test_a_second_op_under_one_module_path_gets_its_own_row():
    sensitivity = {"layers": [
        {"op": "add", "module_path": "block", "kind": "aten.add", "sqnr_db": 40.0, "decision": "int8"},
        {"op": "add_1", "module_path": "block", "kind": "aten.add", "sqnr_db": 42.0, "decision": "int8"},
    ]}
    rows = layer_rows(Ledger(model="m", target="t", entries=[_entry("quant_sensitivity", sensitivity)]))
    assert [row["module_path"] for row in rows] == ["block", "block #2"]


def test_gates_are_rendered_with_verdict_and_value():
    ledger = _quantised_ledger()
    ledger.gates = [GateResult(parse_gate("top1_agreement >= 0.97"), 0.9753).to_dict(),
                    GateResult(parse_gate("sqnr_db >= 40"), 31.25).to_dict(),
                    GateResult(parse_gate("sqnr_db >= 20"), None).to_dict()]
    page = render_html(ledger)
    gates = re.search(r'<section id="gates">.*?</section>', page, re.DOTALL).group(0)
    rows = re.findall(r"<tr>(.*?)</tr>", gates)
    assert '<td class="pass">PASS</td>' in rows[1] and "top1_agreement &gt;= 0.97" in rows[1] and "0.9753" in rows[1]
    assert '<td class="fail">FAIL</td>' in rows[2] and "31.2500" in rows[2]
    assert "PASS" in rows[3] and ">inf<" in rows[3]
    assert "2 of 3" in page  # the summary card


def test_a_ledger_without_gates_has_no_gate_section_and_an_empty_ledger_renders():
    assert 'id="gates"' not in render_html(_quantised_ledger())
    page = render_html(Ledger(model="", target=""))
    assert "<h1>" in page and _external_references(page) == []


def test_latency_is_drawn_per_batch_with_medians():
    latency = _latency()
    page = render_html(_quantised_ledger(), latency=latency)
    section = re.search(r'<section id="latency">.*?</section>', page, re.DOTALL).group(0)
    assert section.count("<svg") == 2 and "batch 1:" in section and "batch 8:" in section
    assert section.count('class="dot"') == 4 * 40  # every run, every runner, every batch
    fxpress = next(r for r in latency["results"] if r["runner"] == "fxpress" and r["batch"] == 1)
    assert f"p50 {fxpress['p50_ms']:.3g} ms" in section
    assert "fxpress is" in section and "the speed of eager" in section
    alone = render_latency_html(latency)
    assert 'id="latency"' in alone and 'id="passes"' not in alone and _external_references(alone) == []


def test_a_benchmark_recorded_in_the_ledger_is_drawn_from_its_percentiles():
    ledger = _quantised_ledger()
    ledger.lowering["benchmark"] = {key: value for key, value in _latency().items() if key != "samples_ms"}
    section = re.search(r'<section id="latency">.*?</section>', render_html(ledger), re.DOTALL).group(0)
    assert section.count("<svg") == 2 and 'class="dot"' not in section and "Only percentiles were kept" in section
    assert section.count('class="median"') == 4 and section.count('class="whisker"') == 4


def test_gates_survive_the_json_round_trip_and_old_keys_stay():
    ledger = _quantised_ledger()
    ledger.gates = [GateResult(parse_gate("cosine_min >= 0.9"), 0.95).to_dict()]
    data = json.loads(ledger.to_json())
    assert list(data) == ["model", "target", "capture", "initial", "passes", "lowering", "fallbacks", "gates"]
    assert Ledger.from_dict(data).gates == ledger.gates
    assert Ledger.from_dict({key: value for key, value in data.items() if key != "gates"}).gates == []


# --- fxpress bench --plot FILE.html ------------------------------------------------------------------


def test_bench_plot_to_an_html_file_writes_the_latency_page(tmp_path):
    path = tmp_path / "latency.html"
    plot_benchmark(_latency(), str(path))
    page = path.read_text(encoding="utf-8")
    assert page.count("<svg") == 2 and _external_references(page) == []
    with pytest.raises(UsageError, match="cannot write"):
        plot_benchmark(_latency(), str(tmp_path / "missing" / "latency.html"))


# --- the artifact -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_artifact(tmp_path_factory) -> Path:
    """digits-cnn compiled for cpu-int8, with a gate result in its ledger, saved."""
    import models

    zoo = models.load("digits-cnn")
    compiled = compiler.compile(zoo.model, "cpu-int8", zoo.example_inputs, calibration_data=[zoo.calibration_data(64)],
                                model_name="digits-cnn")
    compiled.report.gates = [GateResult(parse_gate("top1_agreement >= 0.97"), 0.9753).to_dict()]
    return compiled.save(tmp_path_factory.mktemp("report-html") / "artifact")


def test_every_artifact_has_a_report_html_and_stays_loadable(digits_artifact):
    page = (digits_artifact / "report.html").read_text(encoding="utf-8")
    assert "fold_conv_bn" in page and "conv2" in page and "0.9753" in page and _external_references(page) == []
    assert str(digits_artifact) not in page  # no path of this machine in the artifact
    manifest = json.loads((digits_artifact / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.onnx"}  # reports hold timings: not checksummed
    assert load(digits_artifact).report.gates[0]["value"] == 0.9753


def test_report_html_is_a_reserved_artifact_file_name(digits_artifact, tmp_path):
    compiled = load(digits_artifact)
    compiled.files = {"report.html": b"mine"}
    with pytest.raises(ArtifactError, match="not a plain, free file name"):
        compiled.save(tmp_path / "out")


# --- in a browser ------------------------------------------------------------------------------------


@pytest.fixture
def start_playwright():
    """playwright's sync API, once Chromium and playwright are both here; else skip, or fail under CI.

    Named before the artifact in a test's arguments, it skips before the compile.
    """
    missing = []
    if not Path(CHROMIUM).is_file():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("playwright (pip install playwright)")
    if not missing:
        return sync_playwright
    reason = f"the browser test needs {' and '.join(missing)}"
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{reason}; under CI it must run, not skip")
    pytest.skip(reason)


def test_report_html_in_headless_chromium_requests_nothing_and_logs_no_error(start_playwright, digits_artifact):
    url = (digits_artifact / "report.html").resolve().as_uri()
    requests, errors = [], []
    with start_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda request: requests.append(request.url))
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url, wait_until="load")
            text = page.inner_text("body")
            page.click("table.layers th:text-is('module path')")  # the inline script sorts by that column
            sorted_paths = page.eval_on_selector_all("table.layers tbody tr td:first-child",
                                                     "cells => cells.map(cell => cell.textContent)")
            order = page.get_attribute("table.layers th:text-is('module path')", "aria-sort")
        finally:
            browser.close()
    assert [request for request in requests if request != url and not request.startswith("data:")] == []
    assert errors == []
    assert "fold_conv_bn" in text and re.search(r"\bconv2\b", text) and "0.9753" in text and "PASS" in text
    assert order == "descending" and sorted_paths == sorted(sorted_paths, key=str.lower, reverse=True)
    assert set(sorted_paths) == {"conv1", "conv2", "fc"}


def test_the_search_page_draws_the_front_the_gate_and_marks_the_choice():
    from compiler.report_html import render_search_html

    gate = {"gate": "top1_agreement >= 0.97", "metric": "top1_agreement", "comparison": ">=", "threshold": 0.97,
            "value": None, "passed": True}

    def trial(key, p50, agreement):
        return {"key": key, "patch": {"compile.float_prefix": int(key)}, "stage": "lowered",
                "passed": agreement >= 0.97, "latency_ms": p50, "metrics": {"top1_agreement": agreement},
                "gates": [{**gate, "value": agreement}]}

    trials = [trial("3", 2.3, 0.976), trial("6", 2.5, 0.978), trial("1", 2.2, 0.95), trial("4", 2.7, 0.97)]
    front = [{"key": key} for key in ("1", "3", "6")]
    page = render_search_html({"trials": trials, "front": front, "chosen": trials[0], "grid_size": 51})
    assert page.count("<polyline") == 1 and 'stroke-dasharray="6 4"' in page and "gate: top1_agreement 0.97" in page
    assert "chosen: compile.float_prefix=3" in page and "4 trials of a 51-point grid" in page
