"""Shared helpers of the tests/test_runtime_*.py files: a tiny model and synthetic photos.

Model: GMCNN tf variant, cnum 4, seed 0, run at 64x88 (pass 2 at 128x176) so that a
whole pipeline takes well under a second on one CPU thread.
"""
from __future__ import annotations

import numpy as np

MODEL_SHAPE = (64, 88)


def make_checkpoint(path, cnum: int = 4, seed: int = 0):
    from models import build_generator, save_checkpoint

    save_checkpoint(build_generator("tf", cnum, seed=seed), path)
    return path


def photo(rows: int = 300, cols: int = 420, seed: int = 0) -> np.ndarray:
    """(rows, cols, 3) uint8 RGB: smooth colour gradients plus mild noise, like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / 37.0), 128 + 90 * np.cos(y / 23.0), 255 * x / cols], axis=2)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def blob_hole(rows: int = 300, cols: int = 420) -> np.ndarray:
    """(rows, cols) bool: one 60x90 rectangle and one small 8x8 square."""
    h = np.zeros((rows, cols), bool)
    h[120:180, 200:290] = True
    h[40:48, 40:48] = True
    return h


def torch_engines(ckpt, shape=MODEL_SHAPE):
    from runtime_py.engines import open_engines

    return open_engines("torch", checkpoint=ckpt, model_shape=shape, threads=1)
