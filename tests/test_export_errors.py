"""One-line errors of the export (no conversion runs here: every case fails before TensorFlow)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from runtime_py.errors import MissingDependencyError, UserError

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "gmcnn_mobile", *args], capture_output=True, text=True, cwd=cwd,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_unknown_checkpoint_is_one_line(tmp_path):
    r = _cli("export", "--checkpoint", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gmcnn-mobile export: error:") and "nope.safetensors" in lines[0]
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_garbage_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    r = _cli("export", "--checkpoint", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("variant,shape,words", [
    ("tf", (62, 96), "multiple of 4"),
    ("torch", (100, 100), "too small"),
])
def test_bad_shapes(tmp_path, variant, shape, words):
    from export.api import export_artifacts
    from models.gmcnn import build_generator

    with pytest.raises(UserError, match=words):
        export_artifacts(build_generator(variant, 4, seed=0), tmp_path, shapes=[shape], formats=["tflite"],
                         progress=False)
    assert not any(tmp_path.iterdir())


def test_bad_shape_text_from_cli(tmp_path):
    r = _cli("export", "--out", str(tmp_path), "--shapes", "512by680")
    assert r.returncode == 2 and "ROWSxCOLS" in r.stderr


def test_unknown_precision_and_io(tmp_path):
    from export.api import export_artifacts
    from models.gmcnn import build_generator

    gen = build_generator("tf", 4, seed=0)
    with pytest.raises(UserError, match="unknown precision"):
        export_artifacts(gen, tmp_path, shapes=[(64, 96)], formats=["tflite"], precisions=["int4"], progress=False)
    with pytest.raises(UserError, match="unknown I/O"):
        export_artifacts(gen, tmp_path, shapes=[(64, 96)], formats=["tflite"], ios=["nchw"], progress=False)


def test_missing_tool_names_the_extra(monkeypatch, tmp_path):
    from export import tflite

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx2tf" else real(name, *a))
    with pytest.raises(MissingDependencyError) as err:
        tflite.check_available()
    assert "onnx2tf" in str(err.value) and "gmcnn-mobile[export]" in str(err.value)


def test_unknown_format_is_clear(tmp_path):
    from export.api import export_artifacts
    from models.gmcnn import build_generator

    with pytest.raises(UserError, match="unknown format 'tfjs'"):
        export_artifacts(build_generator("tf", 4, seed=0), tmp_path, shapes=[(64, 96)], formats=["tfjs"],
                         progress=False)


def test_format_without_backend_is_clear(monkeypatch):
    """A format whose backend module has not landed says so (how Core ML read before it landed)."""
    from export import backends

    monkeypatch.setitem(backends.FORMAT_MODULES, "coreml", "export.no_such_backend")
    assert "coreml" not in backends.available_formats()
    with pytest.raises(UserError, match="coreml format is not available yet"):
        backends.get_backend("coreml")


def test_empty_calibration_folder(tmp_path):
    from export.api import export_artifacts
    from models.gmcnn import build_generator

    empty = tmp_path / "photos"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        export_artifacts(build_generator("tf", 4, seed=0), tmp_path / "o", shapes=[(64, 96)], formats=["tflite"],
                         calibration=empty, progress=False)


def test_help_shows_defaults():
    r = _cli("export", "--help")
    assert r.returncode == 0
    for text in ("512x680,1024x1360", "tflite,coreml", "tensor,image", "--calibration", "default:"):
        assert text in r.stdout


def test_min_hole_psnr_override_rows_keep_the_other_limits():
    from export.cli import hole_psnr_overrides
    from export.parity import TOLERANCES

    rows = hole_psnr_overrides(["int8=30", "int8-dynamic=32.5"], ["tensor", "image"])
    assert rows[("int8", "tensor")] == {"min_hole_psnr_db": 30.0}
    assert rows[("int8", "image")] == {**TOLERANCES[("int8", "image")], "min_hole_psnr_db": 30.0}
    assert rows[("int8-dynamic", "image")]["max_known_pixels_changed"] == 0
    assert rows[("int8-dynamic", "tensor")]["min_hole_psnr_db"] == 32.5
    assert TOLERANCES[("int8", "tensor")]["min_hole_psnr_db"] != 30.0  # the table itself is untouched


@pytest.mark.parametrize("value, words", [("fp32=20", "only int8-dynamic, int8"), ("int8", "PRECISION=DB"),
                                          ("int8=abc", "PRECISION=DB"), ("int8=0", "PRECISION=DB")])
def test_min_hole_psnr_bad_values_are_one_line(tmp_path, value, words):
    r = _cli("export", "--out", str(tmp_path / "o"), "--formats", "tflite", "--min-hole-psnr", value)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_min_hole_psnr_reaches_the_export(monkeypatch, tmp_path):
    import export.api
    from gmcnn_mobile.cli import main

    seen = {}

    def fake_export(*args, **kwargs):
        seen.update(kwargs)
        raise UserError("stop here")

    monkeypatch.setattr(export.api, "export_artifacts", fake_export)
    rc = main(["export", "--out", str(tmp_path), "--formats", "tflite", "--io", "image",
               "--min-hole-psnr", "int8=31"])
    assert rc == 2
    assert seen["options"].tolerances == {("int8", "image"): {"min_hole_psnr_db": 31.0, "max_known_pixels_changed": 0}}
