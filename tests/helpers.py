"""Helpers shared by the test files: a tiny model, generators whose outputs carry signal, synthetic
photos and holes, and the CLI run in-process.

Tiny model: GMCNN tf variant, cnum 4, seed 0, run at 64x88 (pass 2 at 128x176), so that a whole
pipeline takes well under a second on one CPU thread. Nothing here reads ../shared.
"""
from __future__ import annotations

import contextlib
import io
import math
import struct
import zlib
from typing import Tuple

import numpy as np

from runtime_py.engines import EngineSet
from runtime_py.engines.base import Engine, TensorSpec

MODEL_SHAPE = (64, 88)


# ------------------------------------------------------------------------------------------ models

def make_checkpoint(path, cnum: int = 4, seed: int = 0):
    """Write a reference-initialised generator (tf variant) as a project checkpoint; returns ``path``."""
    from models import build_generator, save_checkpoint

    save_checkpoint(build_generator("tf", cnum, seed=seed), path)
    return path


def lively_generator(variant: str = "tf", cnum: int = 4, seed: int = 0, *, weight_gain: float = 1.0,
                     bias_std: float = 0.1):
    """A random generator (eval mode) whose output varies across the image.

    The reference initialisation (N(0, 0.02)) shrinks activations layer by layer until the
    output is ~0 everywhere, which would make every precision look perfect and hide arithmetic
    errors. Weights ~ N(0, weight_gain / sqrt(fan_in)) and biases ~ N(0, bias_std) keep the output
    spread over [-1, 1]: std ~0.15-0.2 with the defaults (unsaturated), ~0.3 with weight_gain 1.2 and
    bias_std 0.05 at cnum 4 (the Core ML tests), the regime a trained model works in.
    """
    import torch

    from models.gmcnn import build_generator

    gen = build_generator(variant, cnum, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in gen.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0.0, weight_gain / math.sqrt(fan_in), generator=g)
                m.bias.normal_(0.0, bias_std, generator=g)
    return gen.eval()


#: The recording engine's default prediction, everywhere: u8 round((0.2 + 1) * 127.5) = 153.
FILL = 0.2


class RecordingEngine(Engine):
    """NHWC float32 tensor engine in numpy that records every (shape, image, hole) it was given
    (image (H,W,3) uint8 RGB, hole (H,W) bool) and predicts ``predict(image, mask)``: both as fed,
    (1,H,W,3) in [-1, 1] and (1,H,W,1) in {0, 1}; the default predicts the constant FILL."""

    name = "recording"

    def __init__(self, shape, calls, predict=None):
        super().__init__(shape, "tensor")
        self.calls = calls
        self.predict = predict

    def activate_impl(self):
        pass

    def input_specs(self):
        h, w = self.shape
        return [TensorSpec("image", (1, h, w, 3), "float32", "image"), TensorSpec("mask", (1, h, w, 1), "float32", "mask")]

    def output_specs(self):
        h, w = self.shape
        return [TensorSpec("out", (1, h, w, 3), "float32", "output")]

    def infer_impl(self, feed):
        img = np.round((feed["image"][0] + 1) * 127.5).astype(np.uint8)
        self.calls.append((self.shape, img, feed["mask"][0, :, :, 0] > 0.5))
        if self.predict is None:
            return {"out": np.full(feed["image"].shape, FILL, np.float32)}
        return {"out": np.asarray(self.predict(feed["image"], feed["mask"]), np.float32)}


def recording_set(shapes=None, base=MODEL_SHAPE, predict=None):
    """(EngineSet of RecordingEngines at ``shapes`` (None: any shape), the list their calls go to)."""
    calls = []
    return EngineSet("recording", base, lambda s: RecordingEngine(s, calls, predict), shapes, "test"), calls


