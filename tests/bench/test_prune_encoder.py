"""bench/prune_encoder.py: its cosine summary, and one small end-to-end run on the zoo's MiniLM."""

from __future__ import annotations

import argparse

import pytest
import torch

from bench.prune_encoder import cosine_row, render, run


def test_the_cosine_row_summarises_each_sentences_cosine():
    reference = torch.eye(4)
    output = reference.clone()
    output[3] = torch.tensor([1.0, 0.0, 0.0, 1.0])  # the last sentence at cosine 1/sqrt(2)
    row = cosine_row(output, reference)
    assert row["cosine_min"] == pytest.approx(0.7071, abs=1e-4)
    assert row["cosine_mean"] == pytest.approx((3 + 0.70711) / 4, abs=1e-4)
    assert row["cosine_min"] <= row["cosine_p1"] <= row["cosine_mean"]


def test_the_bench_prunes_minilm_and_times_it_beside_the_unpruned_model():
    args = argparse.Namespace(model="minilm-l6", macs=0.3, seconds=0.0, train=200, eval=8, seq_len=16, runs=2,
                              options="{}", no_magnitude=True, json=None)
    record = run(args)
    row = record["rows"]["fxpress"]
    assert row["macs_removed"] >= 0.3 and 0 < row["cosine_mean"] <= 1.0001
    assert record["fxpress_ledger"]["padding"]["mask_input"] == 1
    assert set(record["latency_fp32"][16]) == {"unpruned", "fxpress"}
    assert "latency_fp32 batch 16, seq 16" in render(record)
