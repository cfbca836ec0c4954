"""The CPU's integer dot-product instructions, and the int8 format that suits them.

ONNX Runtime's x86 int8 GEMM multiplies unsigned 8-bit activations by signed 8-bit weights
(U8S8). With VNNI (``vpdpbusd``) products accumulate in int32 directly. Without it, AVX2 and
AVX-512 use ``vpmaddubsw``, which adds pairs of u8 x s8 products into int16 *with saturation*:
``2 * 255 * 127`` overflows int16, and outputs silently clip. ONNX Runtime's advice is then
``reduce_range``: 7-bit weights, which bound the pair sum by ``2 * 255 * 64 < 32768``.

S8S8 is no way out on such CPUs. ONNX Runtime turns int8 QDQ activations into uint8 before fusing
(so 8-bit weights saturate again), and with ``session.qdqisint8allowed`` set its S8S8 kernels are
exact but ran EfficientNet-Lite0 5.7x slower than U8S8 on an AVX2 EPYC (measured side by side).

With VNNI (an AVX-512 VNNI EPYC, for one) the same U8S8 kernels are exact with full 8-bit weights,
so the format keeps 8 bits there. ``tests/backends/onnxruntime/test_isa.py`` pins whichever fact holds on the
machine it runs on.
"""

from __future__ import annotations

import functools
import logging
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class CpuIsa:
    """What matters for int8 on this CPU.

    Attributes:
        machine: ``platform.machine()``, e.g. ``x86_64``.
        vnni: the CPU has VNNI (or AMX) int8 dot products.
        flags: the int8-relevant feature flags found (e.g. ``avx2``, ``avx512f``, ``avx512_vnni``).
        source: where the flags came from.
    """

    machine: str
    vnni: bool
    flags: tuple[str, ...]
    source: str

    def to_dict(self) -> dict:
        """JSON-able form for the ledger and the manifest."""
        return asdict(self)


@dataclass(frozen=True)
class Int8Format:
    """The activation and weight formats chosen for a CPU, and why."""

    activation_dtype: str
    weight_bits: int
    name: str
    reason: str

    def to_dict(self) -> dict:
        """JSON-able form."""
        return asdict(self)


@functools.cache
def detect_isa() -> CpuIsa:
    """Read the CPU's feature flags (``/proc/cpuinfo`` on Linux, torch's dispatch level elsewhere)."""
    machine = platform.machine().lower()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        words = set()
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                words.update(line.split(":", 1)[1].split())
        interesting = ("avx2", "avx512f", "avx512bw", *_VNNI_FLAGS, "asimddp", "i8mm")
        flags = tuple(flag for flag in interesting if flag in words)
        vnni = any(flag in words for flag in _VNNI_FLAGS)
        return CpuIsa(machine, vnni, flags, "/proc/cpuinfo")
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return CpuIsa(machine, capability in ("AVX512_VNNI", "AMX"), (capability.lower(),), "torch cpu capability")


def channel_multiple(isa: CpuIsa) -> int:
    """The channel block of MLAS's blocked kernels on this ISA: 16 with AVX-512, 8 otherwise.

    Measured: EfficientNet-Lite0 pruned to widths like 13 or 26 ran 1.4-2.3x slower than unpruned on an
    AVX-512 machine; rounded to multiples of 16 the same pruning ran at 0.77x.
    """
    return 16 if "avx512f" in isa.flags or "avx512" in isa.flags else 8


def int8_format(isa: CpuIsa | None = None) -> Int8Format:
    """U8S8 with 8-bit weights where VNNI makes it exact; 7-bit weights (reduce_range) where not."""
    isa = isa or detect_isa()
    if isa.machine not in ("x86_64", "amd64", "i686", "x86"):
        return Int8Format("uint8", 8, "U8S8", f"{isa.machine}: int8 dot products accumulate in int32")
    if isa.vnni:
        return Int8Format("uint8", 8, "U8S8", "x86 with VNNI: u8 x s8 products accumulate in int32")
    return Int8Format("uint8", 7, "U8S8, reduce_range",
                      "x86 without VNNI: vpmaddubsw saturates int16 pair sums, so weights use 7 bits")
