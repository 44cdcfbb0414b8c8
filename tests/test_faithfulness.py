"""The generator equals both reference implementations, loaded from their own checkpoint formats.

Tolerance 1e-4 max abs: float32 accumulation over ~40 layers differs between
TensorFlow and PyTorch by about 1e-6 here (measured values in docs/MODELS.md),
while a wrong pad, resize or channel order shows as 0.07 or more (the negative
controls below check that each such mistake lands far above the tolerance).
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

import models
from models.checkpoint import read_project_metadata, sha256_path

from gmcnn_reference import (kite_rgb_and_mask, random_tf_weights, reference_torch_gmcnn, run_tf_reference,
                             write_tf_checkpoint)
from helpers import run_cli

TOLERANCE = 1e-4


def _nchw(image_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image_hwc.transpose(2, 0, 1)))[None]


def _assert_meaningful(output: np.ndarray) -> None:
    """A comparison of outputs stuck at the clip limits or near zero would prove little."""
    assert output.std() > 0.05, f"output spread {output.std():.3g} too small for a meaningful comparison"
    assert (np.abs(output) >= 1.0).mean() < 0.05, "output mostly clipped"


# ------------------------------------------------------------------------------------ tf


def _make_tf_case(tmp_path_factory, cnum: int, height: int, width: int) -> dict:
    weights = random_tf_weights(cnum, seed=cnum)
    ckpt_dir = tmp_path_factory.mktemp(f"tf_ckpt_c{cnum}")
    prefix = write_tf_checkpoint(ckpt_dir, weights)
    rgb, mask = kite_rgb_and_mask(height, width)
    # The official TF pipeline feeds OpenCV's BGR images to the network.
    bgr_out = run_tf_reference(weights, rgb[None, :, :, ::-1].copy(), mask[None])[0]
    return {"cnum": cnum, "dir": ckpt_dir, "prefix": prefix, "weights": weights, "rgb": rgb, "mask": mask,
            "reference_rgb": bgr_out[:, :, ::-1]}


@pytest.fixture(scope="module")
def tf_case(tmp_path_factory):
    """A TF name-based checkpoint with reference variable names (cnum 4) and the reference TF output
    for a 96x128 crop of the kite photo around the masked kite."""
    return _make_tf_case(tmp_path_factory, 4, 96, 128)


@pytest.fixture(scope="module", params=["cnum4-96x128", "cnum34-32x48"])
def tf_cases(request, tmp_path_factory):
    """Also cnum 34 (> 32), which adds the reference's rate-32 ``conv11_atrous`` layers."""
    if request.param == "cnum4-96x128":
        return request.getfixturevalue("tf_case")
    return _make_tf_case(tmp_path_factory, 34, 32, 48)


def test_tf_variant_matches_tensorflow_graph(tf_cases):
    gen = models.load_generator(tf_cases["dir"])
    assert (gen.meta.variant, gen.meta.cnum, gen.meta.channel_order) == ("tf", tf_cases["cnum"], "bgr")
    with torch.no_grad():
        out = gen(_nchw(tf_cases["rgb"]), _nchw(tf_cases["mask"]))[0].numpy().transpose(1, 2, 0)
    reference = tf_cases["reference_rgb"]
    _assert_meaningful(reference)
    diff = float(np.abs(out - reference).max())
    print(f"tf variant cnum {tf_cases['cnum']} {out.shape[:2]}: max abs diff vs TensorFlow {diff:.3g}")
    assert diff <= TOLERANCE


def test_tf_checkpoint_channel_order_is_detected(tf_case):
    """Negative control: treating the imported BGR weights as RGB is caught by the tolerance."""
    gen = models.load_generator(tf_case["dir"])
    gen.meta.channel_order = "rgb"
    with torch.no_grad():
        out = gen(_nchw(tf_case["rgb"]), _nchw(tf_case["mask"]))[0].numpy().transpose(1, 2, 0)
    assert np.abs(out - tf_case["reference_rgb"]).max() > 100 * TOLERANCE


