"""Photos the benchmark runs on: discovery, loading, and a >= 12 MP stand-in when none is that large."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from .spawn import REPO_ROOT

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
LARGE_PIXELS = 12_000_000


def default_photo_dirs() -> List[Path]:
    """The bundled demo photo folder and ../shared/data/photos beside the repo, those that exist."""
    dirs = [REPO_ROOT / "runtime_py" / "demo", REPO_ROOT.parent / "shared" / "data" / "photos"]
    return [d for d in dirs if d.is_dir()]


def is_mask_file(path: Path) -> bool:
    """Mask images shipped beside photos (e.g. ``kite_mask.png``) are not photos."""
    return "mask" in path.stem.lower()


def find_photos(paths: Sequence[os.PathLike]) -> List[Path]:
    """Image files in ``paths`` (folders, searched non-recursively, or files), sorted, de-duplicated;
    files in a folder whose name says ``mask`` are left out."""
    found = []
    for p in map(Path, paths):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            found.append(p.resolve())
        elif p.is_dir():
            found += sorted(f.resolve() for f in p.iterdir()
                            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() and not is_mask_file(f))
    seen, out = set(), []
    for f in found:
        if f not in seen:
            seen.add(f)
            out.append(f)
    return out


def read_rgb(path: os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB; raises ValueError for unreadable files."""
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{path}: not a readable image")
    return np.ascontiguousarray(bgr[..., ::-1])


def image_size(path: os.PathLike) -> tuple:
    """(rows, cols) of an image file, read from its header where Pillow can, else by decoding."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
            return int(h), int(w)
    except Exception:
        rgb = read_rgb(path)
        return rgb.shape[0], rgb.shape[1]


@dataclass
class PhotoInfo:
    path: Path
    rows: int
    cols: int
    upscaled_from: Optional[str] = None  # set when this file is a bicubic upscale of a real photo

    @property
    def megapixels(self) -> float:
        return self.rows * self.cols / 1e6


def describe(paths: Sequence[Path]) -> List[PhotoInfo]:
    return [PhotoInfo(p, *image_size(p)) for p in paths]


def ensure_large_photo(photos: List[PhotoInfo], work_dir: Path, min_pixels: int = LARGE_PIXELS) -> Optional[PhotoInfo]:
    """A photo of at least ``min_pixels``: the largest given one if big enough, else a bicubic upscale
    of the largest real one (JPEG quality 95, written to ``work_dir``), marked ``upscaled_from``."""
    import cv2

    if not photos:
        return None
    biggest = max(photos, key=lambda p: p.rows * p.cols)
    if biggest.rows * biggest.cols >= min_pixels:
        return biggest
    factor = float(np.sqrt(min_pixels / (biggest.rows * biggest.cols)))
    rows = int(np.ceil(biggest.rows * factor / 16) * 16)
    cols = int(np.ceil(biggest.cols * factor / 16) * 16)
    out = Path(work_dir) / f"{biggest.path.stem}_upscaled_{cols}x{rows}.jpg"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        bgr = cv2.imread(str(biggest.path), cv2.IMREAD_COLOR)
        big = cv2.resize(bgr, (cols, rows), interpolation=cv2.INTER_CUBIC)
        tmp = out.with_name(out.stem + ".tmp.jpg")
        cv2.imwrite(str(tmp), big, [cv2.IMWRITE_JPEG_QUALITY, 95])
        os.replace(tmp, out)
    return PhotoInfo(out, rows, cols, upscaled_from=biggest.path.name)
