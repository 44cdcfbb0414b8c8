"""An artifact is used only if it is the one its manifest describes, and a model that computes
NaN/Inf never yields an image: the hash recipe (recomputed from docs/MANIFEST.md without the
project's code), the engines' check before opening, the CLI's one-line refusal, the skip flag,
files without a manifest, and the engines' non-finite output check."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gmcnn_mobile.cli import main
from runtime_py.engines import open_engines
from runtime_py.errors import UserError
from runtime_py.manifest import SCHEMA_VERSION, ArtifactMismatch, artifact_digest, check_artifact, load_manifest

REPO = Path(__file__).resolve().parents[1]
TFLITE_DATA = Path(__file__).resolve().parent / "data" / "runtime_tflite"
SHAPE = (16, 24)  # the tiny LiteRT models of tests/data/runtime_tflite


# ------------------------------------------------------------------ the recipe, from the docs alone

def documented_digest(path: Path) -> str:
    """docs/MANIFEST.md "Artifact hash", written from its text with hashlib and os only."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    names = []
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), path).replace(os.sep, "/")
            names.append(rel.encode("utf-8"))
    text = b""
    for rel in sorted(names):  # bytes compare byte by byte, like LC_ALL=C sort
        content = (path / rel.decode("utf-8")).read_bytes()
        text += hashlib.sha256(content).hexdigest().encode() + b"  " + rel + b"\n"
    return hashlib.sha256(text).hexdigest()


def documented_shell_line() -> str:
    doc = (REPO / "docs" / "MANIFEST.md").read_text()
    section = doc.split("## Artifact hash", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```sh\n\s*(.+?)\n\s*```", section, re.S).group(1).strip()


@pytest.fixture
def package(tmp_path):
    """A directory shaped like an .mlpackage, with names whose order differs between sort rules:
    'a-b' < 'a/b' in bytes ('-' 0x2d, '/' 0x2f) but not component-wise; 'Z' < 'a'; UTF-8 after ASCII."""
    root = tmp_path / "m.mlpackage"
    files = {"Manifest.json": b'{"x": 1}', "Data/com.apple.CoreML/model.mlmodel": b"\x00model",
             "Data/com.apple.CoreML/weights/weight.bin": bytes(range(256)) * 3, "a-b": b"dash", "a/b": b"slash",
             "Z": b"upper", "\u00e9t\u00e9.bin": b"utf8", "empty": b""}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "Data" / "empty_dir").mkdir()
    return root, sum(len(v) for v in files.values())


def test_file_digest_is_the_plain_sha256(tmp_path):
    f = tmp_path / "x.tflite"
    shutil.copy(TFLITE_DATA / "tensor.tflite", f)
    assert artifact_digest(f) == (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_size)


def test_package_digest_follows_the_documented_recipe(package):
    root, size = package
    sha, n = artifact_digest(root)
    assert n == size
    assert sha == documented_digest(root)
    # the names make the sort rule matter: by path components (how pathlib sorts) 'a/b' precedes 'a-b'
    names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    assert sorted(names, key=lambda n: n.encode()) != sorted(names, key=lambda n: n.split("/"))


