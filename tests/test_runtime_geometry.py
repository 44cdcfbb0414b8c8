"""The pipeline's pixel rules (docs/PIPELINE.md, "Resizing rules" and "Back to full resolution") give, bit
for bit, what their documented formulas give, however they are computed.

Each reference below is the formula written out the plain way (a float32 copy, ``cv2.resize``,
``floor(clip(x, 0, 255) + 0.5)``, coverage ``> 0``), as the runtime computed it before it learned to skip
passes, copies and the mask's float resampling.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from helpers import recording_set
from runtime_py.geometry import (Window, context_window, copy_where, erode, needs_rotation, resize_image,
                                 resize_image_part, resize_mask, rotate_in, rotate_out, round_to_u8, scaled_radius)
from runtime_py.imageio import SourceImage, compose_output
from runtime_py.pipeline import S2_REFERENCE_ROWS, Pipeline, PipelineConfig

# (source, destination) shapes: down (the 12 MP crop to 512x680 and to pass 2's 1024x1360, odd and
# prime sizes, integer factors on both axes, on one axis only (2, exact in floats, and 3), one side kept), up (pass 1 to the
# 12 MP crop), one side up and one down, and the same size
SHAPE_PAIRS = [
    ((2814, 3738), (512, 680)), ((2814, 3738), (1024, 1360)), ((301, 419), (64, 88)), ((997, 1361), (512, 680)),
    ((128, 176), (64, 88)), ((128, 301), (64, 88)), ((300, 419), (100, 88)), ((301, 264), (64, 88)), ((192, 88), (64, 88)),
    ((65, 89), (64, 88)), ((512, 680), (2814, 3738)), ((64, 88), (301, 419)), ((33, 47), (128, 176)),
    ((50, 300), (64, 88)), ((64, 88), (64, 88)),
]


def formula_round(x):
    """floor(clip(x, 0, 255) + 0.5) to uint8, step by step in x's float type (the documented rounding)."""
    x = np.clip(x, 0.0, 255.0)
    x += x.dtype.type(0.5)
    np.floor(x, out=x)
    return x.astype(np.uint8)


def formula_resize_image(img, shape):
    rows, cols = shape
    if img.shape[:2] == (rows, cols):
        return img.copy()
    method = cv2.INTER_AREA if rows <= img.shape[0] and cols <= img.shape[1] else cv2.INTER_CUBIC
    return formula_round(cv2.resize(img.astype(np.float32), (cols, rows), interpolation=method))


def formula_resize_mask(mask, shape):
    rows, cols = shape
    if mask.shape == (rows, cols):
        return mask.copy()
    method = cv2.INTER_AREA if rows <= mask.shape[0] and cols <= mask.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(mask.astype(np.float32), (cols, rows), interpolation=method) > 0.0


def awkward_values(dtype, rng, n=20000):
    """Every k + 0.5 and its two float neighbours for k in -3..257, values far outside [0, 255],
    +-inf, NaN, zeros of both signs and uniform noise, in ``dtype``."""
    dtype = np.dtype(dtype)
    halves = (np.arange(-3, 258) + 0.5).astype(dtype)
    near = np.concatenate([halves, np.nextafter(halves, dtype.type(-np.inf)), np.nextafter(halves, dtype.type(np.inf))])
    special = np.array([-1e30 if dtype != np.float16 else -6e4, 6e4, -np.inf, np.inf, np.nan, -0.0, 0.0, 255.0, 256.0,
                        np.nextafter(dtype.type(0.5), dtype.type(0)), np.nextafter(dtype.type(255.5), dtype.type(256))],
                       dtype)
    noise = rng.uniform(-40, 300, n).astype(dtype)
    return np.concatenate([near, special, noise])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_round_to_u8_is_the_formula_at_every_awkward_value(dtype):
    rng = np.random.default_rng(1)
    v = awkward_values(dtype, rng)
    with np.errstate(invalid="ignore"):  # NaN to uint8: both sides cast it the same way
        np.testing.assert_array_equal(round_to_u8(v), formula_round(v))
        # halves round up, whatever the float type
        assert (round_to_u8((np.arange(0, 255) + 0.5).astype(dtype)) == np.arange(1, 256)).all()
        assert round_to_u8(np.array([-0.4, -7, 300, np.inf], dtype)).tolist() == [0, 0, 255, 255]


