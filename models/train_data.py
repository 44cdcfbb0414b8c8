"""What the trainer feeds the network: cached photos, crops, whole-photo windows, hole masks, batches.

Images are (H,W,3) uint8 RGB until :func:`to_tensor` makes (N,3,H,W) float32 in [-1, 1]; masks are
(H,W) uint8 with 1 = hole until they become (N,1,H,W) float32. Every random choice comes from the
``numpy.random.Generator`` passed in, and a step's generator is :func:`batch_rng` of (seed, step), so a
batch is a function of the run's settings and the step alone (resume needs nothing else).
"""
from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Deque, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from runtime_py.contract import denormalize, image_tensor
from runtime_py.errors import UserError

from .dataset import PHOTO_SUFFIXES

Shape = Tuple[int, int]
#: Hole fractions are drawn from MIN_HOLE up to the current cap.
MIN_HOLE = 0.02


# ------------------------------------------------------------------------------ photos

def list_photos(folder: Path) -> List[Path]:
    if not Path(folder).is_dir():
        raise UserError(f"{folder}: not a directory of photos")
    photos = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    if not photos:
        raise UserError(f"{folder}: no photos ({', '.join(PHOTO_SUFFIXES)})")
    return photos


def load_photo(path: Path, short_side: int) -> np.ndarray:
    """Decode once and downscale so the short side is at most ``short_side``; (H,W,3) uint8 RGB."""
    from runtime_py.errors import native_stderr

    with native_stderr():  # libjpeg's own "Premature end of JPEG file" is not the user's error line
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f"{path}: not a readable image")
    h, w = img.shape[:2]
    scale = short_side / min(h, w)
    if scale < 1.0:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _resize(patch: np.ndarray, rows: int, cols: int) -> np.ndarray:
    if patch.shape[:2] == (rows, cols):
        return patch
    shrink = patch.shape[0] >= rows and patch.shape[1] >= cols
    return cv2.resize(patch, (cols, rows), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def random_crop(rng: np.random.Generator, photo: np.ndarray, crop: int, max_scale: float) -> np.ndarray:
    """A ``crop`` x ``crop`` RGB uint8 patch: a square of random side (crop .. crop*max_scale, log-uniform,
    capped by the photo) at a random place, resized to ``crop``, flipped left-right half the time."""
    h, w = photo.shape[:2]
    largest = min(h, w, int(crop * max_scale))
    side = crop if largest <= crop else int(round(math.exp(rng.uniform(math.log(crop), math.log(largest)))))
    side = min(max(side, 1), h, w)
    y = int(rng.integers(0, h - side + 1))
    x = int(rng.integers(0, w - side + 1))
    patch = _resize(photo[y:y + side, x:x + side], crop, crop)
    if rng.uniform() < 0.5:
        patch = patch[:, ::-1]
    return np.ascontiguousarray(patch)


def landscape(photo: np.ndarray, size: Shape) -> np.ndarray:
    """The photo turned as the runtime turns it for a model of ``size`` (portrait photos, landscape model)."""
    from runtime_py.geometry import needs_rotation, rotate_in

    return rotate_in(photo) if needs_rotation(photo.shape[:2], size) else photo


def window_of_aspect(h: int, w: int, size: Shape, area: float) -> Tuple[int, int]:
    """(rows, cols) of a window with ``size``'s aspect covering ``area`` (0..1] of the largest such window
    inside an h x w photo."""
    aspect = size[1] / size[0]
    if w / h > aspect:
        rows, cols = h, h * aspect
    else:
        rows, cols = w / aspect, w
    s = math.sqrt(area)
    return max(1, min(h, int(round(rows * s)))), max(1, min(w, int(round(cols * s))))


def random_whole(rng: np.random.Generator, photo: np.ndarray, size: Shape, min_area: float = 0.6) -> np.ndarray:
    """A whole-photo sample at ``size``: a window of the size's aspect covering ``min_area``..1 of the largest
    one, at a random place, resized to ``size``, flipped left-right half the time; (rows, cols, 3) uint8."""
    photo = landscape(photo, size)
    h, w = photo.shape[:2]
    rows, cols = window_of_aspect(h, w, size, rng.uniform(min_area, 1.0))
    y = int(rng.integers(0, h - rows + 1))
    x = int(rng.integers(0, w - cols + 1))
    patch = _resize(photo[y:y + rows, x:x + cols], *size)
    if rng.uniform() < 0.5:
        patch = patch[:, ::-1]
    return np.ascontiguousarray(patch)


def whole_view(photo: np.ndarray, size: Shape) -> np.ndarray:
    """The deterministic whole-photo sample (centred largest window, no flip) used for validation."""
    photo = landscape(photo, size)
    h, w = photo.shape[:2]
    rows, cols = window_of_aspect(h, w, size, 1.0)
    y, x = (h - rows) // 2, (w - cols) // 2
    return np.ascontiguousarray(_resize(photo[y:y + rows, x:x + cols], *size))


# ------------------------------------------------------------------------------- masks

def hole_cap(step_in_phase: int, max_hole: float, start: float, ramp_steps: int) -> float:
    """The largest hole fraction drawn at this step of a phase: ``start`` growing linearly to ``max_hole``
    over ``ramp_steps`` steps (``max_hole`` throughout when ramp_steps is 0 or start >= max_hole)."""
    if ramp_steps <= 0 or start >= max_hole:
        return max_hole
    return start + (max_hole - start) * min(1.0, max(step_in_phase, 0) / ramp_steps)


def _add_strokes(rng: np.random.Generator, mask: np.ndarray, target: float, cap: float,
                 attempts: int = 64) -> np.ndarray:
    """Strokes added one at a time until the hole fraction reaches ``target``; a stroke that would take it
    over ``cap`` is left out."""
    from runtime_py.masks import stroke_mask

    h, w = mask.shape
    for _ in range(attempts):
        if mask.mean() >= target:
            break
        candidate = mask | stroke_mask(rng, h, w, parts=1)
        if candidate.mean() <= cap:
            mask = candidate
    return mask


def training_mask(rng: np.random.Generator, height: int, width: int, cap: float) -> np.ndarray:
    """A hole of MIN_HOLE..``cap`` of the image, (H,W) uint8 1 = hole, never empty: 40 % free-form strokes,
    20 % one rectangle, 25 % one object-like blob, 15 % a blob with strokes across it. Shapes are the
    runtime's (``runtime_py.masks``), which the benchmark and the export gate also use."""
    from runtime_py.masks import blob_mask, rect_mask

    target = rng.uniform(MIN_HOLE, max(cap, MIN_HOLE))
    r = rng.uniform()
    if r < 0.4:
        mask = _add_strokes(rng, np.zeros((height, width), np.uint8), target, cap)
    elif r < 0.6:
        mask = rect_mask(rng, height, width, (target, target))
    elif r < 0.85:
        mask = blob_mask(rng, height, width, (target, target))
    else:
        mask = _add_strokes(rng, blob_mask(rng, height, width, (0.6 * target, 0.6 * target)), target, cap)
    if not mask.any():  # a single stroke can exceed a tiny cap on a tiny image
        mask[height // 2, width // 2] = 1
    return mask


# ------------------------------------------------------------------------------ tensors

def to_tensor(images: Sequence[np.ndarray]):
    """uint8 (H,W,3) RGB list -> (N,3,H,W) float32 in [-1, 1]."""
    import torch

    arr = image_tensor(np.stack(images))
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def to_uint8(images) -> np.ndarray:
    """(N,3,H,W) in [-1, 1] -> (N,H,W,3) uint8 RGB."""
    x = denormalize(images.detach().float().cpu().clamp(-1, 1)).round()
    return x.permute(0, 2, 3, 1).numpy().astype(np.uint8)


def masks_tensor(masks: Sequence[np.ndarray]):
    """(H,W) uint8 list -> (N,1,H,W) float32 in {0, 1}."""
    import torch

    return torch.from_numpy((np.stack(masks) > 0).astype(np.float32))[:, None]


# ------------------------------------------------------------------------------ batches

@dataclass(frozen=True)
class Recipe:
    """What a step's batch looks like (see :class:`models.train_config.TrainConfig`)."""

    batch_size: int
    crop: int
    max_scale: float
    whole_fraction: float = 0.0
    whole_size: Shape = (512, 680)
    whole_batch_size: int = 1
    max_hole: float = 0.4
    hole_start: float = 0.3
    hole_ramp_steps: int = 0
    phase_start: int = 0

    def shape_of(self, kind: str) -> Shape:
        return (self.crop, self.crop) if kind == "crop" else tuple(self.whole_size)


def batch_rng(seed: int, step: int) -> np.random.Generator:
    """The generator that draws the batch of (0-based) ``step``: a function of the seed and the step alone."""
    return np.random.default_rng([seed, step])


def sample_batch(rng: np.random.Generator, photos: Sequence[np.ndarray], recipe: Recipe, step: int = 0):
    """A training batch drawn only from ``rng``: (kind, images (N,3,H,W) in [-1,1], masks (N,1,H,W) 1 = hole),
    kind "crop" or "whole"."""
    kind = "whole" if recipe.whole_fraction > 0 and rng.uniform() < recipe.whole_fraction else "crop"
    cap = hole_cap(step - recipe.phase_start, recipe.max_hole, recipe.hole_start, recipe.hole_ramp_steps)
    rows, cols = recipe.shape_of(kind)
    n = recipe.batch_size if kind == "crop" else recipe.whole_batch_size
    images, masks = [], []
    for _ in range(n):
        photo = photos[int(rng.integers(0, len(photos)))]
        if kind == "crop":
            images.append(random_crop(rng, photo, recipe.crop, recipe.max_scale))
        else:
            images.append(random_whole(rng, photo, (rows, cols)))
        masks.append(training_mask(rng, rows, cols, cap))
    return kind, to_tensor(images), masks_tensor(masks)


class BatchStream:
    """Training batches for steps ``first_step``, ``first_step + 1``, ...

    With ``threads`` > 0, up to ``depth`` batches are drawn ahead on a thread pool (OpenCV's resizes and the
    mask drawing release the GIL), so a GPU step does not wait for the CPU-side crops. Each batch comes from
    :func:`batch_rng`, so the stream does not depend on the thread count. With ``pin_memory`` the tensors are
    page-locked for asynchronous host-to-GPU copies.
    """

    def __init__(self, photos: Sequence[np.ndarray], recipe: Recipe, seed: int, first_step: int,
                 threads: int = 0, depth: int = 0, pin_memory: bool = False):
        self._photos = photos
        self._recipe = recipe
        self._seed = seed
        self._next_step = first_step
        self._pin = pin_memory
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="batches") if threads > 0 else None
        self._depth = max(depth, 2 * threads)
        self._pending: Deque[Future] = deque()

    def _draw(self, step: int):
        kind, images, masks = sample_batch(batch_rng(self._seed, step), self._photos, self._recipe, step)
        if self._pin:
            images, masks = images.pin_memory(), masks.pin_memory()
        return kind, images, masks

    def next(self):
        """(kind, images, masks) of the next step."""
        if self._pool is None:
            self._next_step += 1
            return self._draw(self._next_step - 1)
        while len(self._pending) < self._depth:
            self._pending.append(self._pool.submit(self._draw, self._next_step))
            self._next_step += 1
        return self._pending.popleft().result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pending.clear()


def resolve_loader_threads(requested: int, device_type: str) -> int:
    """-1 = automatic: inline on a CPU (the cores train), otherwise most of the host's cores, at most 8."""
    if requested >= 0:
        return requested
    if device_type == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


# --------------------------------------------------------------------------- validation

def validation_set(photos: Sequence[np.ndarray], size: Shape, masks_per_photo: int,
                   seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Fixed validation samples: each photo's centred whole view at ``size`` with ``masks_per_photo`` seeded
    masks of ``runtime_py.masks.make_mask`` (kinds and size classes cycled, as the export's samples are);
    returns (K,rows,cols,3) uint8 RGB and (K,rows,cols) uint8 1 = hole."""
    from runtime_py.masks import KINDS, SIZE_CLASSES, make_mask

    classes = list(SIZE_CLASSES)
    images, masks = [], []
    for photo in photos:
        view = whole_view(photo, size)
        for _ in range(masks_per_photo):
            k = len(masks)
            images.append(view)
            masks.append(make_mask(KINDS[k % len(KINDS)], size[0], size[1], seed=seed * 1000 + k,
                                   size=classes[(k // len(KINDS)) % len(classes)]))
    return np.stack(images), np.stack(masks)


def composite(pred: np.ndarray, original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Network pixels in the hole, original pixels elsewhere; (H,W,3) uint8."""
    m = (mask > 0)[..., None]
    return np.where(m, pred, original)
