"""Summaries of timing samples and process memory readings (:mod:`runtime_py.memory`), with no heavy imports."""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from runtime_py.memory import mib, peak_rss_bytes, rss_bytes  # noqa: F401 (the benchmarks' readings)


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