@pytest.mark.parametrize("shape", [(7, 5, 3), (700, 600, 3), (1, 1, 3), (513, 1), (0, 4, 3)])
def test_round_to_u8_of_views_and_shapes(shape):
    """Row blocks, a strided box, reversed views, one pixel, nothing: the formula, and the input untouched."""
    rng = np.random.default_rng(2)
    big = rng.uniform(-30, 290, (shape[0] + 9, *shape[1:])).astype(np.float32)
    big[1::3] = np.floor(big[1::3]) + 0.5  # a third of the rows exactly at k + 0.5
    keep = big.copy()
    views = [big[:shape[0]], big[3:3 + shape[0]][:, ::-1], big[::-1][:shape[0]]]
    for v in views:
        np.testing.assert_array_equal(round_to_u8(v), formula_round(np.array(v)))
    np.testing.assert_array_equal(big, keep)


def test_round_to_u8_of_integers():
    a = np.array([[-5, 0, 17, 255, 256, 10 ** 6]], np.int64)
    np.testing.assert_array_equal(round_to_u8(a), formula_round(a))


@pytest.mark.parametrize("src,dst", SHAPE_PAIRS)
def test_resize_image_is_the_formula(src, dst):
    rng = np.random.default_rng(src[0] * 7 + dst[1])
    big = rng.integers(0, 256, (src[0] + 5, src[1] + 7, 3), np.uint8)
    big[::2, ::3] = rng.choice(np.array([0, 255], np.uint8), big[::2, ::3].shape)  # hard edges: cubic overshoots
    img = big[2:2 + src[0], 3:3 + src[1]]  # a window of a larger image, as the pipeline's crop is
    np.testing.assert_array_equal(resize_image(img, dst), formula_resize_image(img, dst))


@pytest.mark.parametrize("src,dst", [p for p in SHAPE_PAIRS if p[0] != p[1]] + [((7, 1361), (5, 680)), ((301, 419), (2, 3))])
@pytest.mark.parametrize("channels", [3, 1])
def test_resampling_gives_opencvs_floats(src, dst, channels):
    """Before any rounding: the resampling (an area downscale run as OpenCV's two passes one by one
    where neither scale is an integer, else one call) is OpenCV's own float32 result, every bit; a
    last-bit difference would hide behind the rounding in most pixels. The passes were checked on
    4,712 random shape pairs of 1, 3 and 4 channels as well (1.9e9 values, none different)."""
    from runtime_py.geometry import _interpolation, _resampled

    rng = np.random.default_rng(src[1] + channels)
    img = rng.integers(0, 256, (*src, channels) if channels > 1 else src, np.uint8)
    img[::2] = 255 * (img[::2] > 127)
    method = _interpolation(src, dst, cv2.INTER_CUBIC)
    want = cv2.resize(img.astype(np.float32), (dst[1], dst[0]), interpolation=method)
    got = _resampled(img, dst, method)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_resize_rounds_exact_halves_up():
    """A checkerboard of k and k + 1 halved by area averaging is exactly k + 0.5 everywhere: it must give k + 1."""
    board = (np.indices((32, 48)).sum(axis=0) % 2).astype(np.uint8)
    for k in (0, 100, 127, 254):
        img = np.repeat((board + k)[:, :, None], 3, axis=2)
        out = resize_image(img, (16, 24))
        assert (out == k + 1).all(), k
        np.testing.assert_array_equal(out, formula_resize_image(img, (16, 24)))


@pytest.mark.parametrize("src,dst", [p for p in SHAPE_PAIRS if p[0] != p[1]])
def test_resize_image_part_is_the_formula_inside_the_box(src, dst):
    rng = np.random.default_rng(dst[0])
    img = rng.integers(0, 256, (*src, 3), np.uint8)
    img[::3] = 255 * (img[::3] > 127)
    whole = formula_resize_image(img, dst)
    boxes = [Window(0, dst[1] - 1, dst[0], dst[1]), Window(dst[0] - 1, 0, dst[0], 1)]  # a last column, a corner pixel
    for _ in range(3):
        top, left = rng.integers(0, dst[0]), rng.integers(0, dst[1])
        boxes.append(Window(int(top), int(left), int(rng.integers(top + 1, dst[0] + 1)), int(rng.integers(left + 1, dst[1] + 1))))
    for box in boxes:
        np.testing.assert_array_equal(resize_image_part(img, dst, box), whole[box.slices])
    np.testing.assert_array_equal(resize_image_part(img, dst, None), whole)