@pytest.mark.parametrize("mistake", ["symmetric-stride2-pad", "bilinear-half-pixel"])
def test_tf_reference_detects_padding_and_resize_mistakes(tf_case, monkeypatch, mistake):
    """Negative controls: TF's asymmetric stride-2 padding and align_corners resizing are each visible
    far above the tolerance (measured 0.17 and 0.074 at cnum 4, 96x128)."""
    import torch.nn.functional as F

    import models.gmcnn as gmcnn

    if mistake == "symmetric-stride2-pad":
        tf_pad = gmcnn.tf_same_padding
        monkeypatch.setattr(gmcnn, "tf_same_padding", lambda *a: tf_pad(*a)[::-1])
    else:
        monkeypatch.setattr(gmcnn, "resize_bilinear_ac",
                            lambda x, size: F.interpolate(x, size=size, mode="bilinear", align_corners=False))
    gen = models.load_generator(tf_case["dir"])
    with torch.no_grad():
        out = gen(_nchw(tf_case["rgb"]), _nchw(tf_case["mask"]))[0].numpy().transpose(1, 2, 0)
    assert np.abs(out - tf_case["reference_rgb"]).max() > 100 * TOLERANCE


def test_tf_checkpoint_given_as_prefix_or_index(tf_case):
    from_dir = models.load_generator(tf_case["dir"]).state_dict()
    for form in (tf_case["prefix"], tf_case["prefix"] + ".index"):
        state = models.load_generator(form).state_dict()
        assert state.keys() == from_dir.keys()
        assert all(torch.equal(state[k], from_dir[k]) for k in state)


def test_tf_import_maps_every_reference_variable(tf_cases):
    """Every generator variable lands in the parameter of the same layer (HWIO -> OIHW)."""
    gen = models.load_generator(tf_cases["dir"])
    params = dict(gen.net.named_parameters())
    assert len(params) == len(tf_cases["weights"])
    for name, value in tf_cases["weights"].items():
        scope = name.split("/")[-2]
        tensor = params[f"layers.{scope}.{'weight' if name.endswith('kernel') else 'bias'}"].detach().numpy()
        expected = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
        np.testing.assert_array_equal(tensor, expected, err_msg=name)


# --------------------------------------------------------------------------------- torch


@pytest.fixture(scope="module")
def torch_case(tmp_path_factory):
    """The reference PyTorch generator (cnum 4, its own state-dict keys) saved as a plain .pth."""
    reference = reference_torch_gmcnn(4, seed=3)
    path = tmp_path_factory.mktemp("pth") / "latest_net_GM.pth"
    torch.save(reference.state_dict(), path)
    rgb, mask = kite_rgb_and_mask(200, 216)
    image, hole = _nchw(rgb), _nchw(mask)
    with torch.no_grad():
        ref_out = reference(torch.cat([image * (1 - hole), hole], dim=1))
    return {"path": path, "reference": reference, "image": image, "mask": hole, "reference_out": ref_out}


def test_torch_variant_matches_reference_layer_list(torch_case):
    gen = models.load_generator(torch_case["path"])
    assert (gen.meta.variant, gen.meta.cnum, gen.meta.channel_order) == ("torch", 4, "rgb")
    with torch.no_grad():
        out = gen(torch_case["image"], torch_case["mask"])
    reference = torch_case["reference_out"]
    _assert_meaningful(reference.numpy())
    diff = float((out - reference).abs().max())
    print(f"torch variant cnum 4 200x216: max abs diff vs reference PyTorch net {diff:.3g}")
    assert diff <= TOLERANCE


def test_torch_reference_padding_is_detected(torch_case):
    """Negative control: the same weights with zero instead of reflection padding miss the tolerance."""
    reference = torch_case["reference"]
    zero_padded = reference_torch_gmcnn(4, seed=3)
    zero_padded.pads = torch.nn.ModuleList([torch.nn.ZeroPad2d(i) for i in range(49)])
    x = torch.cat([torch_case["image"] * (1 - torch_case["mask"]), torch_case["mask"]], dim=1)
    with torch.no_grad():
        assert (zero_padded(x) - torch_case["reference_out"]).abs().max() > 100 * TOLERANCE


