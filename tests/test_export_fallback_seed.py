"""The fallback's seed (export.fallback.Seed): the second I/O signature of a network gates the layers the first
kept float before any search of its own, and searches only when they fail it."""
from __future__ import annotations

import json

import pytest

from test_export_quant_fallback import PLANTED, SHAPE, planted_generator


def _export(out, **changes):
    from export.api import export_artifacts

    return export_artifacts(planted_generator(), out, shapes=[SHAPE], formats=["tflite"], precisions=["int8-dynamic"],
                            ios=["tensor", "image"], threads=2, progress=False, calibration_masks_per_photo=1,
                            **changes)


def _sensitivity_stages(out):
    stages = json.loads((out / "export_stages.json").read_text())["stages"]
    return [s["name"] for s in stages if s["name"].startswith("fallback sensitivity")]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeded")
    return out, _export(out)


def test_the_image_file_passes_with_the_tensor_files_layers_and_no_search_of_its_own(seeded):
    out, m = seeded
    tensor, image = (m.find("tflite", SHAPE, "int8-dynamic", io) for io in ("tensor", "image"))
    t, i = tensor.build["quantization"]["fallback"], image.build["quantization"]["fallback"]
    assert "seeded_from" not in t and t["phase"] == 1
    assert i["seeded_from"] == tensor.file and i["phase"] == 0
    assert [k["layer"] for k in i["layers_kept_float"]] == [k["layer"] for k in t["layers_kept_float"]] == [PLANTED]
    assert i["layers_kept_float"] == t["layers_kept_float"]  # the sensitivity the tensor file measured
    assert i["search"] == [{"phase": 0, "layers": 1, "inputs_float": False, "hole_psnr_db": image.parity.hole_psnr_db,
                            "samples": image.parity.samples, "passed": True}]
    assert image.parity.passed and i["pure_file"]["hole_psnr_db"] < image.parity.tolerance["min_hole_psnr_db"]
    assert "branches" not in i and "phase_1_predicted_hole_psnr_db" not in i
    # one sensitivity pass, the tensor file's: the image file ran none
    assert _sensitivity_stages(out) == [f"fallback sensitivity {tensor.file}"]
    # no int8 file, so no calibration pass: the bias correction's input means came from PyTorch forwards
    from export.activations import MEANS_FROM_PYTORCH

    assert t["pure_file"] and tensor.build["quantization"]["bias_correction"]["input_means"] == MEANS_FROM_PYTORCH


def test_a_seed_that_fails_is_followed_by_the_files_own_search(tmp_path, monkeypatch):
    """With the seed's layers swapped for a harmless one, the image file's seed candidate fails its gate and the
    file finds the planted layer by its own sensitivity and search; the record keeps the failed seed."""
    from export import fallback

    real = fallback.seed_phase

    def wrong_layer(seed):
        phase = real(seed)
        phase.layers = [("net.layers.b3conv1", float("nan"))]
        return phase

    monkeypatch.setattr(fallback, "seed_phase", wrong_layer)
    m = _export(tmp_path)
    image = m.find("tflite", SHAPE, "int8-dynamic", "image")
    i = image.build["quantization"]["fallback"]
    assert image.parity.passed and i["seeded_from"].endswith("_tensor_int8-dynamic.tflite")
    assert i["search"][0]["phase"] == 0 and i["search"][0]["passed"] is False
    assert i["phase"] == 1 and [k["layer"] for k in i["layers_kept_float"]] == [PLANTED]
    assert len(_sensitivity_stages(tmp_path)) == 2