def export_onnx(module, path, shape, input_names=("image", "mask"), mask_first: bool = False):
    """Trace ``module(image, mask)`` -- or ``module(mask, image)`` with ``mask_first`` -- (NCHW float32) to a
    fixed-shape ONNX file at ``path`` (opset 17, the TorchScript exporter, as the export uses), inputs named
    ``input_names`` in that order, output ``output``; returns ``path``."""
    import warnings

    import torch

    rows, cols = shape
    image, mask = torch.zeros(1, 3, rows, cols), torch.zeros(1, 1, rows, cols)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notices
        torch.onnx.export(module, (mask, image) if mask_first else (image, mask), str(path),
                          input_names=list(input_names), output_names=["output"], opset_version=17, dynamo=False)
    return path


def torch_engines(ckpt, shape=MODEL_SHAPE):
    """(pass-1 engine, pass-2 engine) of the torch backend for ``ckpt`` at ``shape``, one thread."""
    from runtime_py.engines import open_engines

    return open_engines("torch", checkpoint=ckpt, model_shape=shape, threads=1)


def postpass_variants(export_dir, shape, precision: str, option: str, values, samples):
    """The converter's own ``precision`` file (kept in ``export_dir/.work`` of a tensor export made with
    ``keep_work=True``) post-passed once per value of the post-pass ``option`` (``pad_mode``,
    ``upsample_mode``), each run on ``samples`` with one thread: {value: (outputs, ops outside XNNPACK,
    post-pass report)}."""
    from export import tflite
    from export.options import ExportOptions

    work = export_dir / ".work" / f"tflite_{shape[0]}x{shape[1]}_tensor"
    raw = (work / f"converter_{precision}.tflite").read_bytes()
    variants = {}
    for value in values:
        data, report = tflite.postprocess(raw, precision, "tensor", ExportOptions(**{option: value}))
        path = work / f"variant_{precision}_{option}_{value}.tflite"
        path.write_bytes(data)
        variants[value] = (tflite.run(path, "tensor", samples, threads=1)[0], tflite.xnnpack_fallback_ops(path), report)
    return variants


# ------------------------------------------------------------------------------------- tiny exports

TINY_EXPORT_SHAPE = (64, 96)
TINY_TFLITE_PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8")
#: The two exports of the cnum-4 ``lively_generator`` at 64x96 recorded by tests/test_export_reference.py
#: (its docstring says what each one covers). ``defaults`` is also the suite's shared export: the session
#: fixture ``tiny_mixed_export`` (tests/conftest.py), which the TFLite export tests build on.
TINY_EXPORTS = {
    "defaults": dict(formats=["tflite", "coreml"], precisions=list(TINY_TFLITE_PRECISIONS), ios=["tensor", "image"]),
    "options": dict(formats=["tflite"], precisions=["fp32", "int8"], ios=["tensor"],
                    upsample_mode="depth_to_space", int8_tail=False),
}


def export_tiny(out, name: str, **options):
    """Export :data:`TINY_EXPORTS` ``name`` into ``out``; ``options`` adds export_artifacts arguments that leave
    the artifacts and manifest as they are (``keep_work``). Returns the manifest.

    The Core ML gate runs the reference executor's exact path, the only one the code that recorded
    tests/test_export_reference.py had: its fast default (issue 17) changes the gate's measured differences
    in their last digits by design (bounded in tests/test_mil_executor.py), not the artifacts."""
    import os

    from export.api import export_artifacts
    from runtime_py.mil_executor import MODE_ENV

    before = os.environ.get(MODE_ENV)
    os.environ[MODE_ENV] = "exact"
    try:
        return export_artifacts(lively_generator("tf", 4, seed=0), out, shapes=[TINY_EXPORT_SHAPE], threads=2,
                                progress=False, calibration_masks_per_photo=1, **TINY_EXPORTS[name], **options)
    finally:
        if before is None:
            os.environ.pop(MODE_ENV)
        else:
            os.environ[MODE_ENV] = before


# ------------------------------------------------------------------------------ images and holes