@pytest.mark.parametrize("wrap", ["module.", "state_dict"])
def test_pth_wrappers_load(torch_case, tmp_path, wrap):
    """DataParallel prefixes and {'state_dict': ...} wrappers are unwrapped."""
    state = torch_case["reference"].state_dict()
    obj = {f"module.{k}": v for k, v in state.items()} if wrap == "module." else {"state_dict": state, "epoch": 3}
    path = tmp_path / "wrapped.pth"
    torch.save(obj, path)
    loaded = models.load_generator(path).net.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


# ----------------------------------------------------------------- conversion round trip


def test_converted_tf_checkpoint_is_identical(tf_case, tmp_path):
    out = tmp_path / "converted.safetensors"
    assert run_cli("convert-checkpoint", tf_case["dir"], out)[0] == 0
    direct, converted = models.load_generator(tf_case["dir"]), models.load_generator(out)
    assert converted.meta.to_dict() == {**direct.meta.to_dict(), "source": str(tf_case["dir"]),
                                        "source_sha256": sha256_path(tf_case["dir"])}
    meta = read_project_metadata(out)
    assert meta["channel_order"] == "bgr" and meta["format_version"] == 1
    assert len(meta["source_sha256"]) == 64
    image, mask = _nchw(tf_case["rgb"]), _nchw(tf_case["mask"])
    with torch.no_grad():
        assert torch.equal(direct(image, mask), converted(image, mask))


def test_tf_checkpoint_hash_covers_index_and_data(tf_case, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tf_case["dir"], copy)
    assert sha256_path(copy) == sha256_path(tf_case["dir"])
    data = next(copy.glob("*.data-*"))
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert sha256_path(copy) != sha256_path(tf_case["dir"])


def test_converted_pth_is_identical_and_records_source(torch_case, tmp_path):
    out = tmp_path / "converted.safetensors"
    src = torch_case["path"]
    before = src.read_bytes()
    assert run_cli("convert-checkpoint", src, out)[0] == 0
    assert src.read_bytes() == before, "the source checkpoint must not be modified"
    meta = json.loads(json.dumps(read_project_metadata(out)))
    assert meta["source"] == str(src)
    assert meta["source_sha256"] == hashlib.sha256(before).hexdigest()
    assert (meta["variant"], meta["cnum"], meta["channel_order"]) == ("torch", 4, "rgb")
    direct, converted = models.load_generator(src), models.load_generator(out)
    with torch.no_grad():
        assert torch.equal(direct(torch_case["image"], torch_case["mask"]),
                           converted(torch_case["image"], torch_case["mask"]))


def test_float16_conversion_stays_close(torch_case, tmp_path):
    """float16 storage halves the file; outputs move by well under 1e-2 at this size (measured ~1e-3)."""
    out16, out32 = tmp_path / "c16.safetensors", tmp_path / "c32.safetensors"
    assert run_cli("convert-checkpoint", torch_case["path"], out16, "--dtype", "float16")[0] == 0
    assert run_cli("convert-checkpoint", torch_case["path"], out32)[0] == 0
    assert out16.stat().st_size < 0.6 * out32.stat().st_size
    gen16 = models.load_generator(out16)
    assert next(gen16.parameters()).dtype == torch.float32
    with torch.no_grad():
        diff = (gen16(torch_case["image"], torch_case["mask"]) - torch_case["reference_out"]).abs().max()
    print(f"float16-stored weights: max abs diff {float(diff):.3g}")
    assert 0 < diff < 1e-2


def test_inspect_tf_checkpoint_directory(tf_case):
    import contextlib
    import io

    from gmcnn_mobile.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["inspect", str(tf_case["dir"]), "--json"]) == 0
    info = json.loads(out.getvalue())
    assert info["sha256"] == sha256_path(tf_case["dir"])
    assert (info["meta"]["variant"], info["meta"]["cnum"], info["meta"]["channel_order"]) == ("tf", 4, "bgr")
    assert info["parameters"] == sum(v.size for v in tf_case["weights"].values())
