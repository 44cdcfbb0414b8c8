"""Reading photos and masks the way the app does, and writing results atomically.

Conventions (see docs/PIPELINE.md, "Input handling"):

* Files are decoded with OpenCV ``IMREAD_UNCHANGED`` (keeps alpha and 16-bit samples),
  then the JPEG EXIF orientation tag is applied exactly as OpenCV's ``IMREAD_COLOR``
  would apply it (``IMREAD_UNCHANGED`` skips that step, so it is done here).
* The pipeline works on an (H, W, 3) uint8 RGB copy: greyscale is replicated to three
  channels, 16-bit samples become ``(v + 128) // 257`` (= round(v * 255 / 65535)),
  alpha is ignored (colour channels are used as stored, not premultiplied).
* The output keeps the input's layout: grey stays grey, RGBA keeps its alpha channel
  unchanged, 16-bit stays 16-bit (new pixels are ``v8 * 257``) when the output format
  can hold it (PNG, TIFF); unmasked pixels are copied bit for bit.
"""
from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import UserError

#: Output extensions and what they can hold.
WRITABLE = {
    ".png": {"alpha": True, "depth16": True},
    ".tif": {"alpha": True, "depth16": True},
    ".tiff": {"alpha": True, "depth16": True},
    ".jpg": {"alpha": False, "depth16": False},
    ".jpeg": {"alpha": False, "depth16": False},
    ".bmp": {"alpha": False, "depth16": False},
    ".webp": {"alpha": True, "depth16": False},
}

#: Default mask threshold on the 8-bit intensity scale: intensity >= 128 is a hole.
DEFAULT_MASK_THRESHOLD = 128

_EXIF_ORIENTATION_TAG = 0x0112


# ----------------------------------------------------------------------------- EXIF

