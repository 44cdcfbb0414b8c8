"""ONNX artifacts listed in an export manifest: ONNX Runtime opened from the manifest (its shapes,
precisions and input roles, not a glob of the folder), a golden bundle of them, and ``compare``
against that bundle (passing copies, a wrong-size device file; a bad index is tests/test_golden.py's).

The export writes TFLite and Core ML; a manifest with ``format: onnx`` entries is what a user's
own ONNX export would declare, and the runtime, ``golden`` and ``compare`` accept it. Tiny model:
the lively tf cnum-4 generator at 64x88 and 128x176, exported by the tests in seconds.
"""
from __future__ import annotations

import hashlib
import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from helpers import MODEL_SHAPE, export_onnx, lively_generator, photo, run_cli
from runtime_py import golden
from runtime_py.engines import open_engines
from runtime_py.errors import UserError
from runtime_py.manifest import SCHEMA_VERSION, Artifact, Manifest, TensorInfo

pytest.importorskip("onnxruntime")
PASS2_SHAPE = (128, 176)


class MaskFirst(torch.nn.Module):
    """A generator as forward(hole, picture): input names that say nothing about their role, mask first,
    so only the manifest's TensorInfo roles can tell the engine which input is which."""

    def __init__(self, gen):
        super().__init__()
        self.gen = gen

    def forward(self, hole, picture):
        return self.gen(picture, hole)


def _infos(shape, names):
    """TensorInfo of the mask-first NCHW float32 inputs and the output, as an export would declare them."""
    rows, cols = shape
    image = TensorInfo(names["image"], [1, 3, rows, cols], "float32", "NCHW", [-1.0, 1.0], "RGB", role="image")
    mask = TensorInfo(names["mask"], [1, 1, rows, cols], "float32", "NCHW", [0.0, 1.0], "mask", "1=hole", role="mask")
    out = TensorInfo("output", [1, 3, rows, cols], "float32", "NCHW", [-1.0, 1.0], "RGB", role="output")
    return [mask, image], [out]  # the files' input order


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    """DIR/manifest.json listing fp32 ONNX files at 64x88 and 128x176 (mask-first, role-less names),
    plus a stray 96x128 .onnx file that the manifest does not list."""
    gen = lively_generator("tf", 4, seed=0)
    d = tmp_path_factory.mktemp("onnx_export")
    names = {"image": "picture", "mask": "hole"}
    artifacts = []
    for shape in (MODEL_SHAPE, PASS2_SHAPE):
        f = export_onnx(MaskFirst(gen), d / f"gmcnn_tf_c4_{shape[0]}x{shape[1]}_tensor_fp32.onnx", shape,
                        input_names=("hole", "picture"), mask_first=True)
        data = f.read_bytes()
        inputs, outputs = _infos(shape, names)
        artifacts.append(Artifact(file=f.name, format="onnx", shape=list(shape), precision="fp32", io="tensor",
                                  sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), inputs=inputs,
                                  outputs=outputs))
    export_onnx(gen, d / "stray_96x128.onnx", (96, 128))
    m = Manifest(schema_version=SCHEMA_VERSION, checkpoint={"sha256": "0" * 64}, tools={}, artifacts=artifacts)
    (d / "manifest.json").write_text(m.to_json())
    return d, gen


def _torch_prediction(gen, image, hole):
    """(rows,cols,3) float32 in [0,255] from PyTorch fp32, the engines' inpaint() convention."""
    import torch

    x = torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    m = torch.from_numpy(hole.astype(np.float32))[None, None]
    with torch.no_grad():
        y = gen(x, m)[0].permute(1, 2, 0).numpy()
    return np.clip((y + 1.0) * 127.5, 0, 255)


def test_onnxruntime_engines_come_from_the_manifest(onnx_export):
    d, gen = onnx_export
    es = open_engines("onnxruntime", artifacts=d, threads=1)
    assert es.shapes == [MODEL_SHAPE, PASS2_SHAPE]  # the stray 96x128 file is not an artifact
    assert es.base_shape == MODEL_SHAPE and "fp32" in es.source
    image, hole = photo(*MODEL_SHAPE, seed=3), np.zeros(MODEL_SHAPE, bool)
    hole[20:44, 30:60] = True
    eng = es.get(MODEL_SHAPE)
    assert [s.role for s in eng.input_specs()] == ["mask", "image"]  # from the manifest: the names say nothing
    got, want = eng.inpaint(image, hole), _torch_prediction(gen, image, hole)
    # measured 6.1e-5 levels here (onnxruntime 1.23 vs torch 2.13, fp32, 1 thread: 4 float32 ulps at 255); the
    # bound is the one test_runtime_engines uses for onnxruntime vs torch, room for other CPUs' kernels
    assert np.abs(got - want).max() < 1e-3
    with pytest.raises(UserError, match="no onnxruntime model at 96x128"):
        es.get((96, 128))