@pytest.mark.parametrize("src,dst", [p for p in SHAPE_PAIRS if p[0] != p[1]])
def test_resize_into_a_resample_target_is_the_formula(src, dst):
    """A target made (and its pages written) ahead of the resize gives the same bytes; one is made
    exactly when the resize resamples into a whole float32 array in one call; a wrong one is refused."""
    from runtime_py.geometry import resample_target

    rng = np.random.default_rng(sum(dst))
    img = rng.integers(0, 256, (*src, 3), np.uint8)
    target = resample_target(src, dst)
    one_call = not (dst[0] <= src[0] and dst[1] <= src[1]) or (src[0] % dst[0] == 0 or src[1] % dst[1] == 0)
    assert (target is not None) == one_call
    if target is None:
        return
    assert target.shape == (*dst, 3) and target.dtype == np.float32
    box = Window(dst[0] // 4, dst[1] // 3, dst[0] // 2 + 1, dst[1] - 1)
    np.testing.assert_array_equal(resize_image_part(img, dst, box, target), formula_resize_image(img, dst)[box.slices])
    with pytest.raises(ValueError):
        resize_image_part(img, dst, box, np.zeros((dst[0] + 1, dst[1], 3), np.float32))


# axis lengths (source, destination): the 12 MP crop's, integer factors 2 and 3, one pixel less,
# primes, a large factor, scales just over an integer (the 1e-3 overlap rule's neighbourhood), the same length
AXES = [(2814, 512), (3738, 680), (1024, 512), (1360, 680), (1536, 512), (681, 680), (997, 512), (1021, 509),
        (4000, 7), (1001, 500), (2049, 1024), (89, 88), (88, 88)]


@pytest.mark.parametrize("src,dst", AXES)
def test_mask_downscale_taps_match_opencv_at_every_source_index(src, dst):
    """A band with one hole pixel per source row, in column (row mod n): each destination row then
    shows exactly which source rows OpenCV's INTER_AREA weighs into it (n is longer than any tap run),
    for every source row; the same along columns with the transpose. The other axis is kept."""
    n = min(src, max(97, 2 * -(-src // dst) + 3))
    rows = np.arange(src)
    band = np.zeros((src, n), bool)
    band[rows, rows % n] = True
    np.testing.assert_array_equal(resize_mask(band, (dst, n)), formula_resize_mask(band, (dst, n)))
    np.testing.assert_array_equal(resize_mask(band.T, (n, dst)), formula_resize_mask(band.T, (n, dst)))
    sparse = np.zeros((src, n), bool)  # every fifth row, in another column order
    sparse[rows[::5], (rows[::5] * 13) % n] = True
    np.testing.assert_array_equal(resize_mask(sparse, (dst, n)), formula_resize_mask(sparse, (dst, n)))


@pytest.mark.parametrize("src,dst", SHAPE_PAIRS)
def test_resize_mask_is_the_formula(src, dst):
    rng = np.random.default_rng(src[1])
    for density in (0.0005, 0.02, 0.5):
        big = rng.random((src[0] + 4, src[1] + 6)) < density
        m = big[1:1 + src[0], 2:2 + src[1]]  # a window of a larger mask
        np.testing.assert_array_equal(resize_mask(m, dst), formula_resize_mask(m, dst))
    blob = np.zeros(src, bool)
    blob[src[0] // 3: src[0] // 2 + 1, src[1] // 4: src[1] // 2 + 1] = True
    np.testing.assert_array_equal(resize_mask(blob, dst), formula_resize_mask(blob, dst))


@pytest.mark.parametrize("dtype,channels", [(np.uint8, 3), (np.uint16, 3), (np.uint8, 4), (np.uint8, 0), (np.uint16, 0)])
def test_copy_where_writes_only_the_masked_pixels_of_the_view(dtype, channels):
    rng = np.random.default_rng(channels)
    shape = (60, 70, channels) if channels else (60, 70)
    image = rng.integers(0, 1000, shape).astype(dtype)
    views = [lambda a: a[5:50, 7:61], lambda a: a[5:50, 7:61, :3] if a.ndim == 3 else a[5:50, 7:61:2]]
    for view in views:
        got, want = image.copy(), image.copy()
        src = rng.integers(0, 1000, view(got).shape).astype(dtype)
        where = rng.random(view(got).shape[:2]) < 0.4
        copy_where(view(got), src, where)
        np.copyto(view(want), src, where=where[:, :, None] if want.ndim == 3 else where)
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError):
        copy_where(image[:5, :5], np.zeros((5, 5) + shape[2:], np.float32), np.ones((5, 5), bool))


@pytest.mark.parametrize("channels,depth", [(3, 8), (3, 16), (4, 8), (1, 8), (1, 16)])
def test_compose_output_is_the_formula(channels, depth):
    """The output in the input's layout: the input, and in the hole the result converted (grey:
    round(0.299 R + 0.587 G + 0.114 B); 16-bit: v * 257)."""
    rng = np.random.default_rng(channels * depth)
    dtype = np.uint16 if depth == 16 else np.uint8
    shape = (90, 120, channels) if channels > 1 else (90, 120)
    pixels = rng.integers(0, 2 ** depth, shape).astype(dtype)
    result = rng.integers(0, 256, (90, 120, 3), np.uint8)
    hole = np.zeros((90, 120), bool)
    hole[20:70, 30:100] = rng.random((50, 70)) < 0.7
    want = pixels.copy()
    if channels == 1:
        r, g, b = (result[:, :, i].astype(np.float32) for i in range(3))
        new = np.floor(0.299 * r + 0.587 * g + 0.114 * b + 0.5).clip(0, 255).astype(np.uint8)
        want[hole] = new[hole].astype(dtype) * (257 if depth == 16 else 1)
    else:
        want[:, :, :3][hole] = result[:, :, ::-1][hole].astype(dtype) * (257 if depth == 16 else 1)
    np.testing.assert_array_equal(compose_output(SourceImage("x", pixels), result, hole), want)


# ------------------------------------------------------------------------------------- pipeline

def predict(image, mask):
    """Stand-in model, (1,H,W,3) in [-1, 1] up to overshoot: a fixed formula of the input, reaching below
    -1 and above 1 so the composite's clipping is exercised, unlike the input everywhere."""
    y = image[..., ::-1] * 1.3 + np.linspace(-0.4, 0.4, image.shape[2], dtype=np.float32)[None, None, :, None]
    return y.astype(np.float32)


def formula_pipeline(engines, image, hole, mode, crop):
    """The pipeline of docs/PIPELINE.md for baseline / two-step (whole pass 2), written out with the
    formula references above."""
    s1 = engines.base_shape
    rotated = needs_rotation(image.shape, s1)
    full, full_hole = (rotate_in(image), rotate_in(hole)) if rotated else (image, hole)
    window = context_window(full_hole, s1) if crop == "auto" else Window(0, 0, *full_hole.shape)
    work, work_hole = full[window.slices], full_hole[window.slices]

    def composite(img, m):
        pred = engines.get(img.shape[:2]).inpaint(img, m)
        return np.where(m[:, :, None], formula_round(pred), img)

    top = composite(formula_resize_image(work, s1), formula_resize_mask(work_hole, s1))
    if mode == "two-step" and not (work.shape[0] <= s1[0] and work.shape[1] <= s1[1]):
        s2 = (2 * s1[0], 2 * s1[1])
        img2, hole2 = formula_resize_image(work, s2), formula_resize_mask(work_hole, s2)
        stitched = np.where(hole2[:, :, None], formula_resize_image(top, s2), img2)
        ring = hole2 & ~erode(hole2, scaled_radius(16.0, s2[0], S2_REFERENCE_ROWS))
        top = composite(stitched, ring) if ring.any() else stitched
    pasted = full.copy()
    pasted[window.slices] = np.where(work_hole[:, :, None], formula_resize_image(top, work.shape[:2]), work)
    return np.where(hole[:, :, None], rotate_out(pasted) if rotated else pasted, image)


@pytest.mark.parametrize("shape,crop", [((600, 840), "auto"), ((840, 600), "auto"), ((301, 419), "off"), ((97, 61), "auto")])
@pytest.mark.parametrize("mode", ["baseline", "two-step"])
def test_pipeline_output_is_the_documented_formulas(shape, crop, mode):
    """The whole pipeline (crop, resizes, composites, pass 2, back to full resolution, rotation) against
    the formulas: the same bytes."""
    from runtime_py.masks import make_mask

    rng = np.random.default_rng(shape[0] + shape[1])
    image = rng.integers(0, 256, (*shape, 3), np.uint8)
    image[::4] = 255 * (image[::4] > 100)
    hole = make_mask("blob", *shape, seed=5, size="medium").astype(bool)
    engines, calls = recording_set(predict=predict)
    got = Pipeline(engines, PipelineConfig(mode=mode, crop=crop, tiles="off")).run(image, hole).image
    assert calls, "no model ran"
    np.testing.assert_array_equal(got, formula_pipeline(engines, image, hole, mode, crop))
    assert not np.array_equal(got[hole], image[hole])
