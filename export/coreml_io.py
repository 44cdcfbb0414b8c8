"""The two I/O signatures of the Core ML artifacts, as PyTorch wrappers plus coremltools type declarations.

``tensor`` -- exactly the generator, NCHW float32:
  inputs  ``image`` (1,3,H,W) RGB in [-1, 1] and ``mask`` (1,1,H,W) in {0, 1}, 1 = hole;
  output  ``output`` (1,3,H,W) RGB in [-1, 1], raw (not composited).

``image`` -- mobile-native, Core ML images (CVPixelBuffer on the device):
  input  ``image``: RGB ``ImageType``; Core ML applies ``x/127.5 - 1`` (scale 1/127.5, bias -1)
         before the network, so the graph sees (1,3,H,W) in [-1, 1];
  input  ``mask``: GRAYSCALE ``ImageType``, 8-bit, 255 = hole; scale 1 keeps raw 0..255 values
         so the binarisation ``hole = clamp(mask - 127, 0, 1)`` (any value >= 128 is hole, the
         same threshold as the TFLite image signature) is exact even in fp16 arithmetic;
  output ``output``: RGB ``ImageType``: the prediction inside the hole, the input pixels
         elsewhere, computed on the 0..255 scale and rounded (half to even) inside the model,
         so known pixels come back bit-exact and the float->image conversion Core ML does
         last has nothing left to round.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn as nn

from runtime_py.manifest import MASK_POLARITY_FLOAT, MASK_POLARITY_U8, TensorInfo

IOS = ("tensor", "image")
MASK_THRESHOLD = 128  # uint8 mask values >= this count as hole (image signature)
IMAGE_SCALE = 1.0 / 127.5
IMAGE_BIAS = -1.0


class TensorSignature(nn.Module):
    """(image [-1,1], mask {0,1}) -> raw generator output [-1,1]; all (1,C,H,W) float32."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.generator(image, mask)


class ImageSignature(nn.Module):
    """(image [-1,1] after Core ML's scale/bias, mask 0..255) -> composite RGB on 0..255, integral."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hole = torch.clamp(mask - float(MASK_THRESHOLD - 1), 0.0, 1.0)
        prediction = self.generator(image, hole)
        pixels = (image + 1.0) * 127.5
        composite = pixels + hole * ((prediction + 1.0) * 127.5 - pixels)
        return torch.round(torch.clamp(composite, 0.0, 255.0))


def wrap(generator: nn.Module, io: str) -> nn.Module:
    if io == "tensor":
        return TensorSignature(generator).eval()
    if io == "image":
        return ImageSignature(generator).eval()
    raise ValueError(f"unknown I/O signature {io!r}; expected one of {IOS}")


def example_inputs(shape: Tuple[int, int], io: str, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tracing inputs in the graph's own value ranges (the values do not matter, the shapes do)."""
    h, w = shape
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    hole = (torch.rand(1, 1, h, w, generator=g) > 0.7).float()
    return (image, hole) if io == "tensor" else (image, hole * 255.0)


def coreml_types(shape: Tuple[int, int], io: str):
    """coremltools (inputs, outputs) declarations for ``ct.convert``."""
    import coremltools as ct
    import numpy as np

    h, w = shape
    if io == "tensor":
        inputs = [
            ct.TensorType(name="image", shape=(1, 3, h, w), dtype=np.float32),
            ct.TensorType(name="mask", shape=(1, 1, h, w), dtype=np.float32),
        ]
        outputs = [ct.TensorType(name="output", dtype=np.float32)]
    elif io == "image":
        inputs = [
            ct.ImageType(name="image", shape=(1, 3, h, w), scale=IMAGE_SCALE, bias=[IMAGE_BIAS] * 3,
                         color_layout=ct.colorlayout.RGB),
            ct.ImageType(name="mask", shape=(1, 1, h, w), scale=1.0, color_layout=ct.colorlayout.GRAYSCALE),
        ]
        outputs = [ct.ImageType(name="output", color_layout=ct.colorlayout.RGB)]
    else:
        raise ValueError(f"unknown I/O signature {io!r}; expected one of {IOS}")
    return inputs, outputs


def tensor_infos(shape: Tuple[int, int], io: str) -> Tuple[List[TensorInfo], List[TensorInfo]]:
    """Manifest entries for the artifact's inputs and outputs."""
    h, w = shape
    if io == "tensor":
        return (
            [TensorInfo("image", [1, 3, h, w], "float32", "NCHW", [-1.0, 1.0], "RGB", role="image"),
             TensorInfo("mask", [1, 1, h, w], "float32", "NCHW", [0.0, 1.0], "mask", MASK_POLARITY_FLOAT, role="mask")],
            [TensorInfo("output", [1, 3, h, w], "float32", "NCHW", [-1.0, 1.0], "RGB", role="output")],
        )
    # Core ML sees w x h images (CVPixelBuffer / PIL); runtime_py feeds them as batch-of-one NHWC arrays.
    return (
        [TensorInfo("image", [1, h, w, 3], "uint8", "NHWC", [0, 255], "RGB", role="image"),
         TensorInfo("mask", [1, h, w, 1], "uint8", "NHWC", [0, 255], "mask", MASK_POLARITY_U8, role="mask")],
        [TensorInfo("output", [1, h, w, 3], "uint8", "NHWC", [0, 255], "RGB", role="output")],
    )
