"""Resident memory of this process and of other processes: current, peak, and the peak's reset.

Readings come from /proc on Linux (psutil where /proc is missing); nothing here imports more than
the standard library. Used by the benchmarks (one process per measured file) and by the export's
stage report (:mod:`export.stages`: the peak of each stage, in the export's process and its worker).
"""
from __future__ import annotations

import os
import resource
from typing import Iterable

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _statm_rss(pid) -> int:
    """Resident size (bytes) of process ``pid`` (``"self"`` for this one) from /proc/PID/statm."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def rss_bytes() -> int:
    """Current resident set size of this process (bytes), from /proc (psutil if /proc is missing)."""
    try:
        return _statm_rss("self")
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, or since the last :func:`reset_peak_rss` (bytes).

    Linux: ``VmHWM`` from /proc/self/status, the high-water mark of this process's
    own address space. ``getrusage`` ``ru_maxrss`` is not used there because Linux
    carries it across fork and exec: a worker started by a parent holding 360 MB
    reported 360 MB peak before it loaded anything (measured), and it cannot be reset.
    Elsewhere ru_maxrss.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if os.uname().sysname == "Darwin" else 1024)


def reset_peak_rss() -> bool:
    """Start a new peak: the high-water mark becomes the current resident size (Linux >= 4.0, writing 5
    to /proc/self/clear_refs). Returns False where that is not possible: the peak then keeps counting
    from the start of the process, an upper bound of the peak since the call."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_of(pids: Iterable[int]) -> int:
    """Summed current resident size of the processes ``pids`` (bytes); a process that has ended counts 0."""
    total = 0
    for pid in pids:
        try:
            total += _statm_rss(int(pid))
        except (OSError, ValueError, IndexError):
            continue
    return total


def mib(n_bytes) -> float:
    return float(n_bytes) / (1 << 20)