def photo(rows: int = 300, cols: int = 420, seed: int = 0, *, period: float = 37.0, noise: float = 6.0) -> np.ndarray:
    """(rows, cols, 3) uint8 RGB: smooth colour gradients plus Gaussian noise, like a photo.

    ``period`` (pixels per radian of the horizontal sine; the vertical one is 0.62x) sets how much
    structure a crop holds: the default gives gentle gradients, ~8 gives texture. ``noise`` is the
    noise std in levels.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / period), 128 + 90 * np.cos(y / (period * 0.62)), 255 * x / cols], axis=2)
    return np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8)


def blob_hole(rows: int = 300, cols: int = 420) -> np.ndarray:
    """(rows, cols) bool: one 60x90 rectangle and one small 8x8 square."""
    h = np.zeros((rows, cols), bool)
    h[120:180, 200:290] = True
    h[40:48, 40:48] = True
    return h


def write_photos(folder, sizes, *, names=None, seed: int = 0, **photo_kw):
    """Write ``photo(rows, cols, seed + i)`` for each (rows, cols) in ``sizes`` into ``folder`` (created),
    named ``names[i]`` or ``synthetic_{i}.png``; the file's extension picks the codec. Returns the folder."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for i, (rows, cols) in enumerate(sizes):
        name = names[i] if names else f"synthetic_{i}.png"
        cv2.imwrite(str(folder / name), photo(rows, cols, seed + i, **photo_kw)[:, :, ::-1])
    return folder


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def exif_payload(orientation: int) -> bytes:
    """An EXIF payload: a little-endian TIFF structure whose IFD0 holds only Orientation (tag 0x0112)."""
    return b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)


def png_with_exif(pixels: np.ndarray, orientation: int) -> bytes:
    """OpenCV's PNG of ``pixels`` (grey/BGR/BGRA, 8 or 16 bit) with an ``eXIf`` chunk after IHDR."""
    import cv2

    data = cv2.imencode(".png", pixels)[1].tobytes()
    ihdr_end = 8 + 8 + 13 + 4  # signature, IHDR length+type, IHDR data, CRC
    return data[:ihdr_end] + png_chunk(b"eXIf", exif_payload(orientation)) + data[ihdr_end:]


def write_shared_layout(root, seed: int = 0, size: Tuple[int, int] = (60, 80), extra_train: int = 3):
    """A miniature ``../shared/data``: every validation and held-out photo of :mod:`models.dataset` at its real
    place (``train/<group>/<file>`` or ``photos/<file>``), plus ``photos/Aqua.jpg`` and ``extra_train`` portrait
    photos in ``train/misc``; noisy (``noise`` 25) so that JPEG quality changes their size a lot. Returns root."""
    from models.dataset import HELD_OUT, VALIDATION

    rows, cols = size
    for i, name in enumerate(VALIDATION + HELD_OUT + ("Aqua.jpg",)):
        in_train = name[0].islower()  # train/ groups are lower-case folder names, photos/ wallpapers capitalised
        group, _, file = name.partition("-") if in_train else ("", "", name)
        write_photos(root / (f"train/{group}" if in_train else "photos"), [(rows, cols)], names=[file],
                     seed=seed + i, noise=25.0)
    write_photos(root / "train" / "misc", [(cols, rows)] * extra_train,
                 names=[f"extra_{i}.jpg" for i in range(extra_train)], seed=seed + 100, noise=25.0)
    (root / "train" / "LICENSES.md").write_text("not a photo")
    return root


# ------------------------------------------------------------------------------------------- CLI

def run_cli(*argv) -> Tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``gmcnn-mobile argv...`` run in-process; argparse exits count."""
    from gmcnn_mobile.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse: --help, usage errors
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def slow_gate_share(path, io, images, masks):
    """A stand-in for a gate process's share of int16x8 samples (minutes of reference kernels): it only sleeps."""
    import time

    time.sleep(600)
    return images
