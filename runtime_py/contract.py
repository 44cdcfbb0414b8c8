"""The artifact contract: what crosses an exported model's boundary, defined once.

The export builds its PyTorch wrappers from it (``export.wrappers``), the engines feed and decode
with it, and the parity gate, golden bundles, benchmarks and training use it; docs/MANIFEST.md and
docs/EXPORT.md describe the same rules. Everything here works on NumPy arrays; the arithmetic
helpers (:func:`normalize`, :func:`denormalize`, :func:`composite`, :func:`graph_hole`) are plain
``+ - * /`` so they also trace into a PyTorch graph unchanged.

Two I/O signatures (:data:`IOS`), inputs ``image`` and ``mask`` (in that order), output ``output``:

* ``tensor`` -- the generator itself: ``image`` float32 RGB in [-1, 1] (``pixels / 127.5 - 1``),
  ``mask`` float32 {0, 1} with 1 = hole, ``output`` float32 RGB in [-1, 1], the raw prediction
  everywhere (``pixels = (output + 1) * 127.5``).
* ``image`` -- mobile-native: ``image`` uint8 RGB, ``mask`` uint8 with 255 = hole (any value from
  :data:`MASK_THRESHOLD` up counts as hole), ``output`` uint8 RGB, the prediction inside the hole
  and the input pixels elsewhere, bit for bit.

Layouts: TFLite files are NHWC; Core ML ``tensor`` files and PyTorch are NCHW; Core ML ``image``
files take images, which the runtime and the manifest hold as NHWC arrays (a batch of one).
Channel order is RGB everywhere (official TF checkpoints are BGR and are flipped when loaded).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from .manifest import TensorInfo

IOS = ("tensor", "image")
INPUT_NAMES = ("image", "mask")
OUTPUT_NAMES = ("output",)
CHANNEL_ORDER = "RGB"
LAYOUTS = ("NHWC", "NCHW")

#: Half the 8-bit range: pixels p in [0, 255] <-> values v in [-1, 1] by v = p / 127.5 - 1.
PIXEL_SCALE = 127.5
NORMALIZATION = "x/127.5-1"
#: uint8 masks: values from this up are hole (the runtime's --mask-threshold defaults to it too).
MASK_THRESHOLD = 128
MASK_HOLE = 255  # what a uint8 mask holds for a hole (0 for known)
MASK_POLARITY_FLOAT = "1=hole"  # float32 mask tensors: 1 = hole, 0 = known
MASK_POLARITY_U8 = "255=hole (>=128)"  # uint8 masks: 255 = hole; any value from 128 up counts as hole

UNIT_RANGE = (-1.0, 1.0)  # float images and outputs
MASK_RANGE = (0.0, 1.0)  # float masks
PIXEL_RANGE = (0.0, 255.0)  # every uint8 tensor


# ------------------------------------------------------------------------------ arithmetic

def normalize(pixels):
    """Pixel values in [0, 255] -> [-1, 1] (float arrays or tensors; ``x / 127.5 - 1``), computed as the
    ``image`` graphs compute it: ``x * (1/127.5) - 1``, two float32 roundings. ``x / 127.5`` differs from it by
    one float32 step for 111 of the 256 pixel values; with this form a ``tensor`` file's input is, bit for bit,
    the value its ``image`` twin computes in the network's place (which lets the export's gate share the
    network's run between the two)."""
    return pixels * (1.0 / PIXEL_SCALE) - 1.0


def denormalize(values):
    """[-1, 1] -> pixel values in [0, 255], not rounded (``(x + 1) * 127.5``)."""
    return (values + 1.0) * PIXEL_SCALE


def composite(pixels, hole, predicted):
    """``predicted`` inside the hole, ``pixels`` elsewhere, as the ``image`` graph computes it on the
    0..255 scale (``pixels + hole * (predicted - pixels)``): with hole in {0, 1} known pixels come back exact."""
    return pixels + hole * (predicted - pixels)


def graph_hole(mask_pixels, clamp: Callable):
    """The ``image`` graph's binarisation of 0..255 mask values: ``clamp(mask - 127, 0, 1)``, two ops that
    quantize cleanly; exact 0 or 1 for integer masks (1 from :data:`MASK_THRESHOLD` up). ``clamp`` is
    ``torch.clamp`` in a graph, ``np.clip`` on arrays."""
    return clamp(mask_pixels - float(MASK_THRESHOLD - 1), 0.0, 1.0)


def round_pixels(pixels: np.ndarray) -> np.ndarray:
    """Pixel values -> uint8, clipped to [0, 255] and rounded half to even (as the TFLite ROUND op and the
    Core ML ``image`` graph do)."""
    return np.rint(np.clip(pixels, 0.0, 255.0)).astype(np.uint8)


# ------------------------------------------------------------------------------ encoding

