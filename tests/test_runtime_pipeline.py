"""Pipeline semantics (docs/PIPELINE.md) on synthetic photos.

Most tests use a recording numpy engine (fast, and it lets the test see every model
input); the end-to-end ones use the tiny torch model from helpers.
"""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from helpers import FILL, MODEL_SHAPE, blob_hole, make_checkpoint, photo, recording_set, torch_engines
from runtime_py.errors import UserError
from runtime_py.geometry import context_window, resize_image, resize_mask
from runtime_py.pipeline import MODES, Pipeline, PipelineConfig, ring_mask, shrink_masks
from runtime_py.trace import Trace


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def interior(hole, px=16):
    """Hole pixels at least ``px`` away from known ones: there the bicubic upscale of a constant
    prediction sees only predicted model pixels (at the boundary it also sees known ones, by design)."""
    k = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * px + 1, 2 * px + 1))
    return cv2.erode(hole.astype(np.uint8), k, borderValue=0).astype(bool)


def run(engines, image, hole, **cfg):
    cfg.setdefault("crop", "off")
    return Pipeline(engines, PipelineConfig(**cfg)).run(image, hole)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tiles", ["auto", "on"])
def test_unmasked_pixels_bit_exact_and_size_kept(ckpt, mode, tiles):
    img, hole = photo(), blob_hole()
    res = run(torch_engines(ckpt), img, hole, mode=mode, tiles=tiles)
    assert res.image.shape == img.shape and res.image.dtype == np.uint8
    assert np.array_equal(res.image[~hole], img[~hole])
    assert not np.array_equal(res.image[hole], img[hole])  # the model really filled something


def test_baseline_resizes_and_composites():
    img, hole = photo(), blob_hole()
    es, calls = recording_set()
    res = run(es, img, hole, mode="baseline")
    assert len(calls) == 1 and len(res.stats.runs) == 1
    shape, seen_img, seen_hole = calls[0]
    assert shape == MODEL_SHAPE
    assert np.array_equal(seen_img, resize_image(img, MODEL_SHAPE))
    assert np.array_equal(seen_hole, resize_mask(hole, MODEL_SHAPE))
    # a constant prediction upscales to the same constant inside the hole
    assert interior(hole).sum() > 1000 and (res.image[interior(hole)] == 153).all()


def test_mask_downscale_is_conservative():
    hole = np.zeros((300, 420), bool)
    hole[151, 211] = True  # one pixel
    small = resize_mask(hole, MODEL_SHAPE)
    assert small.sum() >= 1
    assert resize_mask(np.zeros((300, 420), bool), MODEL_SHAPE).sum() == 0


def test_shrink_runs_once_per_nonempty_erosion():
    img = photo()
    hole = np.zeros((300, 420), bool)
    hole[60:250, 80:360] = True  # big: several erosion steps at 64x88
    es, calls = recording_set()
    res = run(es, img, hole, mode="shrink", shrink_max_steps=10)
    m0 = resize_mask(hole, MODEL_SHAPE)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))  # radius round(8 * 64 / 512) = 1
    expected = []
    m = m0.astype(np.uint8)
    while m.any() and len(expected) < 10:
        expected.append(m.astype(bool))
        m = cv2.erode(m, k)
    assert len(expected) > 2
    assert len(calls) == len(res.stats.runs) == len(expected)
    for (_, seen_img, seen_hole), want in zip(calls, expected):
        assert np.array_equal(seen_hole, want)
    # each run's context is the previous composite: the ring fixed by run 1 is 153 in run 2's input
    ring = expected[0] & ~expected[1]
    assert (calls[1][1][ring] == 153).all()


def test_shrink_is_capped():
    es, calls = recording_set()
    hole = np.zeros((300, 420), bool)
    hole[60:250, 80:360] = True
    run(es, photo(), hole, mode="shrink", shrink_max_steps=3)
    assert len(calls) == 3
    assert len(shrink_masks(resize_mask(hole, MODEL_SHAPE), 1, 3)) == 3


