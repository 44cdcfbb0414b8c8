"""Activation ranges for quantization, chosen per tensor from calibration statistics.

A quantized tensor holds ``2**bits`` levels over one range. Plain min/max spends them on the
extremes: a tensor whose values mostly sit in [-1, 2] with a few reaching 100 gets a step of
0.4 and its typical values collapse onto a few levels (GMCNN's ELU layers, docs/TOLERANCES.md).
A narrower range rounds the bulk finer and clips the few values beyond it. Which is better
depends on the tensor, so four methods each propose a range:

* ``minmax``     -- the observed minimum and maximum;
* ``headroom``   -- min/max widened :data:`HEADROOM` times: for tensors whose held-out values
  go beyond what calibration saw (clipping them costs more than the coarser step; with 16-bit
  activations the step hardly matters);
* ``percentile`` -- the :data:`PERCENTILE` and 100 - :data:`PERCENTILE` percentiles;
* ``mse``        -- the range minimising the squared quantization error (rounding inside the
  range, clipping outside), searched on a histogram of the values (AIMET's and NNCF's MSE
  range setting; TensorRT's entropy calibration minimises a KL divergence instead, a proxy for
  the same error that is not used here: scored by held-out MSE it won none of the 98 tensors of the
  tests' cnum-4 model).

and the range used is the one whose **held-out** error is lowest: each method's range is fitted
on half the calibration samples and its exact quantization MSE measured on the other half, and
the other way round; the winning method's range is then fitted on all samples. Fitting and
judging on the same values would always crown ``mse`` (it minimises that very number); held-out
samples also keep a range from being fitted to one photo's outliers.

A tensor whose only consumer is an activation (GMCNN: every convolution output feeds an ELU) is
judged by the error *after* that activation, which is what the next layer sees: ELU maps every
value below about -8 to -1, so a convolution output's long negative tail can be clipped for free
and its int8 levels spent on the positive side. (Measured on the shipped model at 512x680: judged
on the tensors themselves, the chosen ranges clipped the positive side of convolution outputs
and one held-out sample fell from 33.9 dB (min/max) to 28.4 dB hole PSNR.)

Whatever the method, such a tensor's lower bound is :data:`ELU_FLOOR` (-8, where ELU is within
3.4e-4 of its -1 floor), or its observed minimum where that is higher; the method chooses the upper
bound. (``mse`` alone put 41 of the shipped model's 43 such bounds at -2.4 to -5.7, clipping up to 70 %
of a tensor's values; held at -8: hole PSNR per held-out sample 39.79 / 39.03 / 39.36 / 28.76 ->
39.66 / 39.74 / 40.29 / 28.85 dB at 512x680, ``tensor`` int8. ``percentile`` raised 4 bounds, over
0.01 % of their values, which changed nothing measurable: 28.34 -> 28.33 dB worst.) GMCNN's convolution outputs reach -100 to -700 while their
ELU outputs start at -1, so min/max spent most of the 256 levels on that tail (a step of 0.83
for a tensor in [-134, 78] instead of 0.34). Measured on the shipped model at 512x680 (min/max
otherwise, ``tensor`` int8): hole PSNR 33.9 -> 35.7 dB on the worst held-out sample, every
sample up 0.7-2.5 dB. The floor is deep on purpose: clipping shifts every value below it by
the same amount, a bias the next convolution sums over all its inputs at the floor rather than
noise that averages out. A floor that kept each value within a quarter of the ELU output's
int8 step (-2.6 for that tensor) measured 33.4 dB, below plain min/max.

The same bias, the other way: a tensor an ELU *produces* holds many values at exactly -1 (GMCNN:
most of some layers' outputs), and min/max's grid over [-1, 78.7] has no level at -1 (the integer
zero point puts the nearest at -0.94): every one of them comes out 0.06 too high, and the next
convolution sums that shift over all of them. So the range of an activation's output is moved
to the least one at least as wide whose grid holds the activation's floor exactly
(:data:`FLOORS`, :func:`floor_on_grid`: one step = 1/n for an integer n). Measured on the shipped
model at 512x680 (with the ELU floor above, min/max otherwise, ``tensor`` int8): hole PSNR
35.7 -> 38.7 dB on the worst held-out sample (39.0 / 38.7 / 40.6 / 39.2), the gate's 38 dB held
with every convolution in int8.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

METHODS = ("minmax", "headroom", "percentile", "mse")
PERCENTILE = 99.99
HEADROOM = 1.5
HIST_BINS = 2048
# mse search grid: bounds at the observed extreme times 2**(-k/GRID_STEPS_PER_OCTAVE), k = 0..GRID_OCTAVES*that
GRID_STEPS_PER_OCTAVE = 4
GRID_OCTAVES = 10


@dataclass
class TensorStats:
    """What calibration keeps of one tensor: per sample its exact min and max and a subsample of its values."""

    mins: List[float] = field(default_factory=list)
    maxs: List[float] = field(default_factory=list)
    parts: List[np.ndarray] = field(default_factory=list)  # float32, one per sample
    # per sample, the mean, the least and the largest value of each channel over rows and columns (float64 (C,)
    # each), where the pass measured them
    channel_means: List[np.ndarray] = field(default_factory=list)
    channel_lows: List[np.ndarray] = field(default_factory=list)
    channel_highs: List[np.ndarray] = field(default_factory=list)

    def add(self, lo: float, hi: float, values: np.ndarray, channel_mean: Optional[np.ndarray] = None,
            channel_low: Optional[np.ndarray] = None, channel_high: Optional[np.ndarray] = None) -> None:
        self.mins.append(float(lo))
        self.maxs.append(float(hi))
        self.parts.append(np.asarray(values, np.float32).ravel())
        for kept, per_channel in ((self.channel_means, channel_mean), (self.channel_lows, channel_low),
                                  (self.channel_highs, channel_high)):
            if per_channel is not None:
                kept.append(np.asarray(per_channel, np.float64).ravel())

    @property
    def lo(self) -> float:
        return min(self.mins)

    @property
    def hi(self) -> float:
        return max(self.maxs)


# ------------------------------------------------------------------ quantization model

def levels(bits: int, symmetric: bool) -> Tuple[int, int]:
    """(qmin, qmax) of the integer grid: int8 asymmetric -128..127, int16 symmetric -32767..32767."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def fake_quantize(values: np.ndarray, lo: float, hi: float, bits: int = 8, symmetric: bool = False) -> np.ndarray:
    """``values`` rounded to the grid of the range [lo, hi] (clipped outside), as TFLite's scale and zero point do."""
    qmin, qmax = levels(bits, symmetric)
    x = np.asarray(values, np.float64)
    if symmetric:
        scale = max(abs(lo), abs(hi), 1e-12) / qmax
        zero = 0.0
    else:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = max(hi - lo, 1e-12) / (qmax - qmin)
        zero = float(np.clip(np.round(qmin - lo / scale), qmin, qmax))
    q = np.clip(np.round(x / scale) + zero, qmin, qmax)
    return (q - zero) * scale


