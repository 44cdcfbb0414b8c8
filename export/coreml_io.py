"""The two I/O signatures of the Core ML artifacts as coremltools type declarations.

The signatures themselves are :mod:`runtime_py.contract`'s; the traced module is
:func:`export.wrappers.wrap` with the Core ML options below.

``tensor`` -- NCHW float32 tensors: ``image`` (1,3,H,W) RGB in [-1, 1], ``mask`` (1,1,H,W) in
  {0, 1}, 1 = hole; ``output`` (1,3,H,W) RGB in [-1, 1], raw (not composited).

``image`` -- Core ML images (CVPixelBuffer on the device):
  input  ``image``: RGB ``ImageType``; Core ML applies ``x/127.5 - 1`` (scale 1/127.5, bias -1)
         before the network, so the graph sees (1,3,H,W) in [-1, 1] (``normalized_image``);
  input  ``mask``: GRAYSCALE ``ImageType``, 8-bit, 255 = hole; scale 1 keeps raw 0..255 values
         so the binarisation (any value >= 128 is hole, as in every uint8 mask) is exact even in
         fp16 arithmetic;
  output ``output``: RGB ``ImageType``: the prediction inside the hole, the input pixels
         elsewhere, computed on the 0..255 scale and rounded (half to even) inside the model
         (``round_output``), so known pixels come back bit-exact and the float->image conversion
         Core ML does last has nothing left to round.
"""
from __future__ import annotations

from typing import List, Tuple

from runtime_py import contract
from runtime_py.manifest import TensorInfo

IOS = contract.IOS
IMAGE_SCALE = 1.0 / contract.PIXEL_SCALE
IMAGE_BIAS = -1.0
#: export.wrappers options of the Core ML graphs
WRAP_OPTIONS = {"normalized_image": True, "round_output": True}


def wrap(generator, io: str):
    """The traced module of signature ``io`` (:func:`export.wrappers.wrap` with :data:`WRAP_OPTIONS`)."""
    from .wrappers import wrap as _wrap

    return _wrap(generator, io, **WRAP_OPTIONS)


def example_inputs(shape: Tuple[int, int], io: str, seed: int = 0):
    """Tracing inputs in the Core ML graph's own value ranges."""
    from .wrappers import example_inputs as _example_inputs

    return _example_inputs(shape, io, normalized_image=WRAP_OPTIONS["normalized_image"], seed=seed)


def coreml_types(shape: Tuple[int, int], io: str):
    """coremltools (inputs, outputs) declarations for ``ct.convert``."""
    import coremltools as ct
    import numpy as np

    h, w = shape
    image, mask = contract.INPUT_NAMES
    (output,) = contract.OUTPUT_NAMES
    if contract.check_io(io) == "tensor":
        inputs = [
            ct.TensorType(name=image, shape=(1, 3, h, w), dtype=np.float32),
            ct.TensorType(name=mask, shape=(1, 1, h, w), dtype=np.float32),
        ]
        outputs = [ct.TensorType(name=output, dtype=np.float32)]
    else:
        inputs = [
            ct.ImageType(name=image, shape=(1, 3, h, w), scale=IMAGE_SCALE, bias=[IMAGE_BIAS] * 3,
                         color_layout=ct.colorlayout.RGB),
            ct.ImageType(name=mask, shape=(1, 1, h, w), scale=1.0, color_layout=ct.colorlayout.GRAYSCALE),
        ]
        outputs = [ct.ImageType(name=output, color_layout=ct.colorlayout.RGB)]
    return inputs, outputs


def tensor_infos(shape: Tuple[int, int], io: str) -> Tuple[List[TensorInfo], List[TensorInfo]]:
    """Manifest entries for the artifact's inputs and outputs: NCHW tensors, or -- for ``image`` -- the
    w x h images as the runtime and the golden bundle hold them, batch-of-one NHWC uint8 arrays."""
    return contract.signature_infos(io, shape, contract.layout_for("coreml", io))