def test_two_step_mask_is_mask_minus_its_erosion():
    img, hole = photo(), blob_hole()
    es, calls = recording_set()
    res = run(es, img, hole, mode="two-step")
    assert [c[0] for c in calls] == [MODEL_SHAPE, (128, 176)]
    s2_hole = resize_mask(hole, (128, 176))
    radius = 2  # round(16 * 128 / 1024)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    want = s2_hole & ~cv2.erode(s2_hole.astype(np.uint8), k).astype(bool)
    assert np.array_equal(calls[1][2], want)
    assert np.array_equal(ring_mask(s2_hole, radius), want)
    # the small 8x8 square vanishes under the erosion, so it stays whole in the ring
    small = np.zeros_like(hole)
    small[40:48, 40:48] = True
    small2 = resize_mask(small, (128, 176))
    assert np.array_equal(want & small2, small2)
    # the big hole's interior is not in the ring
    assert not want[int(150 * 128 / 300), int(245 * 176 / 420)]
    assert res.stats.tiles_run == 0


def test_tiles_without_mask_are_skipped():
    img = photo()
    hole = np.zeros((300, 420), bool)
    hole[10:80, 10:120] = True  # inside the core of the top-left tile only
    es, calls = recording_set()
    res = run(es, img, hole, mode="two-step", tiles="on")
    tiled = res.stats.passes[1]
    assert tiled["tiled"] and tiled["tiles"] == 9  # 128x176 pass in 64x88 tiles with >= 8 px overlap: 3x3
    assert res.stats.tiles_run == 1 and res.stats.tiles_skipped == 8
    assert [c[0] for c in calls] == [MODEL_SHAPE, MODEL_SHAPE]
    assert np.array_equal(res.image[~hole], img[~hole])
    assert (res.image[interior(hole, 12)] == 153).all()


def feather_weights(starts, tile):
    """Per-tile weights along one axis, from the rule in docs/PIPELINE.md ("Tiling"), not from runtime_py.tiling:
    on each side that overlaps a neighbour, w(d) = (d + 0.5) / overlap for d < overlap, else 1."""
    d = np.arange(tile, dtype=np.float64)
    weights = []
    for i, s in enumerate(starts):
        w = np.ones(tile)
        if i > 0:
            w = np.minimum(w, (d + 0.5) / (starts[i - 1] + tile - s))
        if i < len(starts) - 1:
            w = np.minimum(w, (tile - d - 0.5) / (s + tile - starts[i + 1]))
        weights.append(w)
    return weights


def test_tiled_blend_feathers_every_overlap_as_documented(tmp_path):
    """Each tile predicts its own constant, so every overlap pixel shows the blend weights: the blended
    pass must be round(sum(w_t * c_t) / sum(w_t)) with the documented linear ramps. (A constant
    prediction would hide the weights: any weights blend one constant to itself.)"""
    img = photo()
    hole = np.zeros((300, 420), bool)
    hole[50:260, 60:380] = True  # spans every tile
    tile_fills = [-0.9 + 0.2 * k for k in range(9)]  # 9 distinct constants, row-major tile order
    fills = iter([FILL] + tile_fills)  # pass 1 first, then the tiles
    es, calls = recording_set(predict=lambda image, mask: np.full(image.shape, next(fills)))
    res = Pipeline(es, PipelineConfig(mode="two-step", tiles="on", crop="off", ring_radius=1000),  # ring = hole
                   trace=Trace(str(tmp_path))).run(img, hole)
    info = res.stats.passes[1]
    assert info["tiled"] and info["runs"] == info["tiles"] == 9 and res.stats.tiles_skipped == 0
    stages = {s["name"]: s for s in json.loads((tmp_path / "index.json").read_text())["stages"]}
    blended = np.load(tmp_path / stages["pass2_tiles_blended"]["npy"])
    ring = np.load(tmp_path / stages["pass2_ring"]["npy"])

    (t_r, t_c), grid = info["tile_shape"], info["tile_grid"]
    row_starts, col_starts = sorted({t["top"] for t in grid}), sorted({t["left"] for t in grid})
    w_rows, w_cols = feather_weights(row_starts, t_r), feather_weights(col_starts, t_c)
    acc, wsum, cover = np.zeros(ring.shape), np.zeros(ring.shape), np.zeros(ring.shape, int)
    for t, fill in zip(grid, tile_fills):
        i, j = row_starts.index(t["top"]), col_starts.index(t["left"])
        sl = (slice(t["top"], t["top"] + t_r), slice(t["left"], t["left"] + t_c))
        acc[sl] += np.outer(w_rows[i], w_cols[j]) * np.floor((fill + 1) * 127.5 + 0.5)
        wsum[sl] += np.outer(w_rows[i], w_cols[j])
        cover[sl] += 1
    want = np.floor(acc / wsum + 0.5)
    got = blended[..., 0].astype(np.float64)
    assert (ring & (cover >= 2)).sum() > 1000  # many pixels where two or four tiles mix
    # float32 accumulation in the runtime vs float64 here: a tie may round the other way, never more
    assert np.abs(got[ring] - want[ring]).max() <= 1
    assert (got[ring] != want[ring]).mean() < 0.001
    assert (blended[ring] == blended[ring][:, :1]).all()  # grey: every channel the same


