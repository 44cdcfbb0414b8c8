"""Reading photos and masks the way the app does, and writing results atomically.

Conventions (see docs/PIPELINE.md, "Input handling"):

* Files are decoded with OpenCV ``IMREAD_UNCHANGED`` (keeps alpha and 16-bit samples),
  then the EXIF orientation is applied exactly as OpenCV's ``IMREAD_COLOR`` would apply it
  (``IMREAD_UNCHANGED`` skips that step, so it is done here) for JPEG (APP1 ``Exif``), PNG
  (``eXIf`` chunk) and WebP (``EXIF`` chunk); OpenCV's TIFF decoder applies the TIFF
  orientation tag itself. Other formats carry none that is read.
* Before decoding, the header's width and height are read and a file claiming more than
  :data:`MAX_IMAGE_PIXELS` is refused (a damaged file or a decompression bomb would make the
  decoder allocate gigabytes); a file the decoder rejects is one :class:`UserError` line.
* The pipeline works on an (H, W, 3) uint8 RGB copy: greyscale is replicated to three
  channels, 16-bit samples become ``(v + 128) // 257`` (= round(v * 255 / 65535)),
  alpha is ignored (colour channels are used as stored, not premultiplied).
* The output keeps the input's layout: grey stays grey, RGBA keeps its alpha channel
  unchanged, 16-bit stays 16-bit (new pixels are ``v8 * 257``) when the output format
  can hold it (PNG, TIFF); unmasked pixels are copied bit for bit.
"""
from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import cv2
import numpy as np

from .contract import MASK_THRESHOLD
from .errors import UserError, native_stderr

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

#: Default mask threshold on the 8-bit intensity scale: intensity >= 128 is a hole (the artifacts' own rule).
DEFAULT_MASK_THRESHOLD = MASK_THRESHOLD

#: Largest image decoded, in pixels (width x height): 2^28 = 268 MP, above the 200 MP photos of
#: the largest phone sensors and below OpenCV's own limit (2^30, which it reports as an assertion).
#: A 16-bit RGBA image of this size is 2 GiB before the pipeline makes its working copies.
MAX_IMAGE_PIXELS = 1 << 28

_EXIF_ORIENTATION_TAG = 0x0112
_TIFF_WIDTH_TAG, _TIFF_HEIGHT_TAG = 256, 257


# ---------------------------------------------------------------- file headers and EXIF

