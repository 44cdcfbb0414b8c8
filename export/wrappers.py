"""PyTorch modules that define each exported graph's I/O signature, and export-time graph rewrites.

Two signatures (names are the ``io`` values used everywhere in the export):

* ``tensor`` -- exactly the generator. Inputs ``image`` (1,3,H,W) float32 RGB in [-1, 1]
  and ``mask`` (1,1,H,W) float32 {0, 1}, 1 = hole; output ``output`` (1,3,H,W) float32 RGB
  in [-1, 1], raw (not composited). TFLite files carry these as NHWC (onnx2tf moves
  channels last): (1,H,W,3), (1,H,W,1) -> (1,H,W,3).
* ``image`` -- mobile-native. Inputs ``image`` uint8 RGB and ``mask`` uint8 with 255 = hole
  (any value >= 128 counts as hole); output ``output`` uint8 RGB: the prediction inside the
  hole, the input pixels elsewhere. In TFLite files: (1,H,W,3), (1,H,W,1) -> (1,H,W,3). The
  traced module works on float pixel values; see :class:`ImageIO` for where uint8 comes in.
"""
from __future__ import annotations

import torch
import torch.nn as nn

IOS = ("tensor", "image")
# Mask values at or above this count as hole in the uint8 signature.
MASK_THRESHOLD = 128


class TensorIO(nn.Module):
    """The generator itself: (image [-1,1], mask {0,1}) -> raw output [-1,1], all NCHW float32."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.generator(image, mask)


class ImageIO(nn.Module):
    """Pixel values in, composite pixel values out; normalisation and compositing inside.

    Traced with float32 tensors holding 0..255 values: ``image`` (1,3,H,W) RGB, ``mask``
    (1,1,H,W) with 255 = hole; returns (1,3,H,W) in [0, 255], not yet rounded. The TFLite
    backend makes the file's I/O uint8 (cast in, round-and-cast out for float files; the
    converter's uint8 input/output quantization for int8 files), so the values that cross
    the file boundary are exactly the uint8 pixels.

    ``hole = clamp(mask - 127, 0, 1)`` binarises at 128 with ops that quantize cleanly;
    the composite ``image + hole * (prediction - image)`` is computed on the 0..255 scale so
    known pixels come back unchanged.
    """

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hole = torch.clamp(mask - float(MASK_THRESHOLD - 1), 0.0, 1.0)
        prediction = self.generator(image / 127.5 - 1.0, hole)
        predicted_pixels = (prediction + 1.0) * 127.5
        composite = image + hole * (predicted_pixels - image)
        return torch.clamp(composite, 0.0, 255.0)


def wrap(generator: nn.Module, io: str) -> nn.Module:
    if io == "tensor":
        return TensorIO(generator).eval()
    if io == "image":
        return ImageIO(generator).eval()
    raise ValueError(f"unknown I/O signature {io!r}; expected one of {IOS}")
