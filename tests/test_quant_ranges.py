"""Per-tensor activation range choice (export.quant_ranges): pure NumPy, no converter."""
from __future__ import annotations

import numpy as np
import pytest

from export.quant_ranges import (METHODS, TensorStats, choose_range, choose_ranges, fake_quantize, fit_mse,
                                 quantization_mse)


def _elu_like(rng, n, outlier_fraction=0.0, outlier_range=(50.0, 100.0)):
    """Values like a GMCNN ELU layer's: a bulk near [-1, 3] (many at the -1 floor) and rare large outliers."""
    x = rng.normal(0.0, 1.0, n)
    x = np.where(x < 0, np.expm1(2 * x), x)
    k = int(round(n * outlier_fraction))
    if k:
        x[rng.choice(n, k, replace=False)] = rng.uniform(*outlier_range, k)
    return x.astype(np.float32)


def _stats(rng, samples=8, n=200_000, keep=1 << 15, **kw):
    """TensorStats as calibration builds them: exact per-sample min/max, a random subsample of the values."""
    stats = TensorStats()
    for _ in range(samples):
        x = _elu_like(rng, n, **kw)
        stats.add(float(x.min()), float(x.max()), x[rng.integers(0, n, keep)])
    return stats


def test_planted_outliers_get_a_clipped_range_that_beats_min_max():
    """A tensor whose bulk sits in [-1, 3] with a few values at 50-100 (planted in every sample):
    min/max spends the int8 levels on the outliers; the chosen range clips them and quantizes
    fresh samples of the same tensor with far less error."""
    rng = np.random.default_rng(0)
    stats = _stats(rng, n=2_000_000, outlier_fraction=1e-6)  # 2 outliers per sample
    choice = choose_range(stats, bits=8, symmetric=False)
    assert choice["max"] >= 50.0  # the outliers were seen...
    assert choice["method"] != "minmax" and choice["range"][1] < 20.0  # ...and clipped
    assert choice["heldout_mse"][choice["method"]] < 0.1 * choice["heldout_mse"]["minmax"]
    fresh = _elu_like(np.random.default_rng(1), 2_000_000, outlier_fraction=1e-6)
    chosen = quantization_mse(fresh, *choice["range"])
    minmax = quantization_mse(fresh, choice["min"], choice["max"])
    # expected: min/max rounds everything with a 0.4 step (MSE 0.013); the clipped range pays
    # ~75**2 for each of the 2 outliers in 2e6 values (0.005) and almost nothing for the rest
    assert chosen < 0.5 * minmax, (chosen, minmax)


def test_frequent_large_values_keep_their_range():
    """Where the large values are common, clipping them costs more than coarse steps: min/max
    (or a range as wide) is kept, as the held-out error says."""
    rng = np.random.default_rng(2)
    stats = _stats(rng, outlier_fraction=1e-3)
    choice = choose_range(stats)
    assert choice["range"][1] >= 0.9 * choice["max"], choice


def test_ranges_contain_zero_and_int16_is_symmetric():
    rng = np.random.default_rng(3)
    stats = TensorStats()
    for _ in range(4):
        x = rng.uniform(2.0, 5.0, 10_000).astype(np.float32)  # all positive: 0 must still be on the grid
        stats.add(float(x.min()), float(x.max()), x)
    c8 = choose_range(stats)
    assert c8["range"][0] == 0.0 and c8["range"][1] > 0
    c16 = choose_range(stats, bits=16, symmetric=True)
    assert c16["range"][0] == -c16["range"][1] > -10
    # 16-bit grids are ~256x finer than 8-bit ones over the same range
    assert c16["heldout_mse"]["minmax"] < c8["heldout_mse"]["minmax"] / 1000


def test_held_out_beyond_calibration_chooses_headroom_for_16_bits():
    """Samples that each reach further than the others (as held-out photos do): widening the range
    beats clipping the next sample's extremes when 16-bit steps cost nothing."""
    rng = np.random.default_rng(4)
    stats = TensorStats()
    for i in range(6):
        x = rng.normal(0, 1 + i % 3, 20_000).astype(np.float32)
        stats.add(float(x.min()), float(x.max()), x)
    assert choose_range(stats, bits=16, symmetric=True)["method"] == "headroom"


