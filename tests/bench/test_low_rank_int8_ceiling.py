"""bench/low_rank_int8_ceiling.py: the chain ranks, and one small run of the GEMM rows."""

from __future__ import annotations

import argparse

import pytest

from bench.low_rank_int8_ceiling import SHAPES, chain_rank, time_gemms


@pytest.mark.parametrize(("features_in", "features_out", "rank"), [(384, 1536, 208), (1536, 384, 208), (384, 384, 128)])
def test_chain_rank_removes_the_mac_share_in_blocks_of_16(features_in, features_out, rank):
    found = chain_rank(features_in, features_out)
    assert found == rank and found % 16 == 0
    assert found * (features_in + features_out) <= 0.7 * features_in * features_out
    assert (found + 16) * (features_in + features_out) > 0.7 * features_in * features_out


def test_gemm_rows_time_dense_and_chain_for_both_targets():
    rows = time_gemms(argparse.Namespace(tokens=32, runs=4))
    assert len(rows) == 2 * len(SHAPES)
    for (features_in, features_out) in SHAPES:
        for target in ("cpu-fp32", "cpu-int8-dynamic"):
            row = rows[f"{features_in}x{features_out} {target}"]
            assert list(row) == ["dense", f"rank {chain_rank(features_in, features_out)}"]
            dense, chain = row.values()
            assert dense["ratio"] == 1.0 and chain["p50_ms"] > 0
            assert chain["ratio"] == pytest.approx(chain["p50_ms"] / dense["p50_ms"], abs=0.02)  # from unrounded times
