"""Property-based tests (hypothesis) of the runtime's promises, through ``gmcnn-mobile inpaint``
run in-process on generated files of random size, orientation, bit depth, channels and mask:

* pixels outside the hole are the input's, bit for bit (in display orientation);
* the output has the input's layout: size after EXIF orientation, channel count, bit depth;
* an empty mask returns the input unchanged and runs no model;
* the same inputs give the same output bytes.

Most examples run a cheap deterministic numpy engine in place of the model (the promises are the
pipeline's and the file handling's, not the network's; every mode, tile and crop setting runs the
same code paths as with a real model). The tiny real GMCNN checks the same promises on fewer
examples, since a real engine could break determinism (threading) where a formula cannot.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runtime_py.engines as engines_module
from helpers import make_checkpoint, png_with_exif, recording_set, run_cli
from runtime_py.imageio import apply_orientation
from runtime_py.pipeline import MODES, TRISTATE

MODEL_SHAPE = (32, 44)
FORMATS = (".png", ".tif")  # lossless and able to hold 16 bits and alpha, so every promise is checkable
# derandomize: the same examples on every run and machine (no flaky CI), and no example database written
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True, database=None)


def formula(image, mask):
    """The stand-in model's prediction, (1,H,W,3) in [-1, 1]: a fixed formula of its inputs,
    deterministic, and unlike the input, so a pixel copied from it is never mistaken for the input's."""
    rows = np.linspace(-0.5, 0.5, image.shape[1], dtype=np.float32)[None, :, None, None]
    return np.tanh(0.7 - 0.9 * image[..., ::-1] + rows + 0.3 * mask)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@st.composite
def inputs(draw, max_side=96):
    """(stored pixels in OpenCV layout, EXIF orientation, display-orientation hole, file extension)."""
    rows = draw(st.integers(1, max_side))
    cols = draw(st.integers(1, max_side))
    channels = draw(st.sampled_from([1, 3, 4]))
    depth = draw(st.sampled_from([np.uint8, np.uint16]))
    ext = draw(st.sampled_from(FORMATS))
    orientation = draw(st.integers(1, 8)) if ext == ".png" else 1  # PNG carries it in eXIf
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    shape = (rows, cols) if channels == 1 else (rows, cols, channels)
    stored = rng.integers(0, np.iinfo(depth).max + 1, shape, dtype=np.uint64).astype(depth)
    upright_shape = apply_orientation(np.zeros((rows, cols), np.uint8), orientation).shape
    kind = draw(st.sampled_from(["empty", "full", "rectangles", "noise"]))
    hole = np.zeros(upright_shape, bool)
    if kind == "full":
        hole[:] = True
    elif kind == "rectangles":
        for _ in range(draw(st.integers(1, 3))):
            r0, c0 = rng.integers(0, upright_shape[0]), rng.integers(0, upright_shape[1])
            hole[r0 : r0 + rng.integers(1, upright_shape[0] + 1), c0 : c0 + rng.integers(1, upright_shape[1] + 1)] = True
    elif kind == "noise":
        hole = rng.random(upright_shape) < draw(st.floats(0.001, 0.5))
    return stored, orientation, hole, ext


def _write_inputs(folder: Path, stored, orientation, hole, ext):
    image = folder / f"image{ext}"
    if ext == ".png":
        image.write_bytes(png_with_exif(stored, orientation) if orientation != 1 else cv2.imencode(".png", stored)[1].tobytes())
    else:
        assert cv2.imwrite(str(image), stored)
    mask = folder / "mask.png"
    assert cv2.imwrite(str(mask), hole.astype(np.uint8) * 255)
    return image, mask


def _inpaint(folder: Path, image: Path, mask: Path, out_name: str, *options) -> Path:
    out = folder / out_name
    rc, _, err = run_cli("inpaint", image, mask, "-o", out, "--quiet", "--threads", "1", *options)
    assert rc == 0, err
    return out


def _check_promises(stored, orientation, hole, out: Path):
    upright = apply_orientation(stored, orientation)
    result = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert result.shape == upright.shape and result.dtype == upright.dtype, "output layout differs from the input's"
    assert np.array_equal(result[~hole], upright[~hole]), "a pixel outside the hole changed"
    if not hole.any():
        assert np.array_equal(result, upright)
    return result


@settings(max_examples=40, **SETTINGS)
@given(case=inputs(), mode=st.sampled_from(MODES), tiles=st.sampled_from(["auto", "on"]),
       crop=st.sampled_from(TRISTATE))
def test_promises_hold_for_any_input(case, mode, tiles, crop):
    stored, orientation, hole, ext = case
    call_lists = []

    def open_formula_engines(*_args, model_shape=None, **_options):  # stands in for open_engines
        engines, calls = recording_set(base=model_shape or MODEL_SHAPE, predict=formula)
        call_lists.append(calls)
        return engines

    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(engines_module, "open_engines", open_formula_engines):
        folder = Path(tmp)
        image, mask = _write_inputs(folder, stored, orientation, hole, ext)
        options = ("--mode", mode, "--tiles", tiles, "--crop", crop)
        first = _inpaint(folder, image, mask, f"a{ext}", *options)
        _check_promises(stored, orientation, hole, first)
        second = _inpaint(folder, image, mask, f"b{ext}", *options)
        assert first.read_bytes() == second.read_bytes(), "same inputs, different bytes"
    runs = sum(len(calls) for calls in call_lists)
    assert bool(runs) == bool(hole.any()), f"{runs} model runs for a mask of {int(hole.sum())} pixels"


@settings(max_examples=5, **SETTINGS)
@given(case=inputs(max_side=72), mode=st.sampled_from(MODES))
def test_promises_hold_with_the_real_tiny_model(case, mode, tiny_checkpoint):
    stored, orientation, hole, ext = case
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        image, mask = _write_inputs(folder, stored, orientation, hole, ext)
        options = ("--mode", mode, "--checkpoint", tiny_checkpoint, "--model-shape", "64x88")
        first = _inpaint(folder, image, mask, f"a{ext}", *options)
        _check_promises(stored, orientation, hole, first)
        second = _inpaint(folder, image, mask, f"b{ext}", *options)
        assert first.read_bytes() == second.read_bytes(), "same inputs, different bytes"
