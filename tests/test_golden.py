"""Golden bundle: `gmcnn-mobile golden` writes inputs/expected outputs/pipeline stages; `compare` checks device outputs."""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime_py import golden  # noqa: E402
from gmcnn_mobile.cli import main  # noqa: E402


def strict_json(text: str):
    """json.loads that rejects the NaN / Infinity tokens strict parsers (RFC 8259) reject."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------ encoding (no coremltools needed)

@pytest.mark.parametrize("arr", [
    np.arange(3 * 4 * 3, dtype=np.uint8).reshape(1, 3, 4, 3) * 3,   # NHWC RGB -> PNG
    np.arange(12, dtype=np.uint8).reshape(1, 3, 4, 1) * 20,            # NHWC gray -> PNG
    np.arange(12, dtype=np.uint8).reshape(3, 4) * 20,                  # HW mask -> PNG
    np.linspace(-1, 1, 24, dtype=np.float32).reshape(1, 2, 3, 4),      # float -> raw
    np.arange(-6, 6, dtype=np.int8).reshape(1, 3, 4),                  # int8 -> raw
])
def test_tensor_roundtrip_is_lossless(tmp_path, arr):
    file, enc = golden.write_tensor(tmp_path, "t", arr)
    assert enc == ("png" if arr.dtype == np.uint8 else "raw")
    entry = {"dtype": str(arr.dtype), "shape": list(arr.shape), "encoding": enc}
    back = golden.read_tensor(tmp_path / file, entry)
    assert back.dtype == arr.dtype
    np.testing.assert_array_equal(back, arr)


def test_raw_files_are_little_endian(tmp_path):
    golden.write_tensor(tmp_path, "x", np.array([1.0], np.float32))
    assert (tmp_path / "x.bin").read_bytes() == b"\x00\x00\x80\x3f"


def test_wrong_size_device_file_is_reported(tmp_path):
    golden.write_tensor(tmp_path, "x", np.zeros((1, 2, 2), np.float32))
    with pytest.raises(golden.UserError, match="16 bytes, expected 32"):
        golden.read_tensor(tmp_path / "x.bin", {"dtype": "float32", "shape": [1, 4, 2], "encoding": "raw"})


# ------------------------------------------------------------------ with real Core ML artifacts

@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    pytest.importorskip("coremltools")
    from coreml_fixtures import TINY_TF_SHAPE, tiny_artifact

    from export.coreml import manifest_artifact
    from runtime_py.manifest import SCHEMA_VERSION, Manifest

    d = tmp_path_factory.mktemp("export")
    arts = []
    for precision, io in (("fp16", "tensor"), ("w8", "image")):
        dst = d / f"gmcnn_{precision}_{io}.mlpackage"
        shutil.copytree(tiny_artifact(precision, io), dst)
        arts.append(manifest_artifact(dst, TINY_TF_SHAPE, precision, io, relative_to=d))
    m = Manifest(schema_version=SCHEMA_VERSION, checkpoint={"sha256": "0" * 64}, tools={}, artifacts=arts)
    (d / "manifest.json").write_text(m.to_json())
    return d


@pytest.fixture(scope="module")
def bundle(export_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "bundle"
    assert main(["golden", "--artifacts", str(export_dir), "--out", str(out)]) == 0
    return out


def test_bundle_layout_and_index(bundle):
    index = json.loads((bundle / "index.json").read_text())
    assert index["schema"] == golden.BUNDLE_SCHEMA and len(index["artifacts"]) == 2
    tensor_art, image_art = index["artifacts"]
    assert "coreml-reference-executor" in tensor_art["expected_from"]
    case = tensor_art["cases"][0]
    ins = {e["name"]: e for e in case["inputs"]}
    assert ins["image"]["encoding"] == "raw" and ins["image"]["dtype"] == "float32" and ins["image"]["shape"] == [1, 3, 64, 96]
    assert ins["mask"]["layout"] == "NCHW"
    out = case["expected"][0]
    assert out["encoding"] == "raw" and out["tolerance"]["psnr_peak"] == 2.0
    img_case = image_art["cases"][0]
    assert {e["encoding"] for e in img_case["inputs"] + img_case["expected"]} == {"png"}
    assert img_case["expected"][0]["tolerance"]["max_abs"] == golden.DEVICE_TOLERANCES["w8"]["max_abs_u8"]
    for e in case["inputs"] + case["expected"] + img_case["inputs"] + img_case["expected"]:
        assert (bundle / e["file"]).is_file()
    # known pixels of the image artifact's expected composite equal its input image
    ie = {e["name"]: e for e in img_case["inputs"]}
    image = golden.read_tensor(bundle / ie["image"]["file"], ie["image"])
    mask = golden.read_tensor(bundle / ie["mask"]["file"], ie["mask"])
    expected = golden.read_tensor(bundle / img_case["expected"][0]["file"], img_case["expected"][0])
    known = mask[..., 0] < 128
    np.testing.assert_array_equal(expected[known], image[known])
    assert not list(bundle.parent.glob(".*partial"))


def test_bundle_has_pipeline_stages(bundle):
    index = json.loads((bundle / "index.json").read_text())
    pipe = index["pipeline"]
    assert pipe is not None and "coreml" in pipe["engine"]
    names = [s["name"] for s in pipe["stages"]]
    assert names[:2] == ["input", "mask"] and len(names) >= 3
    for s in pipe["stages"]:
        assert (bundle / s["file"]).is_file()
        assert s["encoding"] == ("png" if s["dtype"] == "uint8" else "raw")
    assert (bundle / pipe["result"]["file"]).is_file()


def _device_copy(bundle, tmp_path):
    dev = tmp_path / "device"
    index = json.loads((bundle / "index.json").read_text())
    for art in index["artifacts"]:
        for case in art["cases"]:
            for e in case["expected"]:
                (dev / e["file"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(bundle / e["file"], dev / e["file"])
    return dev, index


def test_compare_passes_identical_outputs(bundle, tmp_path, capsys):
    dev, _ = _device_copy(bundle, tmp_path)
    report = tmp_path / "rows.json"
    assert main(["compare", str(bundle), str(dev), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "2/2 outputs pass" in out and "inf" in out and "FAIL" not in out
    body = strict_json(report.read_text())  # identical outputs: infinite PSNR, written as null
    assert body["passed"] == 2 and all(r["psnr_db"] is None and r["identical"] for r in body["rows"])


def test_compare_fails_perturbed_and_missing_outputs(bundle, tmp_path, capsys):
    dev, index = _device_copy(bundle, tmp_path)
    e = index["artifacts"][0]["cases"][0]["expected"][0]  # float tensor output
    arr = golden.read_tensor(dev / e["file"], e)
    arr = arr.copy()
    arr[0, 0, 5, 5] += 0.5  # one value off by far more than the fp16 tolerance
    golden.write_tensor((dev / e["file"]).parent, e["name"], arr)
    img = index["artifacts"][1]["cases"][0]["expected"][0]
    (dev / img["file"]).unlink()
    report = tmp_path / "rows.json"
    assert main(["compare", str(bundle), str(dev), "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert "0/2 outputs pass" in out and "missing" in out and "max_abs<=0.5" in out
    rows = strict_json(report.read_text())["rows"]
    assert rows[0]["max_abs"] == pytest.approx(0.5, abs=1e-3) and rows[0]["passed"] is False
    assert rows[1]["max_abs"] is None and "missing" in rows[1]["note"]


def test_compare_small_difference_within_tolerance_passes(bundle, tmp_path):
    dev, index = _device_copy(bundle, tmp_path)
    img = index["artifacts"][1]["cases"][0]["expected"][0]
    arr = golden.read_tensor(dev / img["file"], img).astype(np.int16)
    arr[0, 10:12, 10:12] = np.clip(arr[0, 10:12, 10:12] + 1, 0, 255)  # one 8-bit level on a few pixels
    golden.write_tensor((dev / img["file"]).parent, img["name"], arr.astype(np.uint8))
    rows = golden.compare_bundle(bundle, dev)
    assert all(r.passed for r in rows) and rows[1].max_abs == 1


def test_bad_bundle_and_device_dirs_are_one_line_errors(tmp_path, capsys, bundle):
    assert main(["compare", str(tmp_path), str(tmp_path)]) == 2
    assert "not a golden bundle" in capsys.readouterr().err
    assert main(["compare", str(bundle), str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["golden", "--artifacts", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "no export manifest" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_golden_and_executor_modules_import_without_heavy_frameworks():
    import subprocess
    import textwrap

    code = textwrap.dedent('''
        import sys
        import runtime_py.golden, runtime_py.golden_cli, runtime_py.mil_executor, runtime_py.mil_ops
        from gmcnn_mobile.cli import build_parser
        build_parser()
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "tensorflow", "coremltools"))
        assert not heavy, heavy
    ''')
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=str(Path(__file__).resolve().parents[1]))
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ with the tiny LiteRT models (fast)

@pytest.fixture(scope="module")
def tflite_export(tmp_path_factory):
    from test_artifact_check import tiny_export

    return tiny_export(tmp_path_factory.mktemp("tfl") / "art")


@pytest.fixture(scope="module")
def tflite_bundle(tflite_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("tb") / "bundle"
    assert main(["golden", "--artifacts", str(tflite_export), "--out", str(out), "--cases", "2"]) == 0
    return out


def test_artifact_folders_are_keyed_by_the_whole_file_name():
    names = ["gmcnn_tf_c4_64x96_tensor_fp16.tflite", "gmcnn_tf_c4_64x96_tensor_fp16.mlpackage"]
    folders = [golden.artifact_folder(n) for n in names]
    assert folders == ["gmcnn_tf_c4_64x96_tensor_fp16_tflite", "gmcnn_tf_c4_64x96_tensor_fp16_mlpackage"]


def test_bundle_records_digests_positional_inputs_and_folders(tflite_bundle, tflite_export):
    from ai_edge_litert.interpreter import Interpreter

    from runtime_py.manifest import load_manifest

    index = strict_json((tflite_bundle / "index.json").read_text())
    manifest = {a.file: a for a in load_manifest(tflite_export).artifacts}
    for art in index["artifacts"]:
        m = manifest[art["artifact"]]
        assert (art["sha256"], art["bytes"], art["matches_manifest"]) == (m.sha256, m.bytes, True)
        assert art["folder"] == golden.artifact_folder(art["artifact"]) and len(art["cases"]) == 2
        # these two files declare the mask first: the case lists inputs in the file's own order
        it = Interpreter(model_path=str(tflite_export / art["artifact"]))
        for case in art["cases"]:
            assert [e["name"] for e in case["inputs"]] == [d["name"] for d in it.get_input_details()] == ["mask", "image"]
            for e in case["inputs"] + case["expected"]:
                assert e["file"].startswith(f"{art['folder']}/{case['name']}/") and (tflite_bundle / e["file"]).is_file()


def test_bundle_pipeline_records_its_settings_and_unique_stage_names(tflite_bundle):
    pipe = strict_json((tflite_bundle / "index.json").read_text())["pipeline"]
    assert pipe["io"] == "tensor" and pipe["precision"] == "fp32" and pipe["artifacts"] == ["tensor.tflite"]
    assert (pipe["mode"], pipe["crop"], pipe["tiles"], pipe["mask_threshold"], pipe["dilate_px"]) == \
        ("baseline", "auto", "auto", 128, 0)
    assert pipe["model_shape"] == [16, 24] and pipe["passes"][0]["pass"] == 1
    names = [s["name"] for s in pipe["stages"]]
    assert len(names) == len(set(names)) and "pass1_mask" in names and "pass1_model_mask" in names


def _tflite_device_copy(bundle, dev):
    index = strict_json((bundle / "index.json").read_text())
    for art in index["artifacts"]:
        for case in art["cases"]:
            for e in case["expected"]:
                (dev / e["file"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(bundle / e["file"], dev / e["file"])
    return index


def test_golden_refuses_a_tampered_artifact_and_writes_nothing(tflite_export, tmp_path, capsys):
    d = tmp_path / "art"
    shutil.copytree(tflite_export, d)
    raw = bytearray((d / "image.tflite").read_bytes())
    raw[-1] ^= 1
    (d / "image.tflite").write_bytes(bytes(raw))
    out = tmp_path / "bundle"
    assert main(["golden", "--artifacts", str(d), "--out", str(out), "--no-pipeline"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not the artifact the manifest describes" in err and "image.tflite" in err
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))
    # on purpose: the bundle records the digest of the file it ran, and that it differs from the manifest
    assert main(["golden", "--artifacts", str(d), "--out", str(out), "--no-pipeline", "--allow-modified-artifacts"]) == 0
    arts = {a["artifact"]: a for a in strict_json((out / "index.json").read_text())["artifacts"]}
    assert arts["image.tflite"]["matches_manifest"] is False and arts["tensor.tflite"]["matches_manifest"] is True
    assert arts["image.tflite"]["sha256"] == hashlib.sha256(bytes(raw)).hexdigest()


def test_golden_refuses_nan_outputs_and_writes_nothing(tflite_export, tmp_path, capsys):
    from test_artifact_check import set_fill_weight

    d = tmp_path / "art"
    shutil.copytree(tflite_export, d)
    set_fill_weight(d / "tensor.tflite", float("nan"))
    out = tmp_path / "bundle"
    assert main(["golden", "--artifacts", str(d), "--out", str(out), "--allow-modified-artifacts"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NaN/Inf" in err and "tensor.tflite" in err
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))


def test_compare_reports_nan_and_inf_per_output_and_writes_strict_json(tflite_bundle, tmp_path, capsys):
    dev = tmp_path / "dev"
    index = _tflite_device_copy(tflite_bundle, dev)
    art = next(a for a in index["artifacts"] if a["artifact"] == "tensor.tflite")
    e0, e1 = art["cases"][0]["expected"][0], art["cases"][1]["expected"][0]
    y = golden.read_tensor(dev / e0["file"], e0).copy()
    y[0, 2, 3, 1] = np.nan
    y[0, 5, 0, 0] = np.inf
    golden.write_tensor((dev / e0["file"]).parent, e0["name"], y)
    golden.write_tensor((dev / e1["file"]).parent, e1["name"], np.full(e1["shape"], np.nan, np.float32))
    report = tmp_path / "rows.json"
    assert main(["compare", str(tflite_bundle), str(dev), "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert "2 NaN/Inf value(s) (device 2, bundle 0), first at [0, 2, 3, 1]" in out
    assert "1152 NaN/Inf value(s) (device 1152, bundle 0), first at [0, 0, 0, 0]" in out
    rows = {(r["artifact"], r["case"]): r for r in strict_json(report.read_text())["rows"]}
    r0, r1 = rows[("tensor.tflite", "case0")], rows[("tensor.tflite", "case1")]
    assert (r0["passed"], r0["nonfinite"], r0["first_nonfinite"], r0["max_abs"]) == (False, 2, [0, 2, 3, 1], 0.0)
    assert (r1["passed"], r1["nonfinite"], r1["max_abs"], r1["psnr_db"]) == (False, 1152, None, None)
    assert rows[("image.tflite", "case0")]["passed"] is True


def test_compare_survives_nan_in_the_bundle_itself(tflite_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tflite_bundle, bundle)
    dev = tmp_path / "dev"
    index = _tflite_device_copy(bundle, dev)
    e = next(a for a in index["artifacts"] if a["artifact"] == "tensor.tflite")["cases"][0]["expected"][0]
    golden.write_tensor((bundle / e["file"]).parent, e["name"], np.full(e["shape"], -np.inf, np.float32))
    rows = golden.compare_bundle(bundle, dev, names=["tensor.tflite"])
    bad = next(r for r in rows if r.case == "case0")
    assert not bad.passed and bad.nonfinite == int(np.prod(e["shape"])) and "bundle 1152" in bad.note
    assert "bundle 1152" in golden.format_table(rows)


def test_compare_selects_artifacts(tflite_bundle, tmp_path, capsys):
    dev = tmp_path / "dev"
    index = _tflite_device_copy(tflite_bundle, dev)
    shutil.rmtree(dev / next(a for a in index["artifacts"] if a["artifact"] == "tensor.tflite")["folder"])
    assert main(["compare", str(tflite_bundle), str(dev)]) == 1  # the tensor file's outputs are missing
    capsys.readouterr()
    assert main(["compare", str(tflite_bundle), str(dev), "--artifact", "image.*"]) == 0
    assert "2/2 outputs pass" in capsys.readouterr().out
    assert main(["compare", str(tflite_bundle), str(dev), "--format", "tflite", "--precision", "fp32"]) == 1
    capsys.readouterr()
    for flags in (["--format", "coreml"], ["--precision", "int8"], ["--artifact", "nothing*"]):
        assert main(["compare", str(tflite_bundle), str(dev)] + flags) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no artifact of the bundle matches" in err and "image.tflite" in err


def test_compare_odd_index_and_device_files_are_one_line_or_a_failed_row(tflite_bundle, tmp_path, capsys):
    import cv2

    bundle = tmp_path / "bundle"
    shutil.copytree(tflite_bundle, bundle)
    dev = tmp_path / "dev"
    index = _tflite_device_copy(bundle, dev)
    img = next(a for a in index["artifacts"] if a["artifact"] == "image.tflite")["cases"][0]["expected"][0]
    cv2.imwrite(str(dev / img["file"]), np.zeros((16, 24, 3), np.uint16))  # a 16-bit PNG
    rows = golden.compare_bundle(bundle, dev)
    assert any(not r.passed and "16-bit PNG" in r.note for r in rows)
    for change in (lambda i: i["artifacts"][0]["cases"][0]["expected"][0].pop("tolerance"),
                   lambda i: i["artifacts"][0]["cases"][0]["expected"][0]["tolerance"].update(max_abs="x"),
                   lambda i: i.update(artifacts={"not": "a list"}),
                   lambda i: i.update(schema=1)):
        broken = json.loads((tflite_bundle / "index.json").read_text())
        change(broken)
        (bundle / "index.json").write_text(json.dumps(broken))
        assert main(["compare", str(bundle), str(dev), "--json", str(tmp_path / "r.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("gmcnn-mobile compare: error:"), err
