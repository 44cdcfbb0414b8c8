"""Image quality measures over a region: the whole image, the hole, or a band around it.

Images are (H, W, 3) uint8 RGB (or float arrays on a stated peak); masks are
(H, W) with nonzero = hole. PSNR uses peak 255 for uint8 inputs.
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np


def boundary_band(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` px of the hole boundary, on both sides; (H, W) bool."""
    m = (mask > 0).astype(np.uint8)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
    return (cv2.dilate(m, k) > 0) & ~(cv2.erode(m, k) > 0)


def psnr(a: np.ndarray, b: np.ndarray, region: Optional[np.ndarray] = None, peak: float = 255.0) -> float:
    """PSNR in dB between ``a`` and ``b`` over ``region`` (bool (H, W); None = everywhere). inf if identical."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    if region is not None:
        diff = diff[region.astype(bool)]
    if diff.size == 0:
        raise ValueError("PSNR over an empty region")
    mse = float(np.mean(diff ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak ** 2 / mse)


def ssim_map(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> np.ndarray:
    """Per-pixel SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5), averaged over channels; (H, W) float64."""
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]

    def blur(x):
        return cv2.GaussianBlur(x, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

    maps = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch], b[..., ch]
        mx, my = blur(x), blur(y)
        vx = blur(x * x) - mx * mx
        vy = blur(y * y) - my * my
        cov = blur(x * y) - mx * my
        maps.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return np.mean(maps, axis=0)


def ssim(a: np.ndarray, b: np.ndarray, region: Optional[np.ndarray] = None, peak: float = 255.0) -> float:
    """Mean SSIM over ``region`` (bool (H, W); None = everywhere)."""
    m = ssim_map(a, b, peak)
    if region is not None:
        m = m[region.astype(bool)]
    if m.size == 0:
        raise ValueError("SSIM over an empty region")
    return float(m.mean())


def region_scores(reference: np.ndarray, result: np.ndarray, mask: np.ndarray, band: int = 8) -> dict:
    """PSNR and SSIM over the hole, the boundary band (``band`` px each side) and the whole image."""
    hole = mask > 0
    ring = boundary_band(mask, band)
    return {
        "hole_psnr": psnr(reference, result, hole),
        "hole_ssim": ssim(reference, result, hole),
        "band_psnr": psnr(reference, result, ring),
        "band_ssim": ssim(reference, result, ring),
        "psnr": psnr(reference, result),
        "ssim": ssim(reference, result),
    }