def test_documented_shell_line_gives_the_same_digest(package):
    if shutil.which("sha256sum") is None or shutil.which("bash") is None:
        pytest.skip("GNU coreutils' sha256sum is not installed")
    root, _ = package
    r = subprocess.run(["bash", "-c", documented_shell_line()], cwd=root, capture_output=True, text=True,
                       env={**os.environ, "LC_ALL": "C"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == artifact_digest(root)[0]


def test_real_mlpackage_digest_matches_the_docs():
    pytest.importorskip("coremltools")
    from coreml_fixtures import tiny_artifact

    pkg = tiny_artifact("fp16", "tensor")
    sha, size = artifact_digest(pkg)
    assert sha == documented_digest(pkg)
    assert size == sum(p.stat().st_size for p in pkg.rglob("*") if p.is_file())
    if shutil.which("sha256sum"):
        r = subprocess.run(["bash", "-c", documented_shell_line()], cwd=pkg, capture_output=True, text=True)
        assert r.stdout.strip() == sha


def test_symlink_inside_a_package_is_refused(package):
    root, _ = package
    (root / "link").symlink_to(root / "Manifest.json")
    with pytest.raises(UserError, match="symbolic link"):
        artifact_digest(root)


# ------------------------------------------------------------------ engines check before opening

def write_manifest(d: Path, files=("tensor.tflite", "image.tflite")) -> Path:
    """manifest.json for copies of the tiny LiteRT models in ``d``, digests by the runtime's recipe."""
    arts = []
    for name in files:
        io = name.split(".")[0]
        dtype, rng = ("float32", [-1, 1]) if io == "tensor" else ("uint8", [0, 255])
        sha, size = artifact_digest(d / name)
        tensors = [{"name": n, "shape": [1, *SHAPE, c], "dtype": dtype, "layout": "NHWC", "value_range": rng,
                    "role": n} for n, c in (("mask", 1), ("image", 3))]  # these two files declare mask first
        arts.append({"file": name, "format": "tflite", "shape": list(SHAPE), "precision": "fp32", "io": io,
                     "sha256": sha, "bytes": size, "inputs": tensors,
                     "outputs": [{"name": "output", "shape": [1, *SHAPE, 3], "dtype": dtype, "layout": "NHWC",
                                  "value_range": rng, "role": "output"}]})
    (d / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "checkpoint": {}, "tools": {},
                                                 "artifacts": arts}))
    return d


def tiny_export(d: Path) -> Path:
    pytest.importorskip("ai_edge_litert", reason="LiteRT is part of the runtime extra")
    d.mkdir(parents=True, exist_ok=True)
    for name in ("tensor.tflite", "image.tflite"):
        shutil.copy(TFLITE_DATA / name, d / name)
    return write_manifest(d)


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def set_fill_weight(path: Path, value: float) -> None:
    """Replace tensor.tflite's one 0.5 constant (output = image*(1-mask) + 0.5*mask): a weight edit."""
    data = path.read_bytes()
    half = struct.pack("<f", 0.5)
    assert data.count(half) == 1
    path.write_bytes(data.replace(half, struct.pack("<f", value)))


def test_engine_refuses_a_changed_file_naming_it_and_both_digests(tmp_path):
    d = tiny_export(tmp_path / "art")
    art = load_manifest(d).artifacts[0]
    check_artifact(d / art.file, art)  # the untouched file passes
    flip_last_byte(d / art.file)
    actual = hashlib.sha256((d / art.file).read_bytes()).hexdigest()
    es = open_engines("tflite", artifacts=d, io="tensor")
    with pytest.raises(ArtifactMismatch) as exc:
        es.get(SHAPE)
    msg = str(exc.value)
    assert str(d / art.file) in msg and actual in msg and art.sha256 in msg and "\n" not in msg
    assert "--allow-modified-artifacts" in msg
    # same size, other bytes; and a truncated file: size differs too
    (d / art.file).write_bytes((d / art.file).read_bytes()[:-8])
    with pytest.raises(ArtifactMismatch, match=rf"\({art.bytes - 8} bytes\), manifest {art.sha256} \({art.bytes} bytes\)"):
        open_engines("tflite", artifacts=d, io="tensor").get(SHAPE)


def test_skip_flag_runs_a_changed_file(tmp_path):
    d = tiny_export(tmp_path / "art")
    flip_last_byte(d / "image.tflite")  # the last byte is padding/metadata: the model still runs
    es = open_engines("tflite", artifacts=d, io="image", verify=False)
    assert "not verified" in es.describe()
    pred = es.get(SHAPE).inpaint(np.zeros((*SHAPE, 3), np.uint8), np.ones(SHAPE, bool))
    assert np.all(pred == 200.0)


