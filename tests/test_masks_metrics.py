import numpy as np
import pytest

from runtime_py import masks, metrics


@pytest.mark.parametrize("kind", masks.KINDS)
@pytest.mark.parametrize("size", list(masks.SIZE_CLASSES))
def test_masks_are_seeded_binary_and_sized(kind, size):
    a = masks.make_mask(kind, 128, 160, seed=7, size=size)
    b = masks.make_mask(kind, 128, 160, seed=7, size=size)
    c = masks.make_mask(kind, 128, 160, seed=8, size=size)
    assert a.shape == (128, 160) and a.dtype == np.uint8
    assert set(np.unique(a)) <= {0, 1} and a.any()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    lo, hi = masks.SIZE_CLASSES[size]
    if kind != "strokes":  # rect/blob are drawn to the class range up to rounding
        assert lo * 0.7 <= a.mean() <= hi * 1.3


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown mask kind"):
        masks.make_mask("circle", 64, 64, 0)


def test_psnr_ssim_regions():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    mask = np.zeros((64, 80), np.uint8)
    mask[20:40, 30:50] = 1
    out = img.copy()
    out[mask > 0] = 0
    assert metrics.psnr(img, img) == float("inf")
    assert metrics.psnr(img, out, mask == 0) == float("inf")
    assert metrics.psnr(img, out, mask > 0) < 10
    assert metrics.ssim(img, img) == pytest.approx(1.0)
    assert metrics.ssim(img, out, mask > 0) < 0.2
    band = metrics.boundary_band(mask, 3)
    assert band.sum() > 0 and not band[30, 40] and not band[0, 0] and band[20, 40]
    s = metrics.region_scores(img, out, mask)
    assert s["hole_psnr"] < s["band_psnr"] < s["psnr"]
    # known value: constant error of 16 gives 20*log10(255/16)
    assert metrics.psnr(np.full((4, 4), 100, np.uint8), np.full((4, 4), 116, np.uint8)) == pytest.approx(
        20 * np.log10(255 / 16))
