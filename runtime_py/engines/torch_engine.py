"""PyTorch engine: a project checkpoint run at any fixed shape (the reference every export is checked against).

torch is imported in :meth:`TorchEngine.activate_impl`, never at module import.
Feed: ``image`` (1,3,H,W) float32 RGB in [-1,1], ``mask`` (1,1,H,W) float32 {0,1} 1 = hole;
output ``output`` (1,3,H,W) float32 RGB in [-1,1] (raw generator output).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np

from ..errors import MissingDependencyError, UserError
from .base import Engine, TensorSpec


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, shape, checkpoint: Optional[os.PathLike] = None, threads: Optional[int] = None,
                 generator=None):
        super().__init__(shape, io="tensor")
        self.checkpoint = checkpoint
        self.threads = threads
        self.generator = generator

    def activate_impl(self) -> None:
        try:
            import torch
        except ImportError:
            raise MissingDependencyError("torch", "export", "the torch engine") from None
        try:
            from models import load_generator
            from models.gmcnn import check_shape
        except ImportError:
            raise UserError("the torch engine needs the 'models' package of gmcnn-mobile") from None
        if self.threads:
            torch.set_num_threads(int(self.threads))
        if self.generator is None:
            self.generator = load_generator(self.checkpoint)
        try:
            check_shape(self.generator.meta.variant, *self.shape)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self._torch = torch

    def input_specs(self) -> List[TensorSpec]:
        h, w = self.shape
        return [TensorSpec("image", (1, 3, h, w), "float32", "image"),
                TensorSpec("mask", (1, 1, h, w), "float32", "mask")]

    def output_specs(self) -> List[TensorSpec]:
        h, w = self.shape
        return [TensorSpec("output", (1, 3, h, w), "float32", "output")]

    def infer_impl(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            y = self.generator(torch.from_numpy(feed["image"]), torch.from_numpy(feed["mask"]))
        return {"output": y.numpy()}

    def describe(self) -> str:
        src = self.checkpoint or "default checkpoint"
        return f"torch {self.shape[0]}x{self.shape[1]} ({src})"
