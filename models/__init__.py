"""GMCNN generator definitions, checkpoint import and the shipped default weights.

Public API (used by export, runtime and benchmarks)::

    gen = models.load_generator(path=None)      # None -> the shipped default model
    out = gen(image, mask)                      # image (N,3,H,W) RGB in [-1,1], mask (N,1,H,W) 1 = hole
    gen.meta                                    # GeneratorMeta: variant, cnum, channel order, training size

Importing this package does not import torch; the functions below do.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_CHECKPOINT = WEIGHTS_DIR / "gmcnn_tf_c32_photos.safetensors"


def default_checkpoint() -> Path:
    """Path of the shipped default model (the ``GMCNN_CHECKPOINT`` environment variable overrides it)."""
    env = os.environ.get("GMCNN_CHECKPOINT")
    return Path(env) if env else DEFAULT_CHECKPOINT


def load_generator(path: Optional[os.PathLike] = None):
    """Load any supported checkpoint (project .safetensors, TF checkpoint, PyTorch .pth) as a GMCNNGenerator in eval mode.

    Raises :class:`models.checkpoint.CheckpointError` with a one-line message for unusable files.
    """
    from .checkpoint import CheckpointError, generator_from_weights, read_checkpoint

    p = Path(path) if path is not None else default_checkpoint()
    if path is None and not p.exists():
        raise CheckpointError(
            f"the default checkpoint {p} is missing; pass a checkpoint or create one with 'gmcnn-mobile init-checkpoint'"
        )
    meta, tensors = read_checkpoint(p)
    return generator_from_weights(meta, tensors, origin=str(p))


def build_generator(*args, **kwargs):
    from .gmcnn import build_generator as _build

    return _build(*args, **kwargs)


def save_checkpoint(gen, path, dtype: str = "float32"):
    from .checkpoint import save_checkpoint as _save

    return _save(gen, path, dtype=dtype)
