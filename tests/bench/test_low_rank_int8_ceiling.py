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
    for shape_and_target, row in rows.items():
        dense, chain = row.values()
        assert dense["ratio"] == 1.0 and chain["p50_ms"] > 0, shape_and_target