@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says before any pixel is decoded.

    kind: ``jpeg``, ``png``, ``webp``, ``tiff``, ``bmp``, or ``""`` for a format not read here
    (left to the decoder). width, height: the stored size in pixels, 0 when unknown.
    orientation: the EXIF orientation (1..8) the file carries, 1 when none.
    decoder_orients: True where OpenCV's decoder applies ``orientation`` itself (TIFF).
    """

    kind: str = ""
    width: int = 0
    height: int = 0
    orientation: int = 1
    decoder_orients: bool = False


def read_header(data: bytes) -> ImageHeader:
    """The :class:`ImageHeader` of an encoded image; never raises (a damaged header reads as unknown)."""
    try:
        if data[:2] == b"\xff\xd8":
            return _jpeg_header(data)
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return _png_header(data)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_header(data)
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            tags = _ifd0_tags(data, (_TIFF_WIDTH_TAG, _TIFF_HEIGHT_TAG, _EXIF_ORIENTATION_TAG))
            return ImageHeader("tiff", tags.get(_TIFF_WIDTH_TAG, 0), tags.get(_TIFF_HEIGHT_TAG, 0),
                               _valid_orientation(tags.get(_EXIF_ORIENTATION_TAG, 1)), decoder_orients=True)
        if data[:2] == b"BM" and len(data) >= 26:
            (dib,) = struct.unpack("<I", data[14:18])
            if dib == 12:  # OS/2 BITMAPCOREHEADER
                w, h = struct.unpack("<HH", data[18:22])
            else:
                w, h = struct.unpack("<ii", data[18:26])
            return ImageHeader("bmp", abs(w), abs(h))
    except (struct.error, IndexError, ValueError):
        pass
    return ImageHeader()


def jpeg_exif_orientation(data: bytes) -> int:
    """EXIF orientation (1..8) stored in a JPEG byte string; 1 when absent or unreadable."""
    return read_header(data).orientation if data[:2] == b"\xff\xd8" else 1


def _valid_orientation(value: int) -> int:
    return int(value) if 1 <= int(value) <= 8 else 1


def _exif_orientation(blob: bytes) -> int:
    """Orientation from an EXIF payload: a TIFF structure, optionally after ``Exif\\0\\0``."""
    if blob[:6] == b"Exif\x00\x00":
        blob = blob[6:]
    return _valid_orientation(_ifd0_tags(blob, (_EXIF_ORIENTATION_TAG,)).get(_EXIF_ORIENTATION_TAG, 1))


def _jpeg_header(data: bytes) -> ImageHeader:
    """Walks the marker segments up to the start of scan: SOFn gives the size, the first APP1
    ``Exif`` segment the orientation (tag 0x0112 of IFD0, either byte order)."""
    width = height = 0
    orientation = None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan: the headers are over
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        segment = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1 and orientation is None and segment[:6] == b"Exif\x00\x00":
            orientation = _exif_orientation(segment)
        elif marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            height, width = struct.unpack(">HH", segment[1:5])
        pos += 2 + length
    return ImageHeader("jpeg", width, height, orientation or 1)


def _png_header(data: bytes) -> ImageHeader:
    """IHDR gives the size; an ``eXIf`` chunk (anywhere before IEND) the orientation."""
    width, height = struct.unpack(">II", data[16:24]) if data[12:16] == b"IHDR" else (0, 0)
    orientation = 1
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"eXIf":
            orientation = _exif_orientation(data[pos + 8 : pos + 8 + length])
            break
        if kind == b"IEND":
            break
        pos += 12 + length
    return ImageHeader("png", width, height, orientation)


def _webp_header(data: bytes) -> ImageHeader:
    """RIFF chunks: ``VP8X`` (canvas size), ``VP8 `` / ``VP8L`` (bitstream size), ``EXIF``."""
    width = height = 0
    orientation = 1
    pos = 12
    while pos + 8 <= len(data):
        kind, length = struct.unpack("<4sI", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"VP8X" and len(chunk) >= 10:
            width = 1 + int.from_bytes(chunk[4:7], "little")
            height = 1 + int.from_bytes(chunk[7:10], "little")
        elif kind == b"VP8 " and not width and len(chunk) >= 10:
            w, h = struct.unpack("<HH", chunk[6:10])
            width, height = w & 0x3FFF, h & 0x3FFF
        elif kind == b"VP8L" and not width and len(chunk) >= 5:
            (bits,) = struct.unpack("<I", chunk[1:5])
            width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        elif kind == b"EXIF":
            orientation = _exif_orientation(chunk)
        pos += 8 + length + (length & 1)
    return ImageHeader("webp", width, height, orientation)


def _ifd0_tags(tiff: bytes, wanted) -> Dict[int, int]:
    """Single SHORT/LONG values of the ``wanted`` tags in IFD0 of a TIFF structure (either byte
    order); tags that are absent or unreadable are left out."""
    found: Dict[int, int] = {}
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack(order + "I", tiff[4:8])
        (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
        for i in range(count):
            entry = tiff[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
            tag, typ, n = struct.unpack(order + "HHI", entry[:8])
            if tag in wanted and n == 1 and typ in (3, 4):  # SHORT, LONG
                (value,) = struct.unpack(order + ("H" if typ == 3 else "I"), entry[8:10] if typ == 3 else entry[8:12])
                found[tag] = int(value)
    except (KeyError, struct.error, IndexError):
        pass
    return found


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
            return cv2.cvtColor(p, cv2.COLOR_GRAY2RGB)
        # BGR(A) -> RGB: a channel swap (alpha dropped), in one SIMD pass instead of a strided copy
        return cv2.cvtColor(p, cv2.COLOR_BGRA2RGB if p.shape[2] == 4 else cv2.COLOR_BGR2RGB)


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
    header = read_header(data)
    if header.width * header.height > MAX_IMAGE_PIXELS:
        raise UserError(f"{p}: the {what}'s header claims {header.width}x{header.height} pixels, more than the "
                        f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP this tool decodes (a damaged file or a decompression bomb)")
    try:
        with native_stderr():  # the codec's own lines (libpng error: ...) are not the user's error line
            pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:  # OpenCV's own size limit and decoder failures it reports by raising
        pixels = None
    if pixels is None or pixels.size == 0:
        raise UserError(f"{p}: cannot decode the {what} (corrupt, unsupported or too large image file)")
    if pixels.dtype not in (np.uint8, np.uint16):
        raise UserError(f"{p}: {what} has {pixels.dtype} samples; only 8- and 16-bit images are supported")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 3 and pixels.shape[2] == 2:  # grey + alpha (rare decoders)
        pixels = pixels[:, :, 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (3, 4)):
        raise UserError(f"{p}: {what} has an unsupported channel layout {pixels.shape}")
    if not header.decoder_orients:
        pixels = apply_orientation(pixels, header.orientation)
    return SourceImage(str(p), pixels, header.orientation)


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
    from .geometry import copy_where, mask_bbox

    out = src.pixels.copy()
    box = mask_bbox(hole)
    if box is None:
        return out
    # only the hole's bounding box is converted and written
    result_rgb8, hole, dst = result_rgb8[box.slices], hole[box.slices], out[box.slices]
    if src.channels == 1:
        r, g, b = (result_rgb8[:, :, i].astype(np.float32) for i in range(3))
        new = np.floor(0.299 * r + 0.587 * g + 0.114 * b + 0.5).clip(0, 255).astype(np.uint8)
        new = new.astype(np.uint16) * 257 if src.depth == 16 else new
        copy_where(dst, new, hole)
        return out
    bgr = cv2.cvtColor(result_rgb8, cv2.COLOR_RGB2BGR)  # a channel swap into a packed array, as copy_where likes
    bgr = bgr.astype(np.uint16) * 257 if src.depth == 16 else bgr
    copy_where(dst[:, :, :3], bgr, hole)
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


# ------------------------------------------------------------------------- output paths
# Every command checks where its results go before it does any work, so that a bad path is one
# line and never a result computed for nothing or half written (docs/PIPELINE.md, "Failure behaviour").

def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _writable_dir(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def check_output_dir(path: os.PathLike, what: str = "output folder") -> None:
    """Refuse (UserError) a folder that cannot be used or created: an existing file, a path under a
    file, or a location this process may not write to. Creates nothing."""
    p = Path(path)
    if os.path.lexists(p):
        if not p.is_dir():
            raise UserError(f"{p}: the {what} names an existing file, not a folder")
        if not _writable_dir(p):
            raise UserError(f"{p}: the {what} is not writable (permission denied)")
        return
    ancestor = _nearest_existing(p.parent)
    if not ancestor.is_dir():
        raise UserError(f"{p}: cannot create the {what}: {ancestor} is a file, not a folder")
    if not _writable_dir(ancestor):
        raise UserError(f"{p}: cannot create the {what}: {ancestor} is not writable (permission denied)")


def check_output_file(path: os.PathLike, what: str = "output file", parents: bool = False) -> None:
    """Refuse (UserError) a file path that cannot be written: an existing folder, a missing parent
    folder (unless ``parents``: the caller creates it, see :func:`make_output_dir`), a parent that is
    a file, or a folder this process may not write to. Creates nothing."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p}: the {what} names a folder; give a file name")
    if parents:
        folder = _nearest_existing(p.parent)
    elif not p.parent.exists():
        raise UserError(f"{p.parent}: output directory does not exist")
    else:
        folder = p.parent
    if not folder.is_dir():
        raise UserError(f"{p}: cannot write the {what}: {folder} is a file, not a folder")
    if not _writable_dir(folder):
        raise UserError(f"{p}: cannot write the {what}: {folder} is not writable (permission denied)")


