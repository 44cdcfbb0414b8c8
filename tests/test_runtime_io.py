"""Input handling of the reference pipeline: EXIF orientation, grey / RGBA / 16-bit images, mask binarization."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from helpers import photo
from runtime_py.errors import UserError
from runtime_py.imageio import (MAX_IMAGE_PIXELS, compose_output, jpeg_exif_orientation, mask_intensity, read_header,
                                read_image, read_mask, to_8bit, write_image)

PIL = pytest.importorskip("PIL.Image", reason="Pillow writes the EXIF test files")


def _jpeg_with_orientation(path, rgb, orientation):
    from PIL import Image

    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif, quality=95)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_opencv_imread_color(tmp_path, orientation):
    rgb = photo(24, 40)
    rgb[:6, :6] = 255  # a corner marker
    p = tmp_path / f"o{orientation}.jpg"
    _jpeg_with_orientation(p, rgb, orientation)
    assert jpeg_exif_orientation(p.read_bytes()) == orientation
    src = read_image(p)
    want = cv2.imread(str(p), cv2.IMREAD_COLOR)  # OpenCV applies EXIF orientation for IMREAD_COLOR
    assert src.orientation == orientation
    assert np.array_equal(src.pixels, want)
    if orientation in (5, 6, 7, 8):
        assert (src.height, src.width) == (40, 24)


def test_no_exif_is_orientation_1(tmp_path):
    p = tmp_path / "plain.jpg"
    cv2.imwrite(str(p), photo(20, 30))
    assert jpeg_exif_orientation(p.read_bytes()) == 1
    assert jpeg_exif_orientation(b"not a jpeg") == 1


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_of_png_webp_tiff_matches_pillow(tmp_path, fmt, orientation):
    """PNG (eXIf chunk) and WebP (EXIF chunk) are turned upright here; TIFF by OpenCV's own decoder:
    either way the pixels equal Pillow's ``exif_transpose`` of the same (lossless) file."""
    from PIL import Image, ImageOps

    rgb = photo(24, 40)
    rgb[:6, :6] = 255  # a corner marker
    p = tmp_path / f"o{orientation}.{fmt.lower()}"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(p, format=fmt, exif=exif, **({"lossless": True} if fmt == "WEBP" else {}))
    assert read_header(p.read_bytes()).orientation == orientation
    src = read_image(p)
    want = np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
    assert src.orientation == orientation
    assert np.array_equal(src.rgb8(), want)


@pytest.mark.parametrize("ext,params", [(".png", []), (".jpg", []), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80]),
                                        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]), (".tif", []), (".bmp", [])])
@pytest.mark.parametrize("rows,cols", [(1, 1), (17, 301), (300, 17)])
def test_header_size_is_the_decoded_size(ext, params, rows, cols):
    """The size read from the header (what the decoder-bomb limit is checked on) is what OpenCV decodes."""
    data = cv2.imencode(ext, photo(rows, cols)[:, :, ::-1], params)[1].tobytes()
    header = read_header(data)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert (header.height, header.width) == decoded.shape[:2]
    assert header.kind == {".jpg": "jpeg", ".tif": "tiff"}.get(ext, ext[1:])


def test_header_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    """A real 30x20 PNG is refused once the limit is below its 600 pixels: the check is on the header."""
    p = tmp_path / "small.png"
    cv2.imwrite(str(p), photo(20, 30))
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded a file over the limit"))
    monkeypatch.setattr("runtime_py.imageio.MAX_IMAGE_PIXELS", 599)
    with pytest.raises(UserError, match=r"header claims 30x20 pixels, more than the 0 MP"):
        read_image(p)
    assert MAX_IMAGE_PIXELS == 1 << 28


def test_grey_image_stays_grey(tmp_path):
    grey = photo(30, 40)[:, :, 0]
    p = tmp_path / "g.png"
    cv2.imwrite(str(p), grey)
    src = read_image(p)
    assert src.channels == 1 and src.rgb8().shape == (30, 40, 3)
    assert np.array_equal(src.rgb8()[:, :, 1], grey)
    hole = np.zeros((30, 40), bool)
    hole[5:10, 5:10] = True
    result = np.zeros((30, 40, 3), np.uint8)
    result[..., 0] = 100
    out = compose_output(src, result, hole)
    assert out.shape == (30, 40) and np.array_equal(out[~hole], grey[~hole])
    assert (out[hole] == 30).all()  # round(0.299 * 100)


