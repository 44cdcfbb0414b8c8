"""Resizes, morphology, orientation and the context-crop window: the pipeline's exact pixel rules.

Every rule here is specified in docs/PIPELINE.md; change both together.

Arrays: images are (H,W,3) uint8 RGB, masks (H,W) bool (True = hole), shapes are
(rows, cols) tuples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np

Shape = Tuple[int, int]


def _interpolation(src_shape: Shape, dst_shape: Shape, upscale_method: int) -> int:
    """INTER_AREA when neither side grows, else ``upscale_method``."""
    if dst_shape[0] <= src_shape[0] and dst_shape[1] <= src_shape[1]:
        return cv2.INTER_AREA
    return upscale_method


def round_to_u8(x: np.ndarray) -> np.ndarray:
    """float -> uint8 by floor(x + 0.5) after clipping to [0, 255] (round half up).

    Computed, in ``x``'s own float type, as the truncation of clip(x + 0.5, 0.5, 255.5): the same bytes
    as the formula. On [0, 255] the sum is the formula's; below 0 (above 255) the sum rounds to at most
    0.5 (at least 255.5), which the clip makes exactly the formula's 0.5 (255.5); and on numbers >= 0
    truncation, what the cast to uint8 does, is floor. So one pass fewer than clip, add, floor, cast.
    Any array shape; strided views are read in place (``x`` is never modified)."""
    x = np.asarray(x)
    if x.dtype.kind != "f":  # integers went through float64 in the formula's clip too
        x = x.astype(np.float64)
    if x.ndim == 0 or x.size == 0:
        y = np.clip(x + x.dtype.type(0.5), 0.5, 255.5)
        return y.astype(np.uint8)
    out = np.empty(x.shape, np.uint8)
    # Row blocks of about 1 MiB: the add, the clip and the cast each reread the block from cache,
    # where three passes over a whole box (23 MB at 12 MP) would each go to memory.
    step = max(1, _ROUND_BLOCK_BYTES // max(1, x[0].nbytes))
    buf = np.empty((min(step, x.shape[0]),) + x.shape[1:], x.dtype)
    for r0 in range(0, x.shape[0], step):
        n = min(step, x.shape[0] - r0)
        b = buf[:n]
        np.add(x[r0:r0 + n], x.dtype.type(0.5), out=b)
        np.clip(b, 0.5, 255.5, out=b)
        out[r0:r0 + n] = b  # the same float -> uint8 cast as astype: truncation
    return out


_ROUND_BLOCK_BYTES = 1 << 20


def resize_image(img: np.ndarray, shape: Shape) -> np.ndarray:
    """Resize an (h,w,3) uint8 RGB image to ``shape`` = (rows, cols).

    Computed in float32 with OpenCV: pixel-area averaging (INTER_AREA) when no side
    grows, else bicubic (INTER_CUBIC: Keys a = -0.75, half-pixel centres, edge pixels
    replicated); then rounded half up and clipped to uint8. Same shape: a copy.
    """
    rows, cols = int(shape[0]), int(shape[1])
    if img.shape[:2] == (rows, cols):
        return img.copy()
    return resize_image_part(img, (rows, cols), None)


def resize_image_part(img: np.ndarray, shape: Shape, part: Optional["Window"],
                      target: Optional[np.ndarray] = None) -> np.ndarray:
    """``resize_image(img, shape)[part.slices]``, rounded only inside ``part`` (None: everywhere).

    ``target``: what :func:`resample_target` gave for this resize, resampled into (its contents are
    overwritten), so that its memory can be faulted in at a time of the caller's choosing.

    The resampling itself covers the whole target (cut out of a resize of a crop, edge pixels
    would be replicated at the crop's border instead of the image's); the rounding touches only
    the pixels asked for. An area downscale runs OpenCV's two passes one by one
    (:func:`_area_in_passes`), without a float32 copy of the whole image."""
    rows, cols = int(shape[0]), int(shape[1])
    if img.shape[:2] == (rows, cols):
        return (img if part is None else img[part.slices]).copy()
    out = _resampled(img, (rows, cols), _interpolation(img.shape[:2], (rows, cols), cv2.INTER_CUBIC), target)
    return round_to_u8(out if part is None else out[part.slices])


def resample_target(src_shape: Shape, dst_shape: Shape, channels: int = 3) -> Optional[np.ndarray]:
    """The (rows, cols, channels) float32 array an image resize from ``src_shape`` to ``dst_shape``
    resamples into in one OpenCV call, every page already written (so faulted in); None when the
    resize makes no such array (the same shape, or an area downscale run in passes)."""
    rows, cols = int(dst_shape[0]), int(dst_shape[1])
    if tuple(src_shape[:2]) == (rows, cols) or _in_passes(src_shape, (rows, cols)):
        return None
    target = np.empty((rows, cols, channels), np.float32)
    target.fill(0.0)
    return target


def _in_passes(src_shape: Shape, shape: Shape) -> bool:
    return (_interpolation(src_shape[:2], shape, cv2.INTER_CUBIC) == cv2.INTER_AREA
            and not (_integer_scale(src_shape[0], shape[0]) or _integer_scale(src_shape[1], shape[1])))


def _resampled(img: np.ndarray, shape: Shape, method: int, target: Optional[np.ndarray] = None) -> np.ndarray:
    """``cv2.resize(img.astype(np.float32), (cols, rows), interpolation=method)``, every bit of it."""
    rows, cols = shape
    if _in_passes(img.shape, shape):
        return _area_in_passes(img, shape)
    if target is None:
        return cv2.resize(img.astype(np.float32), (cols, rows), interpolation=method)
    if target.shape != (rows, cols) + img.shape[2:] or target.dtype != np.float32:
        raise ValueError(f"resample target {target.shape} {target.dtype} for a resize to {(rows, cols) + img.shape[2:]}")
    out = cv2.resize(img.astype(np.float32), (cols, rows), dst=target, interpolation=method)
    return out


# Why running OpenCV's two INTER_AREA passes one by one changes no byte (float32 images; the generic
# area path, imgproc/src/resize.cpp resizeArea_; tests/test_runtime_geometry.py compares both ways):
# - for each destination row it sums, over its source rows, weight * (the source row resampled across
#   into float32); a resize that keeps the height computes those rows across, each row on its own;
# - along an axis it keeps, the pass multiplies by 1.0 (one source pixel of width 1): it copies;
# - so rows resampled across in bands, then a resize that keeps the width, add the same floats in
#   the same order.
# It takes a different path (block sums, ``resizeAreaFast``) when both of a call's scales are
# integers, so the passes run one by one only when neither scale is. (INTER_CUBIC's passes do not
# split like this: a check found last-bit differences at 68,010 of the 31.6 M values of a
# 512x680 -> 2814x3738 upscale.)

_AREA_BAND_BYTES = 1 << 21


def _integer_scale(src: int, dst: int) -> bool:
    """OpenCV's test for its integer-factor INTER_AREA path, per axis: |scale - round(scale)| < DBL_EPSILON."""
    scale = 1.0 / (dst / src)
    return abs(scale - round(scale)) < np.finfo(np.float64).eps