def elu(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


# The lowest value worth a level of an ELU's input: ELU(-8) = -0.99966 (see the module's docstring).
ELU_FLOOR = -8.0
# The value an activation's output sits at for every input far below 0: kept exactly on the grid
# of the tensors those activations produce (:func:`floor_on_grid`).
FLOORS = {"ELU": -1.0}
# Elementwise activations a tensor may feed: its error is measured after them (``through``).
ACTIVATIONS = {"ELU": elu}


def quantization_mse(values: np.ndarray, lo: float, hi: float, bits: int = 8, symmetric: bool = False,
                     through=None) -> float:
    """Mean squared error of quantizing ``values`` to the range's grid, measured after the activation
    ``through`` (a function) when the tensor feeds one: ELU maps every value below about -8 to -1,
    so clipping there costs nothing, while the positive side keeps its values."""
    x = np.asarray(values, np.float64)
    if not x.size:
        return 0.0
    q = fake_quantize(x, lo, hi, bits, symmetric)
    if through is not None:
        x, q = through(x), through(q)
    return float(np.mean((q - x) ** 2))


# ------------------------------------------------------------------ the methods

def _pool(stats: TensorStats, which: Sequence[int]) -> Tuple[np.ndarray, float, float]:
    values = np.concatenate([stats.parts[i] for i in which]) if which else np.zeros(0, np.float32)
    return values, min(stats.mins[i] for i in which), max(stats.maxs[i] for i in which)


def _with_zero(lo: float, hi: float, symmetric: bool) -> Tuple[float, float]:
    if symmetric:
        m = max(abs(lo), abs(hi))
        return -m, m
    return min(lo, 0.0), max(hi, 0.0)


def fit_minmax(values, lo, hi, bits, symmetric, through=None):
    return _with_zero(lo, hi, symmetric)


def fit_headroom(values, lo, hi, bits, symmetric, through=None):
    return _with_zero(lo * HEADROOM, hi * HEADROOM, symmetric)


def fit_percentile(values, lo, hi, bits, symmetric, through=None):
    if values.size == 0:
        return _with_zero(lo, hi, symmetric)
    if symmetric:
        m = float(np.percentile(np.abs(values), PERCENTILE))
        return -m, m
    a, b = np.percentile(values, [100.0 - PERCENTILE, PERCENTILE])
    return _with_zero(max(float(a), lo), min(float(b), hi), symmetric)


def _moments(values: np.ndarray, lo: float, hi: float):
    """Histogram of ``values`` on [lo, hi]: bin centres and counts."""
    counts, edges = np.histogram(values, bins=HIST_BINS, range=(lo, hi) if hi > lo else (lo - 1e-6, hi + 1e-6))
    return (edges[:-1] + edges[1:]) / 2, counts.astype(np.float64)


def _grid(extreme: float) -> np.ndarray:
    k = np.arange(GRID_OCTAVES * GRID_STEPS_PER_OCTAVE + 1)
    return extreme * 2.0 ** (-k / GRID_STEPS_PER_OCTAVE)


def _grid_error(x: np.ndarray, c: np.ndarray, a: np.ndarray, b: np.ndarray, qmin: int, qmax: int,
                bin_width: float, through=None) -> np.ndarray:
    """Squared quantization error summed over a histogram (centres ``x``, counts ``c``) for every
    range [a[k], b[k]]: each centre rounded to the range's grid (clipped outside it), compared
    after ``through`` if given. Where the step is finer than two bins the centre says nothing
    about rounding inside the bin, so values inside the range count the uniform-noise error
    step**2 / 12 instead (times the activation's squared slope there)."""
    step = np.maximum(b - a, 1e-12) / (qmax - qmin)
    xc = np.clip(x[None, :], a[:, None], b[:, None])
    q = a[:, None] + np.round((xc - a[:, None]) / step[:, None]) * step[:, None]
    slope2 = 1.0
    if through is None:
        err = (x[None, :] - q) ** 2
    else:
        err = (through(x)[None, :] - through(q)) ** 2
        h = 1e-3 * max(bin_width, 1e-9)
        slope2 = ((through(x + h) - through(x - h)) / (2 * h))[None, :] ** 2
    fine = (step < 2 * bin_width)[:, None] & (x[None, :] >= a[:, None]) & (x[None, :] <= b[:, None])
    err = np.where(fine, (step ** 2 / 12)[:, None] * slope2, err)
    return err @ c


def fit_mse(values, lo, hi, bits, symmetric, through=None):
    """The range of a search grid (bounds at the observed extremes times 2**(-k/4)) whose
    quantization error over a histogram of the values is least (:func:`_grid_error`)."""
    if values.size == 0:
        return _with_zero(lo, hi, symmetric)
    qmin, qmax = levels(bits, symmetric)
    if symmetric:
        top = max(abs(lo), abs(hi))
        x, c = _moments(values, -top, top)
        bounds = _grid(top)
        err = _grid_error(x, c, -bounds, bounds, qmin, qmax, 2 * top / HIST_BINS, through)
        m = float(bounds[int(np.argmin(err))])
        return -m, m
    a_grid = _grid(lo) if lo < 0 else np.zeros(1)
    b_grid = _grid(hi) if hi > 0 else np.zeros(1)
    start, stop = min(lo, 0.0), max(hi, 0.0)
    x, c = _moments(values, start, stop)
    width = (stop - start) / HIST_BINS
    # coordinate descent: the upper bound with the lower at the minimum, the lower bound with that
    # upper, and so on (5 x 41 evaluations instead of 41 x 41); on the 98 tensors of the tests'
    # cnum-4 model it finds ranges exactly as good as the full grid search's
    a, b = a_grid[0], b_grid[0]
    for _ in range(2):
        b = b_grid[int(np.argmin(_grid_error(x, c, np.full(b_grid.size, a), b_grid, qmin, qmax, width, through)))]
        a = a_grid[int(np.argmin(_grid_error(x, c, a_grid, np.full(a_grid.size, b), qmin, qmax, width, through)))]
    b = b_grid[int(np.argmin(_grid_error(x, c, np.full(b_grid.size, a), b_grid, qmin, qmax, width, through)))]
    return float(a), float(b)


FITTERS = {"minmax": fit_minmax, "headroom": fit_headroom, "percentile": fit_percentile, "mse": fit_mse}


def floor_on_grid(lo: float, hi: float, floor: float, bits: int = 8, symmetric: bool = False):
    """The least range at least as wide as [lo, hi] whose grid holds ``floor`` (< 0) exactly, as well as
    0: its step is -floor / n for the largest integer n that still reaches ``hi`` (asymmetric: the range
    [floor, (qmax - qmin - n) * step], ``floor`` its lowest level; symmetric: [-qmax * step, qmax * step]).
    None where no such grid reaches ``hi`` (one step would exceed -floor: ``floor`` then rounds to 0 or
    a level below, as it must)."""
    qmin, qmax = levels(bits, symmetric)
    if symmetric:
        n = int(np.floor(qmax * -floor / max(abs(lo), abs(hi), 1e-12)))
        return None if n < 1 else (-qmax * -floor / n, qmax * -floor / n)
    n = int(np.floor((qmax - qmin) * -floor / (max(hi, 0.0) - floor)))
    if n < 1 or lo < floor:
        return None
    return float(floor), float((qmax - qmin - n) * -floor / n)


# ------------------------------------------------------------------ the choice

def choose_range(stats: TensorStats, bits: int = 8, symmetric: bool = False,
                 methods: Sequence[str] = METHODS, through: str = "", produced_by: str = "") -> Dict[str, object]:
    """The range of one tensor: {"method", "range": [lo, hi], "min", "max", "heldout_mse": {method: mse}}
    (and "through" when the error is measured after an activation; "floor_on_grid" when the range was
    moved to hold the floor of the activation that produced the tensor, ``produced_by``).

    Each method's range is fitted on the even samples and scored on the odd ones, and the other
    way round (with one sample, fitted and scored on it); the lowest summed score wins, ties going
    to the earlier method in ``methods``; the winner's range is refitted on every sample.
    ``through`` names the activation (a key of :data:`ACTIVATIONS`) that every consumer of the
    tensor applies: errors are then measured after it (what the next layer sees).
    """
    fn = ACTIVATIONS[through] if through else None
    fit = FITTERS
    if through == "ELU":
        def floored(method):  # the floor bounds what the method sees, and is the range's lower bound
            def f(values, lo, hi, bits, symmetric, through=None):
                a, b = FITTERS[method](values, max(lo, ELU_FLOOR), hi, bits, symmetric, through)
                # a method's higher lower bound (mse: -2.4 to -5.7 on the shipped model's tensors) moves every
                # value below it alike: measured, see the module's docstring
                return (a, b) if symmetric else (max(lo, ELU_FLOOR), b)
            return f
        fit = {m: floored(m) for m in methods}
    n = len(stats.parts)
    halves = [(list(range(0, n, 2)), list(range(1, n, 2))), (list(range(1, n, 2)), list(range(0, n, 2)))]
    if n < 2:
        halves = [(list(range(n)), list(range(n)))]
    scores = {}
    for method in methods:
        total = 0.0
        for fit_on, score_on in halves:
            values, lo, hi = _pool(stats, fit_on)
            a, b = fit[method](values, lo, hi, bits, symmetric, fn)
            total += quantization_mse(_pool(stats, score_on)[0], a, b, bits, symmetric, fn)
        scores[method] = total / len(halves)
    best = min(methods, key=lambda m: (scores[m], methods.index(m)))
    values, lo, hi = _pool(stats, list(range(n)))
    a, b = fit[best](values, lo, hi, bits, symmetric, fn)
    out = {"method": best, "range": [float(a), float(b)], "min": float(lo), "max": float(hi),
           "heldout_mse": {m: float(f"{v:.4g}") for m, v in scores.items()}}
    if through:
        out["through"] = through
    floor = FLOORS.get(produced_by)
    # only where the floor is populated (values within half a unit of it); never narrower than chosen
    moved = floor_on_grid(a, b, floor, bits, symmetric) if floor is not None and lo < floor / 2 else None
    if moved is not None:
        out["range"] = [float(v) for v in moved]
        out["floor_on_grid"] = floor
    return out


def choose_ranges(stats: Dict[object, TensorStats], bits: int = 8, symmetric: bool = False,
                  method: str = "auto", through: Dict[object, str] = None,
                  produced_by: Dict[object, str] = None) -> Dict[object, Dict[str, object]]:
    """:func:`choose_range` for every tensor; ``method`` other than ``auto`` forces one method;
    ``through`` maps tensors to the activation their consumers apply, ``produced_by`` to the one that
    produced them."""
    methods = METHODS if method == "auto" else (method,)
    if method != "auto" and method not in METHODS:
        raise ValueError(f"unknown range method {method!r}; choose from auto, {', '.join(METHODS)}")
    through, produced_by = through or {}, produced_by or {}
    return {key: choose_range(s, bits, symmetric, methods, through.get(key, ""), produced_by.get(key, ""))
            for key, s in stats.items()}
