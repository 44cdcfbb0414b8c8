"""The PyTorch module every exporter traces: the generator behind one I/O signature of the artifact
contract (:mod:`runtime_py.contract`, which defines the signatures, the normalisation, the mask
threshold and the compositing used here).

* ``tensor`` -- exactly the generator: (image (1,3,H,W) float32 RGB in [-1, 1], mask (1,1,H,W)
  float32 {0, 1}, 1 = hole) -> (1,3,H,W) float32 RGB in [-1, 1], raw (not composited).
* ``image`` -- pixel values in, composite pixel values out. Traced with float tensors holding
  0..255 values (the formats make the boundary uint8: the TFLite post-pass casts, or quantizes
  with scale 1; Core ML declares images): ``mask`` (1,1,H,W) 0..255 with 255 = hole is binarised
  in the graph (:func:`runtime_py.contract.graph_hole`), the prediction is composited on the
  0..255 scale so known pixels come back unchanged, and the result clamped to [0, 255].

Two format options of the ``image`` signature:

* ``normalized_image``: the format normalises the image before the graph (Core ML's ``ImageType``
  scale 1/127.5 and bias -1), so the graph takes [-1, 1] and recovers the pixels for compositing;
  otherwise (TFLite) it takes 0..255 and normalises itself.
* ``round_output``: round half to even inside the graph (Core ML: its float->image conversion then
  has nothing left to round); TFLite adds ROUND in its post-pass instead.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

from runtime_py import contract


class SignatureModule(nn.Module):
    """The generator behind signature ``io``; NCHW float32 in and out (see the module docstring)."""

    def __init__(self, generator: nn.Module, io: str, normalized_image: bool = False, round_output: bool = False):
        super().__init__()
        self.generator = generator
        self.io = contract.check_io(io)
        self.normalized_image = normalized_image
        self.round_output = round_output

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.io == "tensor":
            return self.generator(image, mask)
        hole = contract.graph_hole(mask, torch.clamp)
        if self.normalized_image:
            prediction = self.generator(image, hole)
            pixels = contract.denormalize(image)
        else:
            prediction = self.generator(contract.normalize(image), hole)
            pixels = image
        # contract.composite, written out: the tracer names each value after the local variable of the frame
        # that first uses it, those names land in the Core ML program, and this form keeps its bytes as shipped
        composite = pixels + hole * (contract.denormalize(prediction) - pixels)
        if self.round_output:
            return torch.round(torch.clamp(composite, 0.0, 255.0))
        return torch.clamp(composite, 0.0, 255.0)


def wrap(generator: nn.Module, io: str, normalized_image: bool = False, round_output: bool = False) -> nn.Module:
    """:class:`SignatureModule` in eval mode."""
    return SignatureModule(generator, io, normalized_image, round_output).eval()


def example_inputs(shape: Tuple[int, int], io: str, normalized_image: bool = False,
                   seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tracing inputs (1,3,H,W) and (1,1,H,W) in the graph's own value ranges (values do not shape the
    graph; the shapes do)."""
    h, w = shape
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    hole = (torch.rand(1, 1, h, w, generator=g) > 0.7).float()
    if io == "tensor":
        return image, hole
    return (image if normalized_image else contract.denormalize(image)), hole * float(contract.MASK_HOLE)
