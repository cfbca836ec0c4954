"""bench/low_rank_peers.py: one small end-to-end run of the classifier rows (digits-cnn)."""

from __future__ import annotations

import argparse

from bench.low_rank_peers import render, run


def test_the_bench_runs_low_rank_svd_and_pruning_side_by_side(tmp_path, monkeypatch):
    monkeypatch.setenv("FXPRESS_CACHE_DIR", str(tmp_path))
    args = argparse.Namespace(model="digits-cnn", macs=0.2, seconds=1.0, train=96, calibration=64, eval=40, runs=2,
                              int8=False, json=None, seq_len=128, ffn_macs=0.2, ffn_protect="*attention*")
    record = run(args)
    assert set(record["rows"]) == {"fxpress", "plain-svd", "fxpress-prune"}
    assert all(0 <= row["agreement"] <= 1 for row in record["rows"].values())
    assert record["fxpress_ledger"]["low_rank"]["method"] == "activation"
    assert record["plain-svd_ledger"]["low_rank"]["method"] == "svd"
    assert record["fxpress_ledger"]["recover"]["steps"] > 0
    assert set(record["latency_fp32"][16]) == {"original", "fxpress", "plain-svd", "fxpress-prune"}
    assert "latency_fp32 batch 16" in render(record)