def test_fake_quantize_matches_tflite_grid():
    """Asymmetric int8: 256 levels, zero exact, clipping outside; symmetric int16: zero point 0."""
    x = np.linspace(-3, 7, 10_001)
    q = fake_quantize(x, -1.0, 3.0)
    assert len(np.unique(q)) <= 256 and 0.0 in q
    step = 4 / 255
    # the integer zero point moves the grid by less than a step
    assert q.min() >= -1.0 - step and q.max() <= 3.0 + step
    assert np.abs(q - np.clip(x, -1, 3)).max() <= step / 2 + step
    q16 = fake_quantize(x, -7.0, 7.0, bits=16, symmetric=True)
    assert np.abs(q16 - x).max() <= 7.0 / 32767 / 2 + 1e-12


@pytest.mark.parametrize("tail", ["two far points", "long tail"])
def test_mse_search_lands_at_the_brute_force_optimum(tail):
    """The histogram search's range quantizes the values within 10 % of the error of the best upper
    bound found by exact brute force: uniform [0, 1] values with two points at 1000 (clipping them
    costs more than rounding the bulk to 0 or one step), or with 1 % spread over [1, 10]."""
    rng = np.random.default_rng(5)
    bulk = rng.uniform(0, 1, 200_000)
    extra = np.array([1000.0, 1000.0]) if tail == "two far points" else rng.uniform(1, 10, 2_000)
    x = np.concatenate([bulk, extra]).astype(np.float32)
    lo, hi = fit_mse(x, float(x.min()), float(x.max()), 8, False)
    assert lo == 0.0
    brute = min(quantization_mse(x, 0.0, b) for b in np.geomspace(0.5, float(x.max()), 400))
    assert quantization_mse(x, lo, hi) <= 1.1 * brute


def test_forced_method_and_unknown_method():
    rng = np.random.default_rng(6)
    stats = {"t": _stats(rng, samples=2, n=20_000)}
    for method in METHODS:
        assert choose_ranges(stats, method=method)["t"]["method"] == method
    with pytest.raises(ValueError, match="unknown range method"):
        choose_ranges(stats, method="kl")


def test_a_tensor_feeding_elu_is_judged_after_the_elu():
    """A convolution output with a long negative tail (down to -1000) and its useful values in
    [-1, 5]: the ELU after it maps everything below about -8 to -1, so judged after the ELU the
    chosen range drops the negative tail and spends the int8 levels on the positive side; judged
    on the tensor itself, clipping the tail would look costly."""
    from export.quant_ranges import elu

    rng = np.random.default_rng(7)
    stats = TensorStats()
    for _ in range(6):
        x = np.concatenate([rng.uniform(-1, 5, 30_000), -rng.exponential(150.0, 3_000)]).astype(np.float32)
        stats.add(float(x.min()), float(x.max()), x)
    after = choose_range(stats, through="ELU")
    plain = choose_range(stats)
    assert after["through"] == "ELU" and after["range"][0] > -20.0 and after["range"][1] >= 4.9
    assert plain["range"][0] < -100.0
    fresh = np.concatenate([rng.uniform(-1, 5, 30_000), -rng.exponential(150.0, 3_000)])
    err = lambda r: np.mean((elu(fake_quantize(fresh, *r)) - elu(fresh)) ** 2)  # noqa: E731
    assert err(after["range"]) < 0.05 * err((after["min"], after["max"]))


def _conv_output_stats(rng, bulk, tail, extremes, samples=4):
    """Statistics of a convolution output feeding an ELU: per sample ``bulk`` = (lo, hi, n) uniform values,
    ``tail`` = (depth, n) uniform in [-depth, 0], and the ``extremes`` every sample reaches."""
    stats = TensorStats()
    for _ in range(samples):
        x = np.concatenate([rng.uniform(*bulk), -rng.uniform(0, tail[0], tail[1]), extremes])
        stats.add(float(x.min()), float(x.max()), x.astype(np.float32))
    return stats


