"""The compile thread policy: idle cores measured, the choice recorded in the ledger, PyTorch's setting restored."""

from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from compiler import compile, threads
from compiler.cli import main as cli
from compiler.errors import TargetError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def test_idle_cores_is_a_share_of_the_machine():
    idle = threads.idle_cores(0.05)
    if idle is None:
        pytest.skip("no /proc/stat here")
    assert 0.0 <= idle <= os.cpu_count()


@pytest.mark.parametrize(("idle", "expected"), [(0.0, 1), (0.4, 1), (0.6, 1), (1.6, 2), (64.0, 2)])
def test_auto_uses_the_idle_cores_at_least_one_at_most_the_current_setting(monkeypatch, idle, expected):
    monkeypatch.setattr(threads, "idle_cores", lambda window=0.25: idle)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        record = threads.choose_threads("auto")
    finally:
        torch.set_num_threads(previous)
    assert record["threads"] == min(expected, 2) and record["policy"] == "auto" and record["idle_cores"] == idle
    assert ("other jobs" in record["reason"]) == (record["threads"] < 2)


def test_unreadable_load_keeps_pytorchs_setting(monkeypatch):
    monkeypatch.setattr(threads, "idle_cores", lambda window=0.25: None)
    record = threads.choose_threads("auto")
    assert record["threads"] == torch.get_num_threads() and "unreadable" in record["reason"]


@pytest.mark.parametrize("bad", [0, -1, "two", 1.5, True])
def test_a_bad_thread_count_is_a_target_error(bad):
    with pytest.raises(TargetError, match="threads must be 'auto' or a positive integer"):
        threads.choose_threads(bad)


def test_compile_runs_on_the_asked_threads_records_them_and_restores_the_setting():
    previous = torch.get_num_threads()
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            return x

    model = nn.Sequential(_model(), Probe()).eval()
    model[1].register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    compiled = compile(model, "cpu-fp32", (torch.randn(2, 8),), threads=1)
    assert compiled.report.capture["threads"] == {"policy": "fixed", "threads": 1, "previous": previous,
                                                  "cores": threads.usable_cores()}
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == previous
    assert "1 compile thread(s) (fixed)" in str(compiled.report)


def test_the_setting_is_restored_when_the_compile_fails():
    previous = torch.get_num_threads()
    with pytest.raises(Exception):  # noqa: B017 - any compile error; the point is the restored setting
        compile(_model(), "cpu-fp32", (torch.randn(2, 3),), threads=1)  # wrong input width
    assert torch.get_num_threads() == previous


def test_the_cli_refuses_a_bad_thread_count(tmp_path):
    result = CliRunner().invoke(cli, ["compile", "digits-cnn", "-o", str(tmp_path / "out"), "--threads", "0"])
    assert result.exit_code != 0 and "--threads" in result.output and "positive integer" in result.output


def test_cpu_int8_gives_the_same_bytes_on_one_and_two_threads():
    """GPTQ runs on one thread whatever the policy chose: without that this model's artifact differed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 192, 3, padding=1), nn.ReLU(), nn.Conv2d(192, 192, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(192, 64, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(64, 10)).eval()
    x = torch.randn(64, 16, 20, 20)
    artifacts = [compile(model, "cpu-int8", (x[:2],), calibration_data=[(x,)], threads=count).onnx.SerializeToString()
                 for count in (1, 2)]
    assert artifacts[0] == artifacts[1]
