"""Golden bundle: `gmcnn-mobile golden` writes inputs/expected outputs/pipeline stages; `compare` checks device outputs."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime_py import golden  # noqa: E402
from runtime_py.cli import main  # noqa: E402


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
    assert main(["compare", str(bundle), str(dev)]) == 0
    out = capsys.readouterr().out
    assert "2/2 outputs pass" in out and "inf" in out and "FAIL" not in out


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
    rows = json.loads(report.read_text())
    assert rows[0]["max_abs"] == pytest.approx(0.5, abs=1e-3) and rows[0]["passed"] is False


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
        from runtime_py.cli import build_parser
        build_parser()
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "tensorflow", "coremltools"))
        assert not heavy, heavy
    ''')
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=str(Path(__file__).resolve().parents[1]))
    assert r.returncode == 0, r.stderr
