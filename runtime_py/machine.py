"""The machine a timing was taken on, in the terms that decide which kernels run: the CPU's name and core count,
the SIMD features XNNPACK and OpenBLAS choose their kernels by, and the versions of the packages that run them.

The benchmarks record it with every run (benchmarks.run.machine_meta); the export records it with each fallback
file's price (export.fallback.price) and takes an earlier export's latency ratio only where it was timed on a
machine that reads the same here (export.fallback.seeds_from_manifest). Standard library only.
"""
from __future__ import annotations

import os
import platform
from typing import Dict, List, Optional

#: SIMD features that decide which kernels XNNPACK and OpenBLAS run
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "amx_tile")


def _cpuinfo_field(name: str) -> Optional[str]:
    """The first ``name`` line of /proc/cpuinfo (its value), None where there is none or no /proc."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == name),
                        None)
    except OSError:
        return None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what :mod:`platform` says."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_simd_flags() -> Dict[str, List[str]]:
    """{"present": [...], "absent": [...]} of :data:`SIMD_FLAGS` from /proc/cpuinfo ({} where unreadable)."""
    line = _cpuinfo_field("flags")
    if line is None:
        return {}
    flags = set(line.split())
    return {"present": [f for f in SIMD_FLAGS if f in flags], "absent": [f for f in SIMD_FLAGS if f not in flags]}


def package_version(dist: str) -> str:
    """The installed version of distribution ``dist``, or "not installed"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def timing_machine() -> Dict[str, object]:
    """What a LiteRT latency measured here depends on beyond the file and the thread count: two timings whose
    records are equal were taken on the same kind of machine with the same kernels. Not the load at the time,
    which the export's price does not record."""
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "simd": cpu_simd_flags().get("present"),
            "litert": package_version("ai-edge-litert")}