def jpeg_exif_orientation(data: bytes) -> int:
    """EXIF orientation (1..8) stored in a JPEG byte string; 1 when absent or unreadable.

    Walks the JPEG marker segments up to the start of scan, finds the APP1 ``Exif``
    segment and reads tag 0x0112 of IFD0 (either byte order).
    """
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        return 1
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return 1
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan: no EXIF before the pixels
            return 1
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        segment = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1 and segment[:6] == b"Exif\x00\x00":
            return _tiff_orientation(segment[6:])
        pos += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack(order + "I", tiff[4:8])
        (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
        for i in range(count):
            entry = tiff[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
            tag, typ, _n = struct.unpack(order + "HHI", entry[:8])
            if tag == _EXIF_ORIENTATION_TAG and typ == 3:  # SHORT
                (value,) = struct.unpack(order + "H", entry[8:10])
                return int(value) if 1 <= value <= 8 else 1
    except (KeyError, struct.error, IndexError):
        pass
    return 1


def apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels into display orientation (EXIF values 1..8, as OpenCV does it)."""
    if orientation in (5, 6, 7, 8):
        pixels = cv2.transpose(pixels)
    flip = {2: 1, 3: -1, 4: 0, 6: 1, 7: -1, 8: 0}.get(orientation)
    if flip is not None:
        pixels = cv2.flip(pixels, flip)
    return np.ascontiguousarray(pixels)


# ---------------------------------------------------------------------------- decode

@dataclass
class SourceImage:
    """A decoded file in display orientation.

    ``pixels``: as OpenCV decodes it -- (H,W) grey, (H,W,3) BGR or (H,W,4) BGRA;
    uint8 or uint16. ``orientation``: the EXIF orientation that was applied.
    """

    path: str
    pixels: np.ndarray
    orientation: int = 1

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def channels(self) -> int:
        return 1 if self.pixels.ndim == 2 else int(self.pixels.shape[2])

    @property
    def depth(self) -> int:
        return 16 if self.pixels.dtype == np.uint16 else 8

    def describe(self) -> str:
        kind = {1: "grey", 3: "RGB", 4: "RGBA"}[self.channels]
        extra = f", EXIF orientation {self.orientation} applied" if self.orientation != 1 else ""
        return f"{self.width}x{self.height} {kind} {self.depth}-bit{extra}"

    def rgb8(self) -> np.ndarray:
        """(H,W,3) uint8 RGB working copy (grey replicated, alpha dropped, 16-bit rounded to 8-bit)."""
        p = to_8bit(self.pixels)
        if p.ndim == 2:
            return np.ascontiguousarray(np.repeat(p[:, :, None], 3, axis=2))
        return np.ascontiguousarray(p[:, :, 2::-1])  # BGR(A) -> RGB


def to_8bit(pixels: np.ndarray) -> np.ndarray:
    """uint16 -> uint8 by ``(v + 128) // 257`` (round to nearest); uint8 unchanged."""
    if pixels.dtype == np.uint8:
        return pixels
    return ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)


def decode_file(path: os.PathLike, what: str) -> SourceImage:
    """Read any image file OpenCV can decode; UserError with one line for anything else."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: {what} file not found")
    if p.is_dir():
        raise UserError(f"{p}: {what} is a directory, expected an image file")
    data = p.read_bytes()
    if not data:
        raise UserError(f"{p}: {what} file is empty (0 bytes)")
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.size == 0:
        raise UserError(f"{p}: cannot decode the {what} (corrupt or unsupported image file)")
    if pixels.dtype not in (np.uint8, np.uint16):
        raise UserError(f"{p}: {what} has {pixels.dtype} samples; only 8- and 16-bit images are supported")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 3 and pixels.shape[2] == 2:  # grey + alpha (rare decoders)
        pixels = pixels[:, :, 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (3, 4)):
        raise UserError(f"{p}: {what} has an unsupported channel layout {pixels.shape}")
    orientation = jpeg_exif_orientation(data)
    pixels = apply_orientation(pixels, orientation)
    return SourceImage(str(p), pixels, orientation)


def read_image(path: os.PathLike) -> SourceImage:
    return decode_file(path, "image")


def mask_intensity(pixels: np.ndarray) -> np.ndarray:
    """(H,W) uint8 intensity of a mask file's pixels.

    grey: the value; colour: the largest of its colour channels (any coloured stroke
    counts); with alpha: ``min(max(colour), alpha)`` so transparent areas are never holes.
    """
    p = to_8bit(pixels)
    if p.ndim == 2:
        return p
    colour = p[:, :, :3].max(axis=2)
    if p.shape[2] == 4:
        return np.minimum(colour, p[:, :, 3])
    return colour


def read_mask(path: os.PathLike, threshold: int = DEFAULT_MASK_THRESHOLD, dilate_px: int = 0) -> np.ndarray:
    """(H,W) bool hole mask from any image: intensity >= threshold, then dilated by ``dilate_px``."""
    if not 1 <= int(threshold) <= 255:
        raise UserError(f"mask threshold {threshold} is outside 1..255")
    if dilate_px < 0:
        raise UserError(f"mask dilation {dilate_px} px is negative")
    src = decode_file(path, "mask")
    hole = mask_intensity(src.pixels) >= int(threshold)
    if dilate_px:
        from .geometry import dilate

        hole = dilate(hole, dilate_px)
    return hole


# ----------------------------------------------------------------------------- encode

def compose_output(src: SourceImage, result_rgb8: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """The output array in the input's own layout: hole pixels from ``result_rgb8``, all else copied.

    result_rgb8: (H,W,3) uint8 RGB; hole: (H,W) bool. Grey inputs get
    ``round(0.299 R + 0.587 G + 0.114 B)`` in the hole; 16-bit inputs get ``v8 * 257``.
    """
    out = src.pixels.copy()
    if src.channels == 1:
        r, g, b = (result_rgb8[:, :, i].astype(np.float32) for i in range(3))
        new = np.floor(0.299 * r + 0.587 * g + 0.114 * b + 0.5).clip(0, 255).astype(np.uint8)
        new = new.astype(np.uint16) * 257 if src.depth == 16 else new
        out[hole] = new[hole]
        return out
    bgr = result_rgb8[:, :, ::-1]
    bgr = bgr.astype(np.uint16) * 257 if src.depth == 16 else bgr
    out[hole, :3] = bgr[hole]
    return out


def check_output_path(out: os.PathLike) -> str:
    ext = Path(out).suffix.lower()
    if ext not in WRITABLE:
        raise UserError(f"{out}: unsupported output format {ext or '(no extension)'}; use one of {', '.join(WRITABLE)}")
    return ext


def fit_to_format(pixels: np.ndarray, ext: str) -> np.ndarray:
    """Drop what the output format cannot store: alpha (JPEG/BMP) and 16-bit depth (JPEG/BMP/WebP)."""
    caps = WRITABLE[ext]
    if pixels.dtype == np.uint16 and not caps["depth16"]:
        pixels = to_8bit(pixels)
    if pixels.ndim == 3 and pixels.shape[2] == 4 and not caps["alpha"]:
        pixels = np.ascontiguousarray(pixels[:, :, :3])
    return pixels


def encode(pixels: np.ndarray, ext: str, jpeg_quality: int = 95) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if ext in (".jpg", ".jpeg") else []
    if ext == ".png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, buf = cv2.imencode(ext, fit_to_format(pixels, ext), params)
    if not ok:
        raise UserError(f"OpenCV could not encode the result as {ext}")
    return buf.tobytes()


def default_file_mode(directory: bool = False) -> int:
    """The mode ``open()`` (or ``mkdir``) would give a new file (directory) under the current umask:
    0o644 (0o755) under umask 022. ``tempfile`` makes 0600 files and 0700 folders, which an atomic
    write would otherwise pass on to the user's result."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def write_bytes_atomic(path: os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same directory, then rename over ``path``."""
    p = Path(path)
    if not p.parent.exists():
        raise UserError(f"{p.parent}: output directory does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".part", dir=str(p.parent))
    try:
        os.fchmod(fd, default_file_mode())  # mkstemp makes 0600 files; a result image is an ordinary file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_image(path: os.PathLike, pixels: np.ndarray, jpeg_quality: int = 95) -> None:
    """Encode OpenCV-layout ``pixels`` (grey/BGR/BGRA, uint8/uint16) by extension and write atomically."""
    ext = check_output_path(path)
    write_bytes_atomic(path, encode(pixels, ext, jpeg_quality))


def write_rgb(path: os.PathLike, rgb: np.ndarray, jpeg_quality: int = 95) -> None:
    """Write an (H,W,3) uint8 RGB array (or (H,W) grey) atomically."""
    pixels = rgb[:, :, ::-1] if rgb.ndim == 3 else rgb
    write_image(path, np.ascontiguousarray(pixels), jpeg_quality)