def test_tiles_auto_uses_whole_pass_when_available_and_off_refuses_without():
    img, hole = photo(), blob_hole()
    es, calls = recording_set(shapes=[MODEL_SHAPE])  # like an export with only the small shape
    res = run(es, img, hole, mode="two-step", tiles="auto")
    assert res.stats.passes[1]["tiled"] and all(c[0] == MODEL_SHAPE for c in calls)
    es, _ = recording_set(shapes=[MODEL_SHAPE])
    with pytest.raises(UserError, match="no recording model at 128x176"):
        run(es, img, hole, mode="two-step", tiles="off")


def test_portrait_round_trip():
    img, hole = photo(), blob_hole()
    portrait, phole = np.ascontiguousarray(np.rot90(img)), np.ascontiguousarray(np.rot90(hole))
    es, calls = recording_set()
    res = run(es, portrait, phole, mode="baseline")
    assert res.stats.rotated and calls[0][1].shape == (*MODEL_SHAPE, 3)
    assert res.image.shape == portrait.shape
    assert np.array_equal(res.image[~phole], portrait[~phole])
    # the same as rotating to landscape by hand (clockwise), running, and rotating back
    land, lhole = cv2.rotate(portrait, cv2.ROTATE_90_CLOCKWISE), cv2.rotate(phole.astype(np.uint8), cv2.ROTATE_90_CLOCKWISE)
    es2, calls2 = recording_set()
    res2 = run(es2, land, lhole.astype(bool), mode="baseline")
    assert not res2.stats.rotated
    assert np.array_equal(calls[0][1], calls2[0][1])
    assert np.array_equal(cv2.rotate(res2.image, cv2.ROTATE_90_COUNTERCLOCKWISE), res.image)


def test_portrait_round_trip_torch(ckpt):
    img, hole = photo(), blob_hole()
    portrait, phole = np.ascontiguousarray(np.rot90(img, -1)), np.ascontiguousarray(np.rot90(hole, -1))
    res = run(torch_engines(ckpt), portrait, phole, mode="two-step")
    assert res.image.shape == portrait.shape and res.stats.rotated
    assert np.array_equal(res.image[~phole], portrait[~phole])


def test_empty_mask_returns_input_without_model():
    es, calls = recording_set()
    img = photo()
    res = run(es, img, np.zeros(img.shape[:2], bool), mode="two-step+shrink")
    assert calls == [] and np.array_equal(res.image, img) and "empty" in res.stats.warnings[0]


def test_full_mask_runs_with_warning():
    es, calls = recording_set()
    img = photo()
    res = run(es, img, np.ones(img.shape[:2], bool), mode="shrink")
    assert len(calls) == 1  # erosion with the border counted as hole never shrinks a full mask
    assert any("whole image" in w for w in res.stats.warnings)
    assert (res.image == 153).all()


