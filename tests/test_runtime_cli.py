"""``gmcnn-mobile inpaint`` end to end with the tiny model: outputs, bad inputs, determinism."""
from __future__ import annotations

import json
import sys

import cv2
import numpy as np
import pytest

from helpers import blob_hole, make_checkpoint, photo
from gmcnn_mobile.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    cv2.imwrite(str(d / "photo.png"), photo()[:, :, ::-1])
    cv2.imwrite(str(d / "photo.jpg"), photo()[:, :, ::-1])
    cv2.imwrite(str(d / "mask.png"), blob_hole().astype(np.uint8) * 255)
    cv2.imwrite(str(d / "small_mask.png"), np.full((100, 100), 255, np.uint8))
    cv2.imwrite(str(d / "empty_mask.png"), np.zeros((300, 420), np.uint8))
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    (d / "zero.png").write_bytes(b"")
    make_checkpoint(d / "tiny.safetensors")
    return d


def inpaint(files, out, *extra, image="photo.png", mask="mask.png"):
    args = ["inpaint", str(files / image), str(files / mask), "-o", str(out),
            "--checkpoint", str(files / "tiny.safetensors"), "--model-shape", "64x88", "--threads", "1", *extra]
    return main(args)


@pytest.mark.parametrize("mode", ["baseline", "two-step+shrink"])
def test_inpaint_writes_result_and_summary(files, tmp_path, capsys, mode):
    out = tmp_path / "out.png"
    assert inpaint(files, out, "--mode", mode, "--tiles", "on", "--summary-json", str(tmp_path / "s.json")) == 0
    res = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)[:, :, ::-1]
    hole = blob_hole()
    assert res.shape == (300, 420, 3) and np.array_equal(res[~hole], photo()[~hole])
    captured = capsys.readouterr()
    assert "model run 1:" in captured.err
    assert "model runs" in captured.out and "tiles" in captured.out and "time" in captured.out
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["model_runs"] == len(s["runs"]) >= 1 and s["mode"] == mode
    assert "model" in s["stage_seconds"] and "write" in s["stage_seconds"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "s.json"]  # no temp files left


def test_two_runs_give_identical_bytes(files, tmp_path):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    assert inpaint(files, a, "--mode", "two-step", "--tiles", "on", "--quiet", image="photo.jpg") == 0
    assert inpaint(files, b, "--mode", "two-step", "--tiles", "on", "--quiet", image="photo.jpg") == 0
    assert a.read_bytes() == b.read_bytes()


def test_empty_mask_copies_image_and_runs_nothing(files, tmp_path, capsys):
    out = tmp_path / "o.png"
    assert inpaint(files, out, mask="empty_mask.png") == 0
    assert np.array_equal(cv2.imread(str(out)), cv2.imread(str(files / "photo.png")))
    cap = capsys.readouterr()
    assert "model runs   0" in cap.out and "mask is empty" in cap.err


def test_trace_dir(files, tmp_path):
    assert inpaint(files, tmp_path / "o.png", "--trace", str(tmp_path / "tr"), "--quiet") == 0
    index = json.loads((tmp_path / "tr" / "index.json").read_text())
    assert index["stages"][0]["name"] == "input" and (tmp_path / "tr" / index["stages"][-1]["png"]).exists()


@pytest.mark.parametrize("case,match", [
    (dict(image="corrupt.jpg"), "cannot decode the image"),
    (dict(image="missing.jpg"), "image file not found"),
    (dict(mask="zero.png"), "mask file is empty"),
    (dict(mask="small_mask.png"), "must be the same size"),
    (dict(out="photo.png"), "would overwrite the input"),
    (dict(out="mask.png"), "would overwrite the input"),
    (dict(out="result.gif"), "unsupported output format"),
    (dict(ckpt="nope.safetensors"), "nope.safetensors"),
])
def test_bad_input_one_error_line_no_output(files, tmp_path, capsys, case, match):
    out = files / case["out"] if "out" in case else tmp_path / "o.png"
    before = {p.name: p.stat().st_mtime_ns for p in files.iterdir()}
    args = ["inpaint", str(files / case.get("image", "photo.png")), str(files / case.get("mask", "mask.png")),
            "-o", str(out), "--checkpoint", str(files / case.get("ckpt", "tiny.safetensors")), "--model-shape", "64x88"]
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("gmcnn-mobile inpaint: error: ") and match in err[-1]
    assert list(tmp_path.iterdir()) == []
    assert {p.name: p.stat().st_mtime_ns for p in files.iterdir()} == before  # inputs untouched


