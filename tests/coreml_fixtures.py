"""Shared helpers for the Core ML tests: a generator with non-trivial outputs, tiny artifacts
converted once per test process, and image-like sample inputs.

Conversions cost seconds each, so every (variant, shape, precision, io, compute) package is
built at most once per pytest process, in a temporary folder removed at exit.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

TINY_TF_SHAPE = (64, 96)
TINY_TORCH_SHAPE = (200, 204)
_CACHE: Dict[tuple, Path] = {}
_REPORTS: Dict[tuple, dict] = {}
_GENERATORS: Dict[tuple, object] = {}
_DIR = None


def scaled_generator(variant: str = "tf", cnum: int = 4, seed: int = 0):
    """``helpers.lively_generator`` with weights ~ N(0, 1.2/sqrt(fan_in)) and biases ~ N(0, 0.05), built once
    per process: outputs spread over [-1, 1] (std ~0.3 at cnum 4), so arithmetic errors show."""
    from helpers import lively_generator

    key = (variant, cnum, seed)
    if key not in _GENERATORS:
        _GENERATORS[key] = lively_generator(variant, cnum, seed, weight_gain=1.2, bias_std=0.05)
    return _GENERATORS[key]


def _workdir() -> Path:
    global _DIR
    if _DIR is None:
        _DIR = Path(tempfile.mkdtemp(prefix="gmcnn-coreml-tests-"))
        atexit.register(shutil.rmtree, _DIR, True)
    return _DIR


def tiny_artifact(precision: str = "fp16", io: str = "tensor", variant: str = "tf", compute: str = "fp16",
                  cnum: int = 4) -> Path:
    from export.coreml import convert_generator

    shape = TINY_TF_SHAPE if variant == "tf" else TINY_TORCH_SHAPE
    key = (variant, cnum, shape, precision, io, compute)
    if key not in _CACHE:
        name = f"{variant}_c{cnum}_{precision}_{io}_{compute}.mlpackage"
        calibration = None
        if precision == "w8a8":  # activations calibrated on the export's photos, one mask each
            from export.samples import CALIBRATION_DIR, load_samples

            calibration = load_samples(CALIBRATION_DIR, shape, 1, seed=1)
        _REPORTS[key] = {}
        _CACHE[key] = convert_generator(scaled_generator(variant, cnum), shape, precision, io, _workdir(),
                              checkpoint_sha256="0" * 64, name=name, compute=compute, calibration=calibration,
                              report=_REPORTS[key])
    return _CACHE[key]


def tiny_report(precision: str = "fp16", io: str = "tensor", variant: str = "tf", compute: str = "fp16",
                cnum: int = 4) -> dict:
    """The conversion report of :func:`tiny_artifact`'s package (w8a8: its calibration)."""
    tiny_artifact(precision, io, variant, compute, cnum)
    shape = TINY_TF_SHAPE if variant == "tf" else TINY_TORCH_SHAPE
    return _REPORTS[(variant, cnum, shape, precision, io, compute)]


def sample_inputs(shape: Tuple[int, int], n: int = 2, seed: int = 0):
    """Image-like uint8 RGB photos (``helpers.photo`` with texture) and realistic masks.

    Returns images (N,H,W,3) uint8 RGB and masks (N,H,W,1) uint8, 255 = hole.
    """
    from helpers import photo
    from runtime_py.masks import make_mask

    h, w = shape
    images, masks = [], []
    for i in range(n):
        images.append(photo(h, w, seed + i, period=9.0, noise=12.0))
        masks.append((make_mask(("blob", "strokes", "rect")[i % 3], h, w, seed + i) > 0).astype(np.uint8)[..., None] * 255)
    return np.stack(images), np.stack(masks)


def torch_reference(generator, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """PyTorch fp32 raw output (N,H,W,3) float32 in [-1,1] for uint8 inputs (same preprocessing as the gate)."""
    import torch

    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    m = torch.from_numpy((masks >= 128).astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        return generator(x, m).permute(0, 2, 3, 1).numpy()


def composite_u8(images: np.ndarray, masks: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """uint8 composite: prediction (raw, [-1,1]) in the hole, input elsewhere, rounded half to even."""
    pred = np.clip((raw.astype(np.float64) + 1.0) * 127.5, 0, 255)
    hole = masks >= 128
    return np.where(hole, np.round(pred), images).astype(np.uint8)