def test_single_file_is_checked_against_the_manifest_beside_it(tmp_path):
    d = tiny_export(tmp_path / "art")
    es = open_engines("tflite", artifacts=d / "tensor.tflite")
    assert "not verified" not in es.describe() and es.base_shape == SHAPE
    flip_last_byte(d / "tensor.tflite")
    with pytest.raises(ArtifactMismatch):
        open_engines("tflite", artifacts=d / "tensor.tflite")
    # the same file alone, with no manifest: nothing to check against, used and said so
    lone = tmp_path / "lone" / "tensor.tflite"
    lone.parent.mkdir()
    shutil.copy(TFLITE_DATA / "tensor.tflite", lone)
    es = open_engines("tflite", artifacts=lone)
    assert "no manifest: not verified" in es.describe()


def _photo_and_mask(tmp_path: Path):
    import cv2

    from helpers import write_photos

    img, mask = write_photos(tmp_path, [(40, 60)], names=["photo.png"]) / "photo.png", tmp_path / "mask.png"
    m = np.zeros((40, 60), np.uint8)
    m[10:20, 20:40] = 255
    cv2.imwrite(str(mask), m)
    return img, mask


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_inpaint_refuses_a_tampered_artifact_in_one_line(tmp_path, capsys):
    d = tiny_export(tmp_path / "art")
    img, mask = _photo_and_mask(tmp_path)
    before = {p: _sha(p) for p in (img, mask)}
    out = tmp_path / "out.png"
    args = ["inpaint", str(img), str(mask), "-o", str(out), "--engine", "tflite", "--artifacts", str(d),
            "--crop", "off", "--quiet"]
    assert main(args) == 0 and out.is_file()
    out.unlink()
    set_fill_weight(d / "tensor.tflite", 0.25)  # one weight changed, same size
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"gmcnn-mobile inpaint: error: {d / 'tensor.tflite'}: not the artifact the manifest describes")
    assert _sha(d / "tensor.tflite") in err and load_manifest(d).artifacts[0].sha256 in err
    assert not out.exists() and not list(tmp_path.glob(".out.png*"))
    assert before == {p: _sha(p) for p in (img, mask)}
    assert main(args + ["--allow-modified-artifacts"]) == 0 and out.is_file()


# ------------------------------------------------------------------ non-finite outputs

def test_nan_output_is_an_error_naming_engine_artifact_and_count(tmp_path, capsys):
    d = tiny_export(tmp_path / "art")
    set_fill_weight(d / "tensor.tflite", float("nan"))
    es = open_engines("tflite", artifacts=d, io="tensor", verify=False)
    with pytest.raises(UserError) as exc:
        es.get(SHAPE).inpaint(np.zeros((*SHAPE, 3), np.uint8), np.zeros(SHAPE, bool))
    # NaN * 0 is NaN: every value of the (1,16,24,3) output
    assert f"tflite engine: {d / 'tensor.tflite'}: output 'Identity' has 1152 NaN/Inf value(s) of 1152" in str(exc.value)
    # through the CLI: one line, nothing written, even with the digest check skipped
    img, mask = _photo_and_mask(tmp_path)
    out = tmp_path / "out.png"
    assert main(["inpaint", str(img), str(mask), "-o", str(out), "--engine", "tflite", "--artifacts", str(d),
                 "--crop", "off", "--quiet", "--allow-modified-artifacts"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NaN/Inf" in err and "tensor.tflite" in err
    assert not out.exists()


def test_infinite_output_of_any_engine_is_refused():
    from runtime_py.engines.base import Engine, TensorSpec

    class InfEngine(Engine):
        name = "fake"

        def activate_impl(self):
            pass

        def input_specs(self):
            return [TensorSpec("image", (1, 4, 6, 3), "float32", "image"), TensorSpec("mask", (1, 4, 6, 1), "float32", "mask")]

        def output_specs(self):
            return [TensorSpec("out", (1, 4, 6, 3), "float32", "output")]

        def infer_impl(self, feed):
            y = np.zeros((1, 4, 6, 3), np.float32)
            y[0, 1, 2, :2] = np.inf
            y[0, 3, 5, 0] = -np.inf
            return {"out": y}

    with pytest.raises(UserError, match=r"fake engine: fake tensor 4x6: output 'out' has 3 NaN/Inf value\(s\) of 72"):
        InfEngine((4, 6)).inpaint(np.zeros((4, 6, 3), np.uint8), np.ones((4, 6), bool))
