"""Summaries of timing samples, with no heavy imports (process memory readings: :mod:`runtime_py.memory`)."""
from __future__ import annotations

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
