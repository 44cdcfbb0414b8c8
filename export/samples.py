"""Real photos with realistic masks, prepared the way the runtime feeds the model.

Used twice by the export: to calibrate int8 quantization (``calibration`` photos) and
to run the parity gate (``holdout`` photos, never used for calibration). Both default to
the photos bundled in ``export/photos/`` (see its LICENSES.md); a folder of your own
can replace either.

Preparation is the runtime's own (:mod:`runtime_py.imageio`, :mod:`runtime_py.geometry`):
decode with EXIF orientation, 8-bit RGB, portrait photos turned to landscape for a
landscape model, the whole photo resized to the model shape (area when shrinking,
bicubic when enlarging, rounded half up). Masks come from :func:`runtime_py.masks.make_mask`
at model resolution -- free-form strokes, object-like blobs and rectangles, cycled, with
size classes cycled too -- stored as 255 = hole.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from runtime_py.contract import image_tensor, mask_pixels, mask_tensor
from runtime_py.errors import UserError

PHOTOS_DIR = Path(__file__).resolve().parent / "photos"
CALIBRATION_DIR = PHOTOS_DIR / "calibration"
HOLDOUT_DIR = PHOTOS_DIR / "holdout"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


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
        """(N, H, W, 3) float32 RGB in [-1, 1] (:func:`runtime_py.contract.image_tensor`)."""
        return image_tensor(self.images)

    def tensor_mask(self) -> np.ndarray:
        """(N, H, W, 1) float32 in {0, 1}, 1 = hole (:func:`runtime_py.contract.mask_tensor`)."""
        return mask_tensor(self.masks)

    def subset(self, indices: Sequence[int]) -> "Samples":
        """The samples at ``indices``, in that order."""
        idx = list(indices)
        return Samples(self.images[idx], self.masks[idx], [self.names[i] for i in idx])

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


def prepare_photo(path: Path, shape: Tuple[int, int]) -> np.ndarray:
    """(rows, cols, 3) uint8 RGB: the photo as the runtime's baseline pipeline feeds the model."""
    from runtime_py.geometry import needs_rotation, resize_image, rotate_in
    from runtime_py.imageio import read_image

    rgb = read_image(path).rgb8()
    if needs_rotation(rgb.shape[:2], shape):
        rgb = rotate_in(rgb)
    return resize_image(rgb, shape)


def hole_mask(index: int, shape: Tuple[int, int], seed: int) -> Tuple[str, np.ndarray]:
    """(label, (rows, cols) uint8 mask with 255 = hole) for the ``index``-th sample."""
    from runtime_py.masks import KINDS, SIZE_CLASSES, make_mask

    kind = KINDS[index % len(KINDS)]
    size = list(SIZE_CLASSES)[(index // len(KINDS)) % len(SIZE_CLASSES)]
    mask = make_mask(kind, shape[0], shape[1], seed=seed * 1000 + index, size=size)
    return f"{kind}-{size}", mask_pixels(mask > 0)


def load_samples(
    directory: Path,
    shape: Tuple[int, int],
    masks_per_photo: int = 1,
    seed: int = 0,
    limit: Optional[int] = None,
) -> Samples:
    """Every photo of ``directory`` at ``shape`` with ``masks_per_photo`` masks each (kinds and sizes cycled)."""
    photos = list_photos(directory)
    if limit is not None:
        photos = photos[:limit]
    images, masks, names = [], [], []
    k = 0
    for path in photos:
        rgb = prepare_photo(path, shape)
        for _ in range(masks_per_photo):
            label, mask = hole_mask(k, shape, seed)
            images.append(rgb)
            masks.append(mask[..., None])
            names.append(f"{path.name}#{label}")
            k += 1
    return Samples(np.stack(images), np.stack(masks), names)


def photo_dir_digest(directory: Path) -> str:
    """sha256 over the names and bytes of a photo folder's images (for the export cache)."""
    h = hashlib.sha256()
    for p in list_photos(directory):
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


#: :func:`nudged`: the fraction of pixel values a copy moves by one 8-bit level
NUDGED_FRACTION = 0.01


def nudged(samples: Samples, fraction: float = NUDGED_FRACTION, seed: int = 0) -> Samples:
    """A copy of ``samples`` whose images have ``fraction`` of their values (pixels times channels, chosen at random
    with ``seed``) one 8-bit level higher (255: one lower); masks unchanged, names marked ``~nudged``.

    The parity gate runs files whose activations are quantized at run time on these copies too: such a file rounds
    each activation on a grid set by the tensor's own extremes, so a change this small, which no viewer sees and
    decoders or resizers on another platform make, can move every rounding, and with an ill-conditioned model the
    hole PSNR of one sample with it by several dB (docs/TOLERANCES.md "Rounding realizations")."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    images = samples.images.copy()
    chosen = rng.random(images.shape) < fraction
    images[chosen] = np.where(images[chosen] == 255, 254, images[chosen] + 1)
    return Samples(images, samples.masks, [f"{name}~nudged" for name in samples.names])


def concatenated(a: Samples, b: Samples) -> Samples:
    """The samples of ``a``, then those of ``b`` (one shape)."""
    return Samples(np.concatenate([a.images, b.images]), np.concatenate([a.masks, b.masks]), a.names + b.names)


def subset(samples: Samples, index: Sequence[int]) -> Samples:
    idx = list(index)
    return Samples(samples.images[idx], samples.masks[idx], [samples.names[i] for i in idx])