def test_missing_backend_is_a_clear_error(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    (tmp_path / "m.onnx").write_bytes(b"x")
    rc = main(["inpaint", str(files / "photo.png"), str(files / "mask.png"), "-o", str(tmp_path / "o.png"),
               "--engine", "onnxruntime", "--artifacts", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and "onnxruntime is not installed" in err and "gmcnn-mobile[runtime]" in err
    assert not (tmp_path / "o.png").exists()


def test_missing_default_checkpoint(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GMCNN_CHECKPOINT", str(tmp_path / "absent.safetensors"))
    rc = main(["inpaint", str(files / "photo.png"), str(files / "mask.png"), "-o", str(tmp_path / "o.png")])
    assert rc == 2 and "absent.safetensors" in capsys.readouterr().err and not (tmp_path / "o.png").exists()


def test_engine_source_mismatch(files, tmp_path, capsys):
    rc = main(["inpaint", str(files / "photo.png"), str(files / "mask.png"), "-o", str(tmp_path / "o.png"),
               "--engine", "tflite"])
    assert rc == 2 and "needs --artifacts" in capsys.readouterr().err


def test_demo_writes_result_and_side_by_side(files, tmp_path, capsys, monkeypatch):
    from runtime_py import inpaint_cli

    demo = tmp_path / "demo"
    demo.mkdir()
    cv2.imwrite(str(demo / "photo.jpg"), photo()[:, :, ::-1])
    cv2.imwrite(str(demo / "photo_mask.png"), blob_hole().astype(np.uint8) * 255)
    (demo / "LICENSE.md").write_text("test")
    monkeypatch.setattr(inpaint_cli, "DEMO_DIR", demo)
    monkeypatch.setenv("GMCNN_CHECKPOINT", str(files / "tiny.safetensors"))
    out = tmp_path / "out"
    assert main(["demo", "--out-dir", str(out), "--model-shape", "64x88", "--threads", "1", "--quiet"]) == 0
    res = cv2.imread(str(out / "demo_result.jpg"))
    assert res.shape == (300, 420, 3)
    sbs = cv2.imread(str(out / "demo_side_by_side.jpg"))
    assert sbs.shape[0] == 480 and sbs.shape[1] > 3 * 480
    assert "demo_side_by_side.jpg" in capsys.readouterr().out


def test_demo_without_demo_files_says_so(tmp_path, capsys, monkeypatch):
    from runtime_py import inpaint_cli

    monkeypatch.setattr(inpaint_cli, "DEMO_DIR", tmp_path / "nothing")
    assert main(["demo", "--out-dir", str(tmp_path / "out")]) == 2
    assert "demo photo is not shipped" in capsys.readouterr().err


def test_exif_rotated_portrait_photo_end_to_end(files, tmp_path):
    """A landscape JPEG stored with EXIF orientation 6 is a portrait photo: the mask is drawn on
    the portrait, the pipeline rotates it to landscape for the model and back, and the output
    is written upright."""
    from PIL import Image

    stored = photo(300, 420)
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    upright = cv2.imread(str(tmp_path / "portrait.jpg"), cv2.IMREAD_COLOR)  # OpenCV applies the EXIF rotation
    assert upright.shape == (420, 300, 3)
    hole = np.zeros((420, 300), np.uint8)
    hole[200:260, 100:180] = 255
    cv2.imwrite(str(tmp_path / "portrait_mask.png"), hole)
    out = tmp_path / "out.png"
    summary = tmp_path / "s.json"
    rc = main(["inpaint", str(tmp_path / "portrait.jpg"), str(tmp_path / "portrait_mask.png"), "-o", str(out),
               "--checkpoint", str(files / "tiny.safetensors"), "--model-shape", "64x88", "--threads", "1",
               "--crop", "off", "--summary-json", str(summary), "--quiet"])
    assert rc == 0 and json.loads(summary.read_text())["rotated"] is True
    res = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert res.shape == (420, 300, 3)
    assert np.array_equal(res[hole == 0], upright[hole == 0])


def test_trace_path_that_is_a_file(files, tmp_path, capsys):
    (tmp_path / "t").write_text("x")
    assert inpaint(files, tmp_path / "o.png", "--trace", str(tmp_path / "t")) == 2
    assert "the --trace folder names an existing file" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_transient_indirection_flag_gives_the_same_bytes_and_needs_xnnpack(files, tmp_path, capsys):
    """``--transient-indirection`` runs the tflite engine through LiteRT's C API: the same output file; with
    ``--no-xnnpack`` (or another engine) it is one error line and no output."""
    pytest.importorskip("ai_edge_litert", reason="LiteRT is part of the runtime extra")
    from pathlib import Path

    model = Path(__file__).resolve().parent / "data" / "runtime_tflite" / "tensor.tflite"
    base = ["inpaint", str(files / "photo.png"), str(files / "mask.png"), "--engine", "tflite",
            "--artifacts", str(model), "--threads", "1", "--quiet"]
    outs = [tmp_path / "kept.png", tmp_path / "transient.png"]
    assert main([*base, "-o", str(outs[0])]) == 0
    assert main([*base, "-o", str(outs[1]), "--transient-indirection"]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    capsys.readouterr()
    bad = tmp_path / "bad.png"
    for extra in (["--no-xnnpack"], ["--engine", "onnxruntime"]):
        assert main([*base, "-o", str(bad), "--transient-indirection", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--transient-indirection is an XNNPACK option" in err[0], err
        assert not bad.exists()