def _area_in_passes(img: np.ndarray, shape: Shape) -> np.ndarray:
    """``cv2.resize(img.astype(float32), INTER_AREA)`` to ``shape`` (no side larger, neither scale an
    integer), without the float32 copy of the whole image: bands of about 2 MiB of rows are converted
    and resampled across one after another, then the (h, cols) result down."""
    rows, cols = shape
    h, w = img.shape[:2]
    across = np.empty((h, cols) + img.shape[2:], np.float32)
    step = max(1, _AREA_BAND_BYTES // max(1, img[0].size * 4))
    buf = np.empty((min(step, h),) + img.shape[1:], np.float32)
    for r0 in range(0, h, step):
        n = min(step, h - r0)
        band = buf[:n]
        band[...] = img[r0:r0 + n]  # the same float32 values as astype
        out = cv2.resize(band, (cols, n), dst=across[r0:r0 + n], interpolation=cv2.INTER_AREA)
        if out.ctypes.data != across[r0:r0 + n].ctypes.data:  # OpenCV wrote elsewhere after all
            across[r0:r0 + n] = out
    return cv2.resize(across, (cols, rows), interpolation=cv2.INTER_AREA)


def resize_mask(mask: np.ndarray, shape: Shape) -> np.ndarray:
    """Resize an (h,w) bool hole mask to ``shape``: conservative, so no hole pixel is lost.

    The mask as float32 {0,1} is resized with INTER_AREA (no side grows) or bilinear
    INTER_LINEAR (a side grows); every pixel with coverage > 0 is a hole. A model pixel
    that overlaps any hole pixel must be predicted, otherwise the object being removed
    would bleed back in when the prediction is upscaled.

    No side growing, that set is computed without the float copy and the resampling
    (:func:`_area_any`, the same bools); a side growing, with them.
    """
    rows, cols = int(shape[0]), int(shape[1])
    if mask.shape[:2] == (rows, cols):
        return mask.copy()
    method = _interpolation(mask.shape[:2], (rows, cols), cv2.INTER_LINEAR)
    if method == cv2.INTER_AREA:
        return _area_any(mask.astype(bool, copy=False), (rows, cols))
    cover = cv2.resize(mask.astype(np.float32), (cols, rows), interpolation=method)
    return cover > 0.0


def _area_taps(src: int, dst: int) -> Tuple[np.ndarray, np.ndarray]:
    """First and last source index (inclusive) that OpenCV's INTER_AREA weighs into each of ``dst``
    destination indices along an axis of ``src`` >= ``dst`` pixels: both (dst,) int64.

    OpenCV's ``computeResizeAreaTab`` (imgproc/src/resize.cpp), in the same double arithmetic: with
    scale = 1 / (dst / src), destination pixel d covers [d * scale, d * scale + scale); the whole source
    pixels inside it get weight 1 / width, the partial ones at either end their overlap / width, but
    only an overlap over 1e-3 counts, and the last source pixel closes the axis. Its integer-scale
    path (``resizeAreaFast``: whole blocks of scale pixels) has the same taps."""
    scale = 1.0 / (dst / src)
    f1 = np.arange(dst, dtype=np.float64) * scale
    f2 = f1 + scale
    s2 = np.minimum(np.floor(f2).astype(np.int64), src - 1)
    s1 = np.minimum(np.ceil(f1).astype(np.int64), s2)
    first = np.where(s1 - f1 > 1e-3, s1 - 1, s1)
    last = np.where(f2 - s2 > 1e-3, s2, s2 - 1)
    return first, last


def _area_any(mask: np.ndarray, shape: Shape) -> np.ndarray:
    """``cv2.resize(mask as float32, INTER_AREA) > 0`` for an (h,w) bool mask and a ``shape`` with no
    side larger, bit for bit, without the float copy (a 12 MP crop: 8 instead of 40 ms).

    Why it is the same set: INTER_AREA's output pixel is sum_y beta_y * sum_x alpha_x * m[y, x] over
    its taps (:func:`_area_taps` per axis), every weight positive (an overlap over 1e-3 over a width of
    at most the scale, so no product underflows a float) and every term >= 0, so in floating point too
    the sum is > 0 exactly when some tap is a hole: an OR over a row interval and a column interval.
    ``tests/test_runtime_geometry.py`` checks it against OpenCV at every source index of several axes."""
    rows, cols = shape
    r_first, r_last = _area_taps(mask.shape[0], rows)
    c_first, c_last = _area_taps(mask.shape[1], cols)
    # OR over each interval as the OR of its k-th rows, k = 0 .. longest - 1 (a shorter interval
    # repeats its last row): whole-row gathers, a few passes over a 512-row array.
    out = mask[r_first]
    for k in range(1, int((r_last - r_first).max()) + 1):
        out |= mask[np.minimum(r_first + k, r_last)]
    out_t = np.ascontiguousarray(out.T)
    res = out_t[c_first]
    for k in range(1, int((c_last - c_first).max()) + 1):
        res |= out_t[np.minimum(c_first + k, c_last)]
    return np.ascontiguousarray(res.T)


def copy_where(dst: np.ndarray, src: np.ndarray, where: np.ndarray) -> None:
    """``dst[where] = src[where]`` in place: ``dst`` and ``src`` (h,w) or (h,w,c) of one dtype, ``dst``
    possibly a view into a larger image; ``where`` (h,w) bool, applying to every channel.

    Through OpenCV's masked copy when ``dst``'s pixels lie as a Mat's do (rows may be strided, each
    row's pixels and channels packed), else numpy's ``copyto``: the same bytes, the first 3-4x faster
    (8 instead of 33 ms for the hole box of a 12 MP photo)."""
    if src.shape != dst.shape or src.dtype != dst.dtype or where.shape != dst.shape[:2]:
        raise ValueError(f"copy_where: {src.shape} {src.dtype} into {dst.shape} {dst.dtype} under a {where.shape} mask")
    packed = dst.strides[1] == dst.itemsize * (dst.shape[2] if dst.ndim == 3 else 1) and dst.strides[-1] == dst.itemsize
    if packed and dst.flags.writeable:
        cv2.copyTo(src, where.view(np.uint8), dst)  # writes into dst's own memory (a layout it cannot use raises)
    else:
        np.copyto(dst, src, where=where[:, :, None] if dst.ndim == 3 else where)


def ellipse_kernel(radius: int) -> np.ndarray:
    """OpenCV MORPH_ELLIPSE structuring element of size (2r+1) x (2r+1)."""
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Erode a bool mask with the (2r+1)^2 ellipse; outside the image counts as hole
    (OpenCV's default erosion border), so holes touching the edge shrink only inwards."""
    if radius <= 0:
        return mask.copy()
    return cv2.erode(mask.astype(np.uint8), ellipse_kernel(radius)).astype(bool)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a bool mask with the (2r+1)^2 ellipse; outside the image counts as not-hole."""
    if radius <= 0:
        return mask.copy()
    return cv2.dilate(mask.astype(np.uint8), ellipse_kernel(radius)).astype(bool)


def scaled_radius(px_at_reference: float, rows: int, reference_rows: int) -> int:
    """A radius given in pixels at ``reference_rows`` rescaled to a pass with ``rows`` rows:
    floor(px * rows / reference_rows + 0.5), at least 1."""
    return max(1, int(math.floor(px_at_reference * rows / reference_rows + 0.5)))


# ------------------------------------------------------------------------- orientation

def needs_rotation(image_shape: Shape, model_shape: Shape) -> bool:
    """True when the image and the model disagree on portrait/landscape (square never rotates)."""
    h, w = image_shape[:2]
    rows, cols = model_shape
    if h == w or rows == cols:
        return False
    return (h > w) != (rows > cols)


def rotate_in(a: np.ndarray) -> np.ndarray:
    """Portrait -> landscape: 90 degrees clockwise."""
    return np.ascontiguousarray(np.rot90(a, -1))


def rotate_out(a: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rotate_in`: 90 degrees counter-clockwise."""
    return np.ascontiguousarray(np.rot90(a, 1))


def rotated_back(w: "Window", rows: int) -> "Window":
    """Where the window ``w`` of a :func:`rotate_in` image lies in the original of ``rows`` rows:
    rotated (r, c) is original (rows - 1 - c, r)."""
    return Window(rows - w.right, w.top, rows - w.left, w.bottom)


# -------------------------------------------------------------------------- crop window

@dataclass(frozen=True)
class Window:
    """Rows [top, bottom) x cols [left, right) of the image."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def shape(self) -> Shape:
        return (self.bottom - self.top, self.right - self.left)

    @property
    def slices(self):
        return (slice(self.top, self.bottom), slice(self.left, self.right))

    def as_list(self):
        return [self.top, self.left, self.bottom, self.right]


def mask_bbox(mask: np.ndarray) -> Optional[Window]:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return Window(int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


def context_window(mask: np.ndarray, model_shape: Shape, margin_frac: float = 0.5, min_margin: int = 32) -> Window:
    """The crop around the mask's bounding box that the model sees (docs/PIPELINE.md, "Context crop").

    1. bbox of the hole pixels, bh x bw; margin m = max(min_margin, ceil(margin_frac * max(bh, bw))).
    2. (bh + 2m) x (bw + 2m) grown along one side to the model aspect rows:cols
       (ceil), then grown to at least the model shape (never upscale a crop).
    3. A side longer than the image becomes the image side, and the other side is re-fitted
       to the aspect (ceil), kept >= bbox + 2m and <= the image side.
    4. Centred on the bbox centre
       (start = (b0 + b1 - size) // 2), then shifted to lie inside the image.
    """
    H, W = mask.shape[:2]
    rows, cols = model_shape
    box = mask_bbox(mask)
    if box is None:
        return Window(0, 0, H, W)
    bh, bw = box.shape
    m = max(int(min_margin), int(math.ceil(margin_frac * max(bh, bw))))
    h, w = bh + 2 * m, bw + 2 * m
    if h * cols < w * rows:  # too wide for the model aspect: grow the height
        h = int(math.ceil(w * rows / cols))
    else:
        w = int(math.ceil(h * cols / rows))
    if h < rows:
        h, w = rows, cols
    # A side longer than the image is cut to the image; the other side is then re-fitted to
    # the aspect, but never below the bbox plus margins nor above the image.
    if h > H:
        h, w = H, max(bw + 2 * m, int(math.ceil(H * cols / rows)))
    if w > W:
        w, h = W, max(bh + 2 * m, int(math.ceil(W * rows / cols)))
    h, w = min(h, H), min(w, W)

    def place(b0: int, b1: int, size: int, limit: int) -> int:
        start = (b0 + b1 - size) // 2
        return min(max(start, 0), limit - size)

    top = place(box.top, box.bottom, h, H)
    left = place(box.left, box.right, w, W)
    return Window(top, left, top + h, left + w)