def test_full_mask_in_two_step_has_an_empty_ring_so_pass_2_runs_nothing():
    """Erosion counts the border as hole, so a full mask survives it and the ring is empty:
    pass 2 only stitches the upscaled pass 1, with no model run."""
    es, calls = recording_set()
    img = photo()
    res = run(es, img, np.ones(img.shape[:2], bool), mode="two-step")
    assert [c[0] for c in calls] == [MODEL_SHAPE]
    assert res.stats.passes[1]["pass"] == 2 and res.stats.passes[1]["runs"] == 0 and "tiled" not in res.stats.passes[1]
    assert (res.image == 153).all()


def test_two_step_skips_pass_2_when_the_crop_fits_the_model_shape():
    """A small hole with --crop auto: the context window is exactly the model shape, so pass 1 already
    runs at full resolution (no resize) and pass 2 is skipped."""
    img = photo(600, 900)
    hole = np.zeros((600, 900), bool)
    hole[300:310, 500:512] = True  # bbox 10x12 plus 8 px margins is smaller than 64x88: the window grows to it
    es, calls = recording_set()
    res = run(es, img, hole, mode="two-step", crop="auto", crop_min_margin=8)
    top, left, bottom, right = res.stats.window
    assert (bottom - top, right - left) == MODEL_SHAPE
    assert [c[0] for c in calls] == [MODEL_SHAPE]
    assert res.stats.passes[1] == {"pass": 2, "skipped": "pass 1 already ran at full resolution"}
    assert np.array_equal(calls[0][1], img[top:bottom, left:right])  # the crop itself, not resized
    assert np.array_equal(calls[0][2], hole[top:bottom, left:right])
    assert np.array_equal(res.image[~hole], img[~hole]) and (res.image[hole] == 153).all()
    # wider margins make the window larger than the model shape (106x146), and pass 2 runs at twice the model shape
    es, calls = recording_set()
    run(es, img, hole, mode="two-step", crop="auto", crop_min_margin=8, crop_margin_frac=4.0)
    assert [c[0] for c in calls] == [MODEL_SHAPE, (128, 176)]


def test_size_mismatch_is_one_clear_error():
    es, _ = recording_set()
    with pytest.raises(UserError, match="must be the same size"):
        run(es, photo(), np.ones((10, 10), bool))


def test_context_crop_window():
    img = photo(600, 900)
    hole = np.zeros((600, 900), bool)
    hole[300:320, 500:530] = True
    w = context_window(hole, MODEL_SHAPE, 0.5, 32)
    rows, cols = w.shape
    assert w.top <= 300 and w.bottom >= 320 and w.left <= 500 and w.right >= 530
    assert abs(rows / cols - 64 / 88) < 0.02 and rows >= 64
    es, calls = recording_set()
    res = run(es, img, hole, mode="baseline", crop="auto")
    assert res.stats.window == w.as_list()
    assert np.array_equal(calls[0][1], resize_image(img[w.slices], MODEL_SHAPE))
    assert np.array_equal(res.image[~hole], img[~hole]) and (res.image[interior(hole, 4)] == 153).all()
    es, calls = recording_set()
    assert run(es, img, hole, mode="baseline", crop="off").stats.window is None


def test_context_window_of_a_wide_hole_grows_its_height_to_the_model_aspect():
    """Every other test hole is taller than 64:88; this one (10x200) is far wider, so the window keeps
    bbox + margins across and grows its rows to the aspect: ceil(400 * 64 / 88) = 291."""
    img = photo(600, 900)
    hole = np.zeros((600, 900), bool)
    hole[300:310, 300:500] = True
    w = context_window(hole, MODEL_SHAPE, 0.5, 32)  # margin m = ceil(0.5 * 200) = 100
    assert w.as_list() == [159, 200, 450, 600]  # 291x400, centred on the bbox: (300 + 310 - 291) // 2 = 159
    es, calls = recording_set()
    res = run(es, img, hole, mode="baseline", crop="auto")
    assert res.stats.window == w.as_list()
    assert np.array_equal(calls[0][1], resize_image(img[w.slices], MODEL_SHAPE))
    assert np.array_equal(res.image[~hole], img[~hole])