def test_explicit_precision_picks_or_refuses(onnx_export, tmp_path):
    d, _ = onnx_export
    assert open_engines("onnxruntime", artifacts=d, precision="fp32").source.endswith("fp32")
    with pytest.raises(UserError, match="no onnx tensor artifact at precision int8"):
        open_engines("onnxruntime", artifacts=d, precision="int8")
    cv2.imwrite(str(tmp_path / "photo.png"), photo(100, 140))
    cv2.imwrite(str(tmp_path / "mask.png"), np.full((100, 140), 255, np.uint8))
    out = tmp_path / "out.png"
    rc, _, err = run_cli("inpaint", tmp_path / "photo.png", tmp_path / "mask.png", "-o", out, "--engine", "onnxruntime",
                         "--artifacts", d, "--precision", "int8")
    assert rc == 2 and "at precision int8" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    rc, _, err = run_cli("inpaint", tmp_path / "photo.png", tmp_path / "mask.png", "-o", out, "--engine", "onnxruntime",
                         "--artifacts", d, "--precision", "fp32", "--threads", 1)
    assert rc == 0 and out.is_file(), err


@pytest.fixture(scope="module")
def onnx_bundle(onnx_export, tmp_path_factory):
    d, _ = onnx_export
    out = tmp_path_factory.mktemp("bundle") / "golden"
    rc, stdout, err = run_cli("golden", "--artifacts", d, "--out", out, "--cases", 2, "--threads", 1)
    assert rc == 0, err
    return out


def test_golden_bundle_of_onnx_artifacts_holds_what_onnxruntime_computes(onnx_export, onnx_bundle):
    """Each expected output equals a plain onnxruntime session run on the bundle's own stored inputs."""
    import onnxruntime as ort

    d, _ = onnx_export
    index = json.loads((onnx_bundle / "index.json").read_text())
    assert [a["format"] for a in index["artifacts"]] == ["onnx", "onnx"]
    assert [a["shape"] for a in index["artifacts"]] == [list(MODEL_SHAPE), list(PASS2_SHAPE)]
    for art in index["artifacts"]:
        assert art["sha256"] == hashlib.sha256((d / art["artifact"]).read_bytes()).hexdigest()
        assert "onnxruntime" in art["expected_from"] and len(art["cases"]) == 2
        session = ort.InferenceSession(str(d / art["artifact"]), providers=["CPUExecutionProvider"])
        for case in art["cases"]:
            feed = {e["name"]: golden.read_tensor(onnx_bundle / e["file"], e) for e in case["inputs"]}
            assert {e["name"]: e["role"] for e in case["inputs"]} == {"hole": "mask", "picture": "image"}
            assert set(np.unique(feed["hole"])) == {0.0, 1.0}
            (expected,) = case["expected"]
            want = session.run(["output"], feed)[0]
            np.testing.assert_allclose(golden.read_tensor(onnx_bundle / expected["file"], expected), want, atol=1e-6)
            assert expected["tolerance"] == {"max_abs": 1e-3, "min_psnr_db": 60.0, "psnr_peak": 2.0}
    pipe = index["pipeline"]
    assert pipe is not None and pipe["engine"].startswith("onnxruntime")
    assert all((onnx_bundle / s["file"]).is_file() for s in pipe["stages"])


def _device_copy(bundle, dst):
    """What a device that reproduces the bundle exactly would write: each expected file at its path."""
    index = json.loads((bundle / "index.json").read_text())
    files = [e["file"] for a in index["artifacts"] for c in a["cases"] for e in c["expected"]]
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(bundle / f, dst / f)
    return files


def test_compare_passes_copies_and_fails_a_wrong_size_device_file(onnx_bundle, tmp_path):
    dev = tmp_path / "device"
    files = _device_copy(onnx_bundle, dev)
    rc, out, err = run_cli("compare", onnx_bundle, dev)
    assert rc == 0 and f"{len(files)}/{len(files)} outputs pass" in out and err == ""

    short = dev / files[1]
    short.write_bytes(short.read_bytes()[:-4])  # one float32 value missing
    rc, out, err = run_cli("compare", onnx_bundle, dev, "--json", tmp_path / "rows.json")
    assert rc == 1 and f"{len(files) - 1}/{len(files)} outputs pass" in out
    report = json.loads((tmp_path / "rows.json").read_text())
    assert (report["outputs"], report["failed"]) == (len(files), 1)
    bad = [r for r in report["rows"] if not r["passed"]]
    assert len(bad) == 1 and bad[0]["max_abs"] is None
    want = 3 * MODEL_SHAPE[0] * MODEL_SHAPE[1] * 4
    assert f"{want - 4} bytes, expected {want}" in bad[0]["note"]


def test_wrong_size_png_device_file_is_reported(tmp_path):
    file, enc = golden.write_tensor(tmp_path, "out", np.zeros((1, 4, 6, 3), np.uint8))
    assert enc == "png"
    with pytest.raises(UserError, match=r"image is 6x4x3, expected shape \[1, 5, 6, 3\]"):
        golden.read_tensor(tmp_path / file, {"dtype": "uint8", "shape": [1, 5, 6, 3], "encoding": "png"})
