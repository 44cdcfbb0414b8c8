"""Summaries of timing samples and process memory readings, with no heavy imports."""
from __future__ import annotations

import os
import resource
from typing import Dict, Sequence

import numpy as np


def summarize(seconds: Sequence[float]) -> Dict[str, float]:
    """min / median / p90 / mean / max (seconds) of timed runs; p90 uses linear interpolation."""
    if len(seconds) == 0:
        raise ValueError("no timed runs to summarize")
    a = np.asarray(seconds, dtype=np.float64)
    return {
        "n": int(a.size),
        "min_s": float(a.min()),
        "median_s": float(np.median(a)),
        "p90_s": float(np.percentile(a, 90)),
        "mean_s": float(a.mean()),
        "max_s": float(a.max()),
    }


def rss_bytes() -> int:
    """Current resident set size of this process (bytes), from /proc (psutil if /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (bytes).

    Linux: ``VmHWM`` from /proc/self/status, the high-water mark of this process's
    own address space. ``getrusage`` ``ru_maxrss`` is not used there because Linux
    carries it across fork and exec: a worker started by a parent holding 360 MB
    reported 360 MB peak before it loaded anything (measured). Elsewhere ru_maxrss.
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


def mib(n_bytes) -> float:
    return float(n_bytes) / (1 << 20)