@pytest.mark.parametrize("method", METHODS)
def test_an_elu_fed_tensor_starts_at_the_elu_floor(method):
    """A convolution output reaching -300 whose ELU output spans [-1, 78] (GMCNN's, measured): every
    method stops its lower bound at the ELU floor (-8), where ELU is within 3.4e-4 of -1. The levels
    go to the positive side: min/max's input step falls from 378 / 255 to 86 / 255, and the error
    after the ELU and its own quantization (what the next layer gets) ~10x; clipping shifts the
    values below the floor by far less than that output's step."""
    from export.quant_ranges import ELU_FLOOR, elu

    rng = np.random.default_rng(8)
    stats = _conv_output_stats(rng, (-1, 5, 30_000), (300, 10_000), [-300.0, 78.0])
    choice = choose_ranges({"t": stats}, method=method, through={"t": "ELU"})["t"]
    lo, hi = choice["range"]
    # every method, mse included (left to itself it clips higher: it weighs each value's error, not the
    # shift the clipped values share, which the next convolution sums)
    assert lo == ELU_FLOOR, choice
    fresh = np.concatenate([rng.uniform(-1, 5, 30_000), -rng.uniform(0, 300, 10_000)])
    below = fresh < lo
    moved = np.abs(elu(fake_quantize(fresh[below], lo, hi)) - elu(fresh[below]))
    assert below.sum() > 1000 and moved.max() <= 0.03 * (hi + 1.0) / 255, moved.max()  # 5e-4 vs 6 % of a step
    if method == "minmax":
        def after_elu(r):  # what the next layer gets: the ELU of the rounded input, rounded to its own grid
            return fake_quantize(elu(fake_quantize(fresh, *r)), -1.0, hi)

        unfloored = np.mean((after_elu((-300.0, hi)) - elu(fresh)) ** 2)
        floored = np.mean((after_elu((lo, hi)) - elu(fresh)) ** 2)
        assert floored < 0.25 * unfloored, (floored, unfloored)
    # not fed to an ELU: the tail is the tensor's own and min/max keeps it
    assert choose_ranges({"t": stats}, method="minmax")["t"]["range"][0] == -300.0


@pytest.mark.parametrize("method", METHODS)
def test_an_elu_fed_tensor_above_the_floor_keeps_its_observed_minimum(method):
    """A convolution output whose minimum (-4.4) is above the ELU floor, as the first convolution of each
    of GMCNN's branches: no method clips its negative side (percentile would at its 0.01 % point)."""
    stats = _conv_output_stats(np.random.default_rng(9), (-1, 3, 30_000), (4.0, 3_000), [-4.4, 3.2])
    choice = choose_ranges({"t": stats}, method=method, through={"t": "ELU"})["t"]
    assert choice["range"][0] == pytest.approx(-4.4, abs=1e-6), choice


def test_an_elu_output_range_holds_minus_one_exactly():
    """An ELU's output: most values at its -1 floor. Min/max over [-1, 78.7] puts no level at -1 (the
    integer zero point moves the grid: the nearest level is -0.94), so every one of them shifts alike;
    the chosen range is the least one at least as wide whose grid holds -1 and 0 exactly."""
    from export.quant_ranges import elu, floor_on_grid

    rng = np.random.default_rng(9)
    stats = TensorStats()
    for _ in range(4):
        x = elu(np.concatenate([rng.uniform(-30, 0, 20_000), rng.uniform(0, 5, 10_000), [78.7]]))
        stats.add(float(x.min()), float(x.max()), x.astype(np.float32))
    assert fake_quantize(np.array([-1.0]), -1.0, 78.7)[0] == pytest.approx(-0.94, abs=0.01)  # min/max's grid
    for bits, symmetric in ((8, False), (16, True)):
        choice = choose_ranges({"t": stats}, bits, symmetric, method="minmax", produced_by={"t": "ELU"})["t"]
        lo, hi = choice["range"]
        assert choice["floor_on_grid"] == -1.0 and hi >= 78.7 and lo <= -1.0
        q = fake_quantize(np.array([-1.0, 0.0, 78.7]), lo, hi, bits, symmetric)
        assert q[0] == pytest.approx(-1.0, abs=1e-9) and q[1] == 0.0 and abs(q[2] - 78.7) <= (hi - lo) / (2 ** bits - 1)
    # int8: a step of 1/3 (84 / 252 levels above 0), the least that reaches 78.7 (1/4 would stop at 62.75)
    assert choose_ranges({"t": stats}, method="minmax", produced_by={"t": "ELU"})["t"]["range"] == [-1.0, 84.0]
    assert floor_on_grid(-1.0, 3.1, -1.0) == pytest.approx((-1.0, 255 / 62 - 1))
    assert floor_on_grid(-1.0, 300.0, -1.0) is None  # a step over 1: -1 cannot be a level
    # not an activation's output, or its floor never reached: the range stays min/max's
    assert "floor_on_grid" not in choose_ranges({"t": stats}, method="minmax")["t"]
    high = TensorStats()
    high.add(-0.2, 5.0, np.linspace(-0.2, 5.0, 100, dtype=np.float32))
    assert choose_ranges({"t": high}, method="minmax", produced_by={"t": "ELU"})["t"]["range"] == [-0.2, 5.0]
