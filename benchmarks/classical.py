"""Classical inpainting baselines: OpenCV Telea and Navier-Stokes, and PatchMatch when installed.

Each method takes image (H, W, 3) uint8 RGB and mask (H, W) uint8, nonzero = hole,
and returns (H, W, 3) uint8 RGB with the hole filled (known pixels unchanged).
"""
from __future__ import annotations

from typing import Callable, Dict

import numpy as np

from runtime_py.contract import mask_pixels

OPENCV_RADIUS = 5  # px neighbourhood considered by cv2.inpaint


def telea(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.inpaint(image, mask_pixels(mask > 0), OPENCV_RADIUS, cv2.INPAINT_TELEA)


def navier_stokes(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.inpaint(image, mask_pixels(mask > 0), OPENCV_RADIUS, cv2.INPAINT_NS)


def patchmatch_available() -> bool:
    try:
        from patchmatch import patch_match
    except Exception:
        return False
    return bool(getattr(patch_match, "patchmatch_available", False))


def patchmatch(image: np.ndarray, mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """PyPatchMatch (pip install pypatchmatch), seeded so reruns are identical; known pixels restored."""
    from patchmatch import patch_match

    patch_match.set_random_seed(int(seed))
    hole = mask > 0
    out = patch_match.inpaint(np.ascontiguousarray(image), mask_pixels(hole), patch_size=5)
    out = np.asarray(out, dtype=np.uint8)
    result = image.copy()
    result[hole] = out[hole]
    return result


def classical_methods(include_patchmatch: bool = True) -> Dict[str, Callable]:
    methods = {"opencv-telea": telea, "opencv-ns": navier_stokes}
    if include_patchmatch and patchmatch_available():
        methods["patchmatch"] = patchmatch
    return methods
