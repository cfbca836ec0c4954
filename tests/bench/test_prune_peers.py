"""bench/prune_peers.py: one small end-to-end run (digits-cnn) with every fxpress row, the int8 ones included."""

from __future__ import annotations

import argparse

from bench.prune_peers import render, run


def test_the_bench_runs_every_fxpress_row_and_times_the_int8_ones_beside_unpruned_int8(tmp_path, monkeypatch):
    monkeypatch.setenv("FXPRESS_CACHE_DIR", str(tmp_path))
    args = argparse.Namespace(model="digits-cnn", macs=0.3, seconds=1.0, train=96, calibration=64, eval=40, runs=2,
                              latency=0.8, int8=True, no_torch_pruning=True, json=None, recover={"augment": "none"},
                              prune={"allocation": "global"}, latency_prune={"allocation": "uniform"},
                              int8_only=False)
    record = run(args)
    assert set(record["rows"]) == {"fxpress", "fxpress-latency", "unpruned-int8", "fxpress-int8",
                                   "fxpress-int8-latency"}
    assert all(0 <= row["agreement"] <= 1 for row in record["rows"].values())
    assert record["fxpress_ledger"]["recover"]["augment"] == "none"  # --recover reaches every pruned row
    assert record["fxpress_ledger"]["prune_channels"]["allocation"] == "global"  # --prune reaches the MAC rows
    assert record["fxpress_latency_ledger"]["allocation"] == "uniform"  # --latency-prune the latency rows
    assert record["fxpress_int8_latency_ledger"]["latency"]["precision"] == "int8"
    assert record["fxpress_latency_ledger"]["latency"]["precision"] == "float32"
    assert set(record["latency_int8"][16]) == {"unpruned-int8", "fxpress-int8", "fxpress-int8-latency"}
    assert "latency_int8 batch 16" in render(record)


def test_int8_only_runs_the_int8_rows_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("FXPRESS_CACHE_DIR", str(tmp_path))
    args = argparse.Namespace(model="digits-cnn", macs=0.3, seconds=0.0, train=96, calibration=64, eval=40, runs=2,
                              latency=0.8, int8=True, no_torch_pruning=True, json=None, recover={}, prune={},
                              latency_prune={}, int8_only=True)
    record = run(args)
    assert set(record["rows"]) == {"unpruned-int8", "fxpress-int8", "fxpress-int8-latency"}
    assert "latency_fp32" not in record
    assert record["fxpress_int8_latency_ledger"]["allocation"] == "sensitivity"