def image_tensor(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB (any leading shape, channels last) -> float32 in [-1, 1]."""
    return normalize(np.asarray(pixels).astype(np.float32))


def hole_of(mask: np.ndarray) -> np.ndarray:
    """uint8 mask (255 = hole) -> bool, True from :data:`MASK_THRESHOLD` up."""
    return np.asarray(mask) >= MASK_THRESHOLD


def mask_tensor(hole: np.ndarray) -> np.ndarray:
    """bool hole (or a uint8 mask, thresholded) -> float32 {0, 1}, 1 = hole."""
    hole = np.asarray(hole)
    return (hole_of(hole) if hole.dtype == np.uint8 else hole.astype(bool)).astype(np.float32)


def mask_pixels(hole: np.ndarray) -> np.ndarray:
    """bool hole -> uint8 mask, :data:`MASK_HOLE` = hole, 0 = known."""
    return np.asarray(hole).astype(np.uint8) * MASK_HOLE


def encode(role: str, io: str, image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """The (H, W, C) array an artifact of signature ``io`` takes for input ``role``, from an (H, W, 3) uint8
    RGB image and an (H, W) bool hole: float32 [-1, 1] / {0, 1} for ``tensor``, uint8 for ``image``."""
    if role == "image":
        return image_tensor(image) if io == "tensor" else image
    return (mask_tensor(hole) if io == "tensor" else mask_pixels(hole))[:, :, None]


def decode(output: np.ndarray, io: str) -> np.ndarray:
    """An artifact's output (channels last, dequantized) -> float32 pixel values in [0, 255]."""
    y = np.asarray(output).astype(np.float32)
    if io == "tensor":
        y = denormalize(y)
    return np.clip(y, 0.0, 255.0)


# ------------------------------------------------------------------------------ layouts

def layout_of(shape: Sequence[int]) -> str:
    """NHWC when the channel count (1 or 3) is last, else NCHW."""
    return "NHWC" if int(shape[-1]) in (1, 3) and int(shape[1]) not in (1, 3) else "NCHW"


def to_nchw(x):
    """(N, H, W, C) -> (N, C, H, W) (NumPy arrays; a view)."""
    return x.transpose(0, 3, 1, 2)


def to_nhwc(x):
    """(N, C, H, W) -> (N, H, W, C) (NumPy arrays; a view)."""
    return x.transpose(0, 2, 3, 1)


def layout_for(fmt: str, io: str) -> str:
    """The layout an artifact of format ``fmt`` (tflite, coreml, onnx) and signature ``io`` uses: TFLite is
    NHWC; Core ML tensors are NCHW and its images are held as NHWC arrays; ONNX (and PyTorch) are NCHW."""
    if fmt == "tflite":
        return "NHWC"
    if fmt == "coreml":
        return "NCHW" if io == "tensor" else "NHWC"
    return "NCHW"


def full_shape(rows: int, cols: int, channels: int, layout: str) -> List[int]:
    return [1, rows, cols, channels] if layout == "NHWC" else [1, channels, rows, cols]


# ------------------------------------------------------------------------------ signatures

def check_io(io: str) -> str:
    if io not in IOS:
        raise ValueError(f"unknown I/O signature {io!r}; expected one of {', '.join(IOS)}")
    return io


def role_of_name(name: str) -> str:
    """The role of a tensor the export named: ``image``, ``mask`` or ``output``."""
    return name if name in INPUT_NAMES else "output"


def tensor_info(name: str, io: str, shape: Sequence[int], dtype: str, layout: str,
                quantization: Optional[Tuple[float, int]] = None) -> TensorInfo:
    """The manifest entry of one of an artifact's tensors: value range, channel order and mask polarity
    follow from its role (its name) and the signature."""
    role = role_of_name(name)
    if io == "image":
        value_range, polarity = PIXEL_RANGE, MASK_POLARITY_U8
    else:
        value_range, polarity = (MASK_RANGE if role == "mask" else UNIT_RANGE), MASK_POLARITY_FLOAT
    scale, zero = quantization or (0.0, 0)
    return TensorInfo(name=name, shape=[int(s) for s in shape], dtype=dtype, layout=layout,
                      value_range=list(value_range), channel_order="mask" if role == "mask" else CHANNEL_ORDER,
                      mask_polarity=polarity if role == "mask" else "",
                      quantization={"scale": float(scale), "zero_point": int(zero)} if scale else {}, role=role)


def signature_infos(io: str, shape: Sequence[int], layout: str) -> Tuple[List[TensorInfo], List[TensorInfo]]:
    """(inputs, outputs) of an unquantized artifact of signature ``io`` at ``shape`` (rows, cols): float32
    for ``tensor``, uint8 for ``image``, in ``layout``."""
    rows, cols = int(shape[0]), int(shape[1])
    dtype = "float32" if check_io(io) == "tensor" else "uint8"
    channels = {"image": 3, "mask": 1, "output": 3}
    infos = {n: tensor_info(n, io, full_shape(rows, cols, channels[n], layout), dtype, layout)
             for n in INPUT_NAMES + OUTPUT_NAMES}
    return [infos[n] for n in INPUT_NAMES], [infos[n] for n in OUTPUT_NAMES]
