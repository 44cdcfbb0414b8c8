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
    return subprocess.run([sys.executable, "-m", "runtime_py.cli", *args], capture_output=True, text=True, cwd=cwd,
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