def test_16bit_processed_at_8bit_and_written_back_at_16(tmp_path):
    rng = np.random.default_rng(1)
    px = rng.integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    p = tmp_path / "d.png"
    cv2.imwrite(str(p), px)
    src = read_image(p)
    assert src.depth == 16
    assert np.array_equal(to_8bit(px), np.round(px / 257.0).astype(np.uint8))
    hole = np.zeros((20, 30), bool)
    hole[:5] = True
    result = src.rgb8()
    result[:] = 7
    out = compose_output(src, result, hole)
    assert out.dtype == np.uint16 and np.array_equal(out[~hole], px[~hole]) and (out[hole] == 7 * 257).all()
    write_image(tmp_path / "o.png", out)
    assert np.array_equal(cv2.imread(str(tmp_path / "o.png"), cv2.IMREAD_UNCHANGED), out)
    write_image(tmp_path / "o.jpg", out)  # JPEG cannot hold 16 bits: written at 8
    assert cv2.imread(str(tmp_path / "o.jpg"), cv2.IMREAD_UNCHANGED).dtype == np.uint8


def test_rgba_alpha_ignored_and_kept(tmp_path):
    bgra = np.dstack([photo(20, 30)[:, :, ::-1], np.linspace(0, 255, 20 * 30).reshape(20, 30).astype(np.uint8)])
    p = tmp_path / "a.png"
    cv2.imwrite(str(p), bgra)
    src = read_image(p)
    assert src.channels == 4 and np.array_equal(src.rgb8(), bgra[:, :, 2::-1])
    hole = np.zeros((20, 30), bool)
    hole[3:8, 3:8] = True
    out = compose_output(src, np.full((20, 30, 3), 9, np.uint8), hole)
    assert np.array_equal(out[:, :, 3], bgra[:, :, 3])  # alpha unchanged everywhere
    assert np.array_equal(out[~hole], bgra[~hole]) and (out[hole, :3] == 9).all()


def test_mask_threshold_colour_alpha_and_dilation(tmp_path):
    m = np.zeros((40, 50), np.uint8)
    m[10, 10], m[20, 20], m[30, 30] = 127, 128, 255
    p = tmp_path / "m.png"
    cv2.imwrite(str(p), m)
    hole = read_mask(p)
    assert hole.sum() == 2 and hole[20, 20] and not hole[10, 10]
    assert read_mask(p, threshold=100).sum() == 3
    dil = read_mask(p, dilate_px=2)
    assert dil[22, 20] and dil[20, 18] and not dil[22, 22]  # ellipse 5x5: corners excluded
    # colour strokes count by their brightest channel; transparent pixels never count
    bgra = np.zeros((40, 50, 4), np.uint8)
    bgra[5, 5] = (0, 0, 200, 255)  # opaque red stroke
    bgra[6, 6] = (255, 255, 255, 0)  # white but transparent
    assert mask_intensity(bgra)[5, 5] == 200 and mask_intensity(bgra)[6, 6] == 0
    with pytest.raises(UserError, match="outside 1..255"):
        read_mask(p, threshold=0)


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"\x00garbage" * 20, "cannot decode")])
def test_bad_files(tmp_path, content, match):
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(UserError, match=match):
        read_image(p)
    with pytest.raises(UserError, match="not found"):
        read_mask(tmp_path / "missing.png")


def test_write_is_atomic_and_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(UserError, match="unsupported output format"):
        write_image(tmp_path / "o.xyz", photo(10, 10))
    with pytest.raises(UserError, match="does not exist"):
        write_image(tmp_path / "nodir" / "o.png", photo(10, 10))
    write_image(tmp_path / "o.png", photo(10, 10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]


def test_written_results_get_the_umask_mode_not_tempfiles_0600(tmp_path):
    from runtime_py.imageio import write_rgb

    old = os.umask(0o022)
    try:
        write_rgb(tmp_path / "result.png", np.zeros((4, 6, 3), np.uint8))
    finally:
        os.umask(old)
    assert (tmp_path / "result.png").stat().st_mode & 0o777 == 0o644