def test_crop_grows_to_model_shape_and_stays_inside():
    hole = np.zeros((300, 420), bool)
    hole[0:3, 415:420] = True  # tiny, in a corner
    w = context_window(hole, (128, 176), 0.5, 4)
    assert w.shape == (128, 176) and w.top == 0 and w.right == 420


def test_two_runs_identical(ckpt):
    img, hole = photo(), blob_hole()
    a = run(torch_engines(ckpt), img, hole, mode="two-step+shrink", tiles="on").image
    b = run(torch_engines(ckpt), img, hole, mode="two-step+shrink", tiles="on").image
    assert np.array_equal(a, b)


def test_trace_writes_every_stage(tmp_path):
    es, calls = recording_set()
    img, hole = photo(), blob_hole()
    Pipeline(es, PipelineConfig(mode="two-step", tiles="on", crop="off"), trace=Trace(str(tmp_path))).run(img, hole)
    index = json.loads((tmp_path / "index.json").read_text())
    names = [s["name"] for s in index["stages"]]
    assert names[0] == "input" and names[-1] == "output"
    for want in ("pass1_image", "pass1_mask", "pass1_prediction", "pass2_ring", "pass2_stitched", "pass2_tiles_blended"):
        assert any(n == want or n.startswith(want) for n in names), want
    for s in index["stages"]:
        assert (tmp_path / s["png"]).is_file()
        a = np.load(tmp_path / s["npy"])
        assert list(a.shape) == s["shape"]
    assert index["summary"]["model_runs"] == len(calls)
    assert np.array_equal(np.load(tmp_path / index["stages"][-1]["npy"])[~hole], img[~hole])


def test_crop_window_keeps_model_aspect_when_cut_by_the_image():
    hole = np.zeros((1600, 2560), bool)
    hole[0:672, 838:1842] = True  # touches the top edge; bbox + margins is taller than the image
    w = context_window(hole, (512, 680), 0.5, 32)
    assert w.shape == (1600, 2125)  # rows cut to the image, cols re-fitted: ceil(1600 * 680 / 512)
    assert w.left <= 838 - 502 and w.right >= 1842 + 502  # bbox + margins (m = ceil(0.5 * 1004)) inside


@pytest.mark.parametrize("shape,crop", [((300, 200), "auto"), ((300, 200), "off"), ((200, 300), "on"), ((97, 61), "auto")])
def test_back_to_full_resolution_is_the_documented_formula(monkeypatch, shape, crop):
    """The last stage works on the hole's bounding box only; its result is still, bit for bit,
    where(hole, rotate_out(paste(window, where(M, resize_image(C, window), I_window))), input)."""
    from runtime_py.geometry import Window, needs_rotation, rotate_in, rotate_out
    from runtime_py.masks import make_mask

    r = np.random.default_rng(shape[0])
    image = r.integers(0, 256, (*shape, 3), np.uint8)
    hole = make_mask("blob", *shape, seed=3, size="small").astype(bool)
    top = r.integers(0, 256, (*MODEL_SHAPE, 3), np.uint8)
    monkeypatch.setattr(Pipeline, "_pass1", lambda self, work, work_hole: top)
    engines, _ = recording_set()
    got = run(engines, image, hole, crop=crop).image

    rotated = needs_rotation(shape, MODEL_SHAPE)
    full, full_hole = (rotate_in(image), rotate_in(hole)) if rotated else (image, hole)
    window = context_window(full_hole, MODEL_SHAPE) if crop != "off" else Window(0, 0, *full_hole.shape)
    work, work_hole = full[window.slices], full_hole[window.slices]
    pasted = full.copy()
    pasted[window.slices] = np.where(work_hole[:, :, None], resize_image(top, work.shape[:2]), work)
    want = np.where(hole[:, :, None], rotate_out(pasted) if rotated else pasted, image)
    np.testing.assert_array_equal(got, want)