def make_output_dir(path: os.PathLike, what: str = "output folder") -> List[Path]:
    """Create ``path`` (with parents) after :func:`check_output_dir`; returns the folders it created,
    outermost first, so a failed run can take them back (:func:`output_dir`)."""
    p = Path(path)
    check_output_dir(p, what)
    created: List[Path] = []
    q = p
    while not os.path.lexists(q):
        created.insert(0, q)
        q = q.parent
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{p}: cannot create the {what} ({exc.strerror or exc})") from None
    return created


@contextlib.contextmanager
def output_dir(path: os.PathLike, what: str = "output folder") -> Iterator[Path]:
    """``with output_dir(p):`` creates ``p`` like :func:`make_output_dir`; if the block raises, the
    folders it created are removed again where they are still empty."""
    created = make_output_dir(path, what)
    try:
        yield Path(path)
    except BaseException:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only empty ones: whatever the block finished stays
        raise


def write_bytes_atomic(path: os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same directory, then rename over ``path``; an OS error
    (disk full, permissions) is one UserError line and leaves neither file behind."""
    p = Path(path)
    check_output_file(p)
    tmp: Optional[str] = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".part", dir=str(p.parent))
        os.fchmod(fd, default_file_mode())  # mkstemp makes 0600 files; a result image is an ordinary file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise UserError(f"{p}: cannot write ({exc.strerror or exc})") from None
        raise


def write_image(path: os.PathLike, pixels: np.ndarray, jpeg_quality: int = 95) -> None:
    """Encode OpenCV-layout ``pixels`` (grey/BGR/BGRA, uint8/uint16) by extension and write atomically."""
    ext = check_output_path(path)
    write_bytes_atomic(path, encode(pixels, ext, jpeg_quality))


def write_rgb(path: os.PathLike, rgb: np.ndarray, jpeg_quality: int = 95) -> None:
    """Write an (H,W,3) uint8 RGB array (or (H,W) grey) atomically."""
    pixels = rgb[:, :, ::-1] if rgb.ndim == 3 else rgb
    write_image(path, np.ascontiguousarray(pixels), jpeg_quality)
