"""How many intra-op threads a compile uses: all free cores on a quiet machine, fewer on a loaded one.

A compile is long chains of short PyTorch kernels (calibration forwards, GPTQ's per-layer solves,
the sensitivity probes). PyTorch runs each on ``torch.get_num_threads()`` OpenMP threads that meet
at a barrier; when other jobs hold the cores, a kernel waits for its slowest thread to be
scheduled again, every time. ``bench/compile_under_load.py`` measures what that costs and what
this policy gives back.

The policy ("auto"): measure the idle share of the CPUs this process may run on over a short
window (``/proc/stat``), and use as many threads as there are idle cores, at least one and at most
PyTorch's current setting. A number asks for exactly that many. The choice and what it was based
on go into the ledger (``report.capture["threads"]``); PyTorch's setting is restored afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from compiler.errors import TargetError

logger = logging.getLogger(__name__)

PROBE_SECONDS = 0.25  # the window over which idle CPU time is measured


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def idle_cores(window: float = PROBE_SECONDS) -> float | None:
    """How many cores sat idle over ``window`` seconds (``/proc/stat``); None where that cannot be read."""
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(window)
    second = _cpu_times()
    if second is None:
        return None
    busy = (second[0] - first[0]) - (second[1] - first[1])
    total = second[0] - first[0]
    if total <= 0:
        return None
    return max(0.0, (1.0 - busy / total) * (os.cpu_count() or 1))


def _cpu_times() -> tuple[int, int] | None:
    """(total, idle + iowait) jiffies of all CPUs, from the first line of ``/proc/stat``."""
    stat = Path("/proc/stat")
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = [int(value) for value in stat.read_text().splitlines()[0].split()[1:]]
        return sum(fields[:8]), fields[3] + fields[4]
    return None


def choose_threads(requested: int | str = "auto") -> dict[str, Any]:
    """The thread count for a compile and the record of why; see the module docstring."""
    current = torch.get_num_threads()
    cores = usable_cores()
    if requested != "auto":
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise TargetError(f"threads must be 'auto' or a positive integer, got {requested!r}")
        return {"policy": "fixed", "threads": requested, "previous": current, "cores": cores}
    idle = idle_cores()
    if idle is None:
        return {"policy": "auto", "threads": current, "previous": current, "cores": cores,
                "idle_cores": None, "reason": "CPU load unreadable here: PyTorch's setting kept"}
    threads = max(1, min(current, cores, int(idle + 0.5)))
    reason = ("every core idle" if threads == min(current, cores)
              else f"{idle:.1f} of {cores} cores idle: other jobs hold the rest")
    return {"policy": "auto", "threads": threads, "previous": current, "cores": cores,
            "idle_cores": round(idle, 2), "reason": reason}


@contextlib.contextmanager
def compile_threads(requested: int | str = "auto") -> Iterator[dict[str, Any]]:
    """Run the body with the chosen thread count; yield its record; restore PyTorch's setting."""
    record = choose_threads(requested)
    previous = torch.get_num_threads()
    if record["threads"] != previous:
        logger.info("compiling on %d thread(s) instead of %d: %s", record["threads"], previous,
                    record.get("reason", "asked for"))
    torch.set_num_threads(record["threads"])
    try:
        yield record
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def fixed_threads(count: int) -> Iterator[None]:
    """Run the body on ``count`` PyTorch threads, whatever the compile's policy chose, then restore it.

    For computations whose result, not only speed, depends on the thread count (float GEMM and
    Cholesky blocking follow it, and GPTQ's rounding flips on the last bits): on one thread they give
    the same artifact on any machine, loaded or not.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
