"""Real photos with realistic masks, prepared the way the runtime feeds the model.

Used twice by the export: to calibrate int8 quantization (``calibration`` photos) and
to run the parity gate (``holdout`` photos, never used for calibration). Both default to
the photos bundled in ``export/photos/`` (see its LICENSES.md); a folder of your own
can replace either.

Preparation (the runtime's baseline pipeline): decode as RGB uint8, resize the whole
photo to the model shape (rows x cols) with area interpolation when shrinking and cubic
when enlarging; masks are drawn at model resolution, binary, 255 = hole.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from runtime_py.errors import UserError

PHOTOS_DIR = Path(__file__).resolve().parent / "photos"
CALIBRATION_DIR = PHOTOS_DIR / "calibration"
HOLDOUT_DIR = PHOTOS_DIR / "holdout"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# Mask kinds cycled over the photos; each kind at a seed of its own.
MASK_KINDS = ("strokes", "blob", "rectangles")


@dataclass
class Samples:
    """A batch of model inputs at one shape.

    images: (N, H, W, 3) uint8 RGB.   masks: (N, H, W, 1) uint8, 255 = hole, 0 = known.
    """

    images: np.ndarray
    masks: np.ndarray
    names: List[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> Tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def tensor_image(self) -> np.ndarray:
        """(N, H, W, 3) float32 RGB in [-1, 1] (``x / 127.5 - 1``)."""
        return self.images.astype(np.float32) / 127.5 - 1.0

    def tensor_mask(self) -> np.ndarray:
        """(N, H, W, 1) float32 in {0, 1}, 1 = hole."""
        return (self.masks >= 128).astype(np.float32)

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(self.images.tobytes())
        h.update(self.masks.tobytes())
        return h.hexdigest()


def list_photos(directory: Path) -> List[Path]:
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"{d}: photo folder does not exist")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{d}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB; 16-bit, grey and alpha inputs are reduced to 8-bit RGB."""
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise UserError(f"{path}: not a readable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def resize_to(img: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, C) image to ``shape`` = (rows, cols): area when shrinking, cubic when enlarging."""
    import cv2

    rows, cols = shape
    shrinking = img.shape[0] * img.shape[1] >= rows * cols
    return cv2.resize(img, (cols, rows), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def draw_mask(kind: str, shape: Tuple[int, int], seed: int) -> np.ndarray:
    """A realistic (H, W) uint8 mask, 255 = hole, drawn deterministically from ``seed``.

    ``strokes``: free-form brush strokes (what users draw over an object);
    ``blob``: one filled object-like polygon; ``rectangles``: one to three boxes.
    Hole area lands between about 5 % and 35 % of the image.
    """
    import cv2

    rows, cols = shape
    rng = np.random.default_rng(seed)
    mask = np.zeros((rows, cols), np.uint8)
    side = min(rows, cols)
    if kind == "strokes":
        for _ in range(int(rng.integers(2, 5))):
            pts = [(int(rng.integers(0, cols)), int(rng.integers(0, rows)))]
            for _ in range(int(rng.integers(3, 7))):
                angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.3) * side
                x = int(np.clip(pts[-1][0] + length * np.cos(angle), 0, cols - 1))
                y = int(np.clip(pts[-1][1] + length * np.sin(angle), 0, rows - 1))
                pts.append((x, y))
            width = max(2, int(rng.uniform(0.03, 0.08) * side))
            cv2.polylines(mask, [np.array(pts, np.int32)], False, 255, width, lineType=cv2.LINE_8)
    elif kind == "blob":
        cx, cy = rng.uniform(0.25, 0.75) * cols, rng.uniform(0.25, 0.75) * rows
        radius = rng.uniform(0.12, 0.3) * side
        angles = np.sort(rng.uniform(0, 2 * np.pi, 14))
        radii = radius * rng.uniform(0.6, 1.3, angles.size)
        pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).astype(np.int32)
        cv2.fillPoly(mask, [pts], 255)
    elif kind == "rectangles":
        for _ in range(int(rng.integers(1, 4))):
            h, w = int(rng.uniform(0.1, 0.35) * rows), int(rng.uniform(0.1, 0.35) * cols)
            y, x = int(rng.integers(0, rows - h)), int(rng.integers(0, cols - w))
            mask[y : y + h, x : x + w] = 255
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    if not mask.any():  # a degenerate draw: fall back to a central box
        mask[rows // 3 : 2 * rows // 3, cols // 3 : 2 * cols // 3] = 255
    return mask


def load_samples(
    directory: Path,
    shape: Tuple[int, int],
    masks_per_photo: int = 1,
    seed: int = 0,
    limit: Optional[int] = None,
) -> Samples:
    """Every photo of ``directory`` at ``shape`` with ``masks_per_photo`` masks each (kinds cycled)."""
    photos = list_photos(directory)
    if limit is not None:
        photos = photos[:limit]
    images, masks, names = [], [], []
    k = 0
    for i, path in enumerate(photos):
        rgb = resize_to(read_rgb(path), shape)
        for j in range(masks_per_photo):
            kind = MASK_KINDS[k % len(MASK_KINDS)]
            images.append(rgb)
            masks.append(draw_mask(kind, shape, seed=seed * 1000 + 10 * i + j)[..., None])
            names.append(f"{path.name}#{kind}{j}")
            k += 1
    return Samples(np.stack(images), np.stack(masks), names)


def photo_dir_digest(directory: Path) -> str:
    """sha256 over the names and bytes of a photo folder's images (for the export cache)."""
    h = hashlib.sha256()
    for p in list_photos(directory):
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def subset(samples: Samples, index: Sequence[int]) -> Samples:
    idx = list(index)
    return Samples(samples.images[idx], samples.masks[idx], [samples.names[i] for i in idx])
