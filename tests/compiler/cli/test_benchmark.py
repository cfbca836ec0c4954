"""Side-by-side timing: summaries, ratios and the per-block ratios that show a run's noise."""

from __future__ import annotations

import pytest

from compiler.cli.benchmark import block_ratios, summarize, time_side_by_side


def test_block_ratios_pair_each_block_with_the_reference_block_timed_next_to_it():
    # 20 runs in blocks of 2; the machine is twice as slow in every other block, for both runners,
    # and "ours" is 10% faster in the first five blocks and 10% slower in the last five.
    slowdown = [1.0, 2.0] * 5
    peer = [0.010 * slow for slow in slowdown for _ in range(2)]
    ours = [t * (0.9 if index < 10 else 1.1) for index, t in enumerate(peer)]
    stats = [summarize("peer", 1, peer), summarize("ours", 1, ours)]
    assert block_ratios(stats, "peer") == {"ours": pytest.approx([0.9] * 5 + [1.1] * 5)}


def test_block_ratios_without_the_reference_are_empty():
    assert block_ratios([summarize("ours", 1, [0.01])], "peer") == {}


def test_time_side_by_side_records_every_run_in_blocks():
    calls = {"a": 0, "b": 0}

    def runner(name):
        def run():
            calls[name] += 1
        return run

    stats = time_side_by_side({"a": runner("a"), "b": runner("b")}, 1, warmup=1, runs=20)
    assert [len(item.samples_ms) for item in stats] == [20, 20]
    # warm-up, then per block of 2 an untimed settling call and 2 timed ones
    assert calls == {"a": 1 + 10 * 3, "b": 1 + 10 * 3}
    assert [len(values) for values in block_ratios(stats, "a").values()] == [10]
