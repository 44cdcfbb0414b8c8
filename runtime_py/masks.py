"""Deterministic hole masks for training, calibration, parity checks and benchmarks.

Every generator returns an (H, W) uint8 array with 1 = hole, 0 = known, and draws
only from the ``numpy.random.Generator`` it is given, so a recorded seed
reproduces the mask exactly. Three kinds:

* ``strokes``: free-form brush strokes (vertices, lengths, angles and widths drawn
  like the reference GMCNN stroke generator, scaled to the image size);
* ``rect``: one axis-aligned rectangle;
* ``blob``: an object-like filled blob (a smoothed random star polygon), the shape
  a user draws around a distracting object.

Size classes (fraction of the image area that is hole): small ~2-6 %,
medium ~6-15 %, large ~15-30 %.
"""
from __future__ import annotations

from typing import Optional, Tuple

import cv2
import numpy as np

KINDS = ("strokes", "rect", "blob")
SIZE_CLASSES = {"small": (0.02, 0.06), "medium": (0.06, 0.15), "large": (0.15, 0.30)}


def stroke_mask(rng: np.random.Generator, height: int, width: int, parts: int = 4,
                max_vertices: int = 16, max_length: Optional[int] = None,
                max_brush: Optional[int] = None) -> np.ndarray:
    """Free-form strokes; lengths and widths scale with the image (reference values at 256 px)."""
    scale = min(height, width) / 256.0
    max_length = max_length or max(8, int(60 * scale))
    max_brush = max_brush or max(6, int(24 * scale))
    min_brush = max(2, int(10 * scale))
    mask = np.zeros((height, width), np.uint8)
    for _ in range(parts):
        y, x = int(rng.integers(height)), int(rng.integers(width))
        brush = min_brush
        for i in range(int(rng.integers(4, max_vertices + 1))):
            angle = rng.uniform(0, 2 * np.pi)
            if i % 2 == 0:
                angle = 2 * np.pi - angle
            length = int(rng.integers(max_length // 4, max_length + 1))
            brush = int(rng.integers(min_brush, max(min_brush, max_brush) + 1))
            ny = int(np.clip(y + length * np.cos(angle), 0, height - 1))
            nx = int(np.clip(x + length * np.sin(angle), 0, width - 1))
            cv2.line(mask, (x, y), (nx, ny), 1, brush)
            cv2.circle(mask, (x, y), brush // 2, 1, -1)
            y, x = ny, nx
        cv2.circle(mask, (x, y), brush // 2, 1, -1)
    return mask


def rect_mask(rng: np.random.Generator, height: int, width: int,
              area_fraction: Tuple[float, float] = (0.05, 0.25)) -> np.ndarray:
    """One rectangle covering a fraction of the image drawn from ``area_fraction``, aspect 1:2..2:1."""
    frac = rng.uniform(*area_fraction)
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    h = int(np.clip(np.sqrt(frac * height * width / aspect), 4, height - 2))
    w = int(np.clip(frac * height * width / h, 4, width - 2))
    top = int(rng.integers(1, height - h))
    left = int(rng.integers(1, width - w))
    mask = np.zeros((height, width), np.uint8)
    mask[top:top + h, left:left + w] = 1
    return mask


def blob_mask(rng: np.random.Generator, height: int, width: int,
              area_fraction: Tuple[float, float] = (0.05, 0.25)) -> np.ndarray:
    """An object-like blob: a random star polygon, smoothed, scaled to the drawn area fraction."""
    frac = rng.uniform(*area_fraction)
    n = int(rng.integers(7, 14))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(0.6, 1.0, n)
    aspect = rng.uniform(0.6, 1.6)
    pts = np.stack([np.cos(angles) * radii * aspect, np.sin(angles) * radii], axis=1)
    canvas = 512
    poly = (pts / np.abs(pts).max() * canvas * 0.45 + canvas / 2).astype(np.int32)
    shape = np.zeros((canvas, canvas), np.uint8)
    cv2.fillPoly(shape, [poly], 1)
    shape = (cv2.GaussianBlur(shape.astype(np.float32), (0, 0), canvas / 40) > 0.5).astype(np.uint8)
    ys, xs = np.nonzero(shape)
    shape = shape[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    area = frac * height * width
    s = np.sqrt(area / max(shape.sum(), 1))
    h = int(np.clip(round(shape.shape[0] * s), 4, height - 2))
    w = int(np.clip(round(shape.shape[1] * s), 4, width - 2))
    shape = cv2.resize(shape, (w, h), interpolation=cv2.INTER_NEAREST)
    top = int(rng.integers(1, height - h))
    left = int(rng.integers(1, width - w))
    mask = np.zeros((height, width), np.uint8)
    mask[top:top + h, left:left + w] = shape
    return mask


def make_mask(kind: str, height: int, width: int, seed: int, size: str = "medium") -> np.ndarray:
    """A mask of ``kind`` and size class ``size`` for ``seed``; (H, W) uint8, 1 = hole, never empty.

    For ``strokes`` the size class is reached by adding strokes until the hole
    fraction enters the class range (or 32 strokes were drawn).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {KINDS}")
    if size not in SIZE_CLASSES:
        raise ValueError(f"unknown size class {size!r}; expected one of {tuple(SIZE_CLASSES)}")
    lo, hi = SIZE_CLASSES[size]
    rng = np.random.default_rng(seed)
    if kind == "rect":
        return rect_mask(rng, height, width, (lo, hi))
    if kind == "blob":
        return blob_mask(rng, height, width, (lo, hi))
    mask = np.zeros((height, width), np.uint8)
    for _ in range(32):
        candidate = mask | stroke_mask(rng, height, width, parts=1)
        if candidate.mean() > hi and mask.any():
            break
        mask = candidate
        if mask.mean() >= lo:
            break
    return mask


def random_training_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Training mix: half free-form strokes, a quarter rectangles, a quarter blobs, varied sizes."""
    r = rng.uniform()
    if r < 0.5:
        return stroke_mask(rng, height, width, parts=int(rng.integers(1, 7)))
    if r < 0.75:
        return rect_mask(rng, height, width, (0.03, 0.30))
    return blob_mask(rng, height, width, (0.03, 0.30))
