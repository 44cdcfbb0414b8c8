"""The generator definitions: sizes, costs, shapes, tensor conventions, project checkpoint format."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import models
from models.checkpoint import read_project_metadata
from models.gmcnn import (GeneratorMeta, GMCNNGenerator, build_generator, check_shape, count_macs, count_parameters,
                          min_side, tf_same_padding)

from gmcnn_reference import reference_torch_gmcnn, tf_reference_parameter_count
from helpers import lively_generator

# Reference TF layer list at cnum 32 (tensorflow/net/network.py).
TF_PARAMS_C32 = 12_429_107
# Reference PyTorch layer list at cnum 32 (pytorch/model/net.py): the paper's "12.562 M".
TORCH_PARAMS_C32 = 12_561_891


def test_parameter_counts_at_cnum32():
    assert count_parameters(build_generator("tf", 32)) == TF_PARAMS_C32
    assert count_parameters(build_generator("torch", 32)) == TORCH_PARAMS_C32
    assert round(TORCH_PARAMS_C32 / 1e6, 3) == 12.562  # the number in the GMCNN paper
    assert round(TF_PARAMS_C32 / 1e6, 3) != 12.562


def test_parameter_counts_match_independent_layer_tables():
    """Counted from the test's own re-statement of each reference layer list."""
    assert tf_reference_parameter_count(32) == TF_PARAMS_C32
    assert count_parameters(reference_torch_gmcnn(32)) == TORCH_PARAMS_C32
    # cnum > 32 adds the reference's rate-32 atrous layer in every branch
    assert count_parameters(build_generator("tf", 34)) == tf_reference_parameter_count(34)
    assert count_parameters(build_generator("tf", 8)) == tf_reference_parameter_count(8)


def _hand_counted_tf_macs(cnum: int, h: int, w: int) -> int:
    """MACs from the test's own TF layer table and the resolution each stage runs at."""
    from gmcnn_reference import tf_reference_layers

    full, half, quarter = h * w, (h // 2) * (w // 2), (h // 4) * (w // 4)
    total = 0
    for stage, rows in tf_reference_layers(cnum).items():
        for i, r in enumerate(rows):
            if stage in ("b1", "b2", "b3"):
                pixels = full if i == 0 else half if i < 3 else quarter
            else:
                pixels = full if stage in ("b3_tail2", "merge") else half
            total += r.kernel * r.kernel * r.cin * r.cout * pixels
    return total


def test_gmacs_sanity():
    with torch.device("meta"):  # count_macs needs only the metadata; skip allocating weights
        tf32 = GMCNNGenerator(GeneratorMeta(variant="tf", cnum=32))
        torch32 = GMCNNGenerator(GeneratorMeta(variant="torch", cnum=32))
        tf16 = GMCNNGenerator(GeneratorMeta(variant="tf", cnum=16))
    tf_macs = count_macs(tf32, 512, 680)
    assert tf_macs == _hand_counted_tf_macs(32, 512, 680)
    assert round(tf_macs / 1e9, 1) == 345.0
    assert round(count_macs(torch32, 512, 680) / 1e9, 1) == 357.0
    # Convolutions scale with pixel count; 1024x1360 is exactly 4x the pixels of 512x680.
    assert count_macs(tf32, 1024, 1360) == 4 * tf_macs
    # and about quadratically with width (cnum)
    ratio = count_macs(tf16, 512, 680) / tf_macs
    assert 0.24 < ratio < 0.26


def test_count_macs_leaves_model_untouched():
    gen = build_generator("tf", 4, seed=0)
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    count_macs(gen, 64, 64)
    assert all(torch.equal(before[k], v) for k, v in gen.state_dict().items())
    assert next(gen.parameters()).device.type == "cpu"


@pytest.mark.parametrize("variant,h,w", [("tf", 8, 8), ("tf", 64, 96), ("torch", 196, 196), ("torch", 200, 216)])
def test_check_shape_accepts(variant, h, w):
    check_shape(variant, h, w)


@pytest.mark.parametrize("variant,h,w,words", [
    ("tf", 66, 96, "multiple of 4"), ("tf", 64, 98, "multiple of 4"), ("tf", 4, 64, "too small"),
    ("torch", 192, 256, "at least 196"), ("torch", 256, 190, "multiple of 4"),
])
def test_check_shape_rejects(variant, h, w, words):
    with pytest.raises(ValueError, match=words):
        check_shape(variant, h, w)


def test_torch_min_side_is_the_real_limit():
    """196 runs; the next multiple of 4 below it fails inside PyTorch's reflection pad."""
    gen = build_generator("torch", 2, seed=0)
    side = min_side("torch")
    with torch.no_grad():
        assert gen(torch.zeros(1, 3, side, side), torch.zeros(1, 1, side, side)).shape == (1, 3, side, side)
        with pytest.raises(RuntimeError, match="Padding size should be less than the corresponding input dimension"):
            gen(torch.zeros(1, 3, side - 4, side), torch.zeros(1, 1, side - 4, side))


def test_tf_same_padding_is_asymmetric_for_stride2():
    assert tf_same_padding(64, 7, 2, 1) == (2, 3)
    assert tf_same_padding(64, 3, 2, 1) == (0, 1)
    assert tf_same_padding(64, 5, 1, 4) == (8, 8)


@pytest.mark.parametrize("variant,h,w", [("tf", 32, 48), ("torch", 196, 212)])
def test_forward_shapes(variant, h, w):
    gen = build_generator(variant, 4, seed=0)
    image = torch.rand(2, 3, h, w) * 2 - 1
    mask = torch.zeros(2, 1, h, w)
    mask[:, :, h // 4 : h // 2, w // 4 : w // 2] = 1
    assert gen.network_input(image, mask).shape == (2, 5 if variant == "tf" else 4, h, w)
    with torch.no_grad():
        out = gen(image, mask)
    assert out.shape == (2, 3, h, w) and out.dtype == torch.float32
    assert out.std() > 0  # not a constant


@pytest.mark.parametrize("variant,h,w", [("tf", 32, 48), ("torch", 196, 212)])
def test_output_is_the_last_convolution_clipped_to_unit_range(variant, h, w):
    """The clamp to [-1, 1] is real work only when the last convolution leaves that range, which the reference
    init never does (|y| <= 0.04 here); weights at 1.5/sqrt(fan_in) send 17 % (tf) and 66 % (torch) of the
    values outside it (measured on these inputs)."""
    gen = lively_generator(variant, 4, seed=0, weight_gain=1.5)
    last = [m for m in gen.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    seen = []
    hook = last.register_forward_hook(lambda _m, _i, y: seen.append(y))
    image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, 1, h, w)
    mask[:, :, h // 4 : h // 2, w // 4 : w // 2] = 1
    with torch.no_grad():
        out = gen(image, mask)
    hook.remove()
    (pre,) = seen
    assert 0.1 < (pre.abs() > 1).float().mean() < 0.9  # values inside and outside [-1, 1] before the clamp ...
    assert torch.equal(out, pre.clamp(-1, 1))  # ... and exactly the clamp of them after it


def test_network_input_layout():
    gen = build_generator("tf", 4)
    image = torch.rand(1, 3, 8, 8) * 2 - 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 1
    x = gen.network_input(image, mask)
    assert torch.equal(x[:, :3], image * (1 - mask))  # holes zeroed
    assert torch.equal(x[:, 3:4], torch.ones_like(mask))
    assert torch.equal(x[:, 4:5], mask)
    y = build_generator("torch", 4).network_input(image, mask)
    assert torch.equal(y, torch.cat([image * (1 - mask), mask], 1))


def test_bgr_checkpoints_flip_channels_inside():
    """A BGR-trained generator fed RGB equals the bare network fed BGR, with its output flipped back."""
    rgb_gen = build_generator("tf", 4, seed=5)
    bgr_gen = GMCNNGenerator(GeneratorMeta(variant="tf", cnum=4, channel_order="bgr"))
    bgr_gen.load_state_dict(rgb_gen.state_dict())
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    image[:, 0] = 0.9  # make the colour channels clearly different
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:20, 8:20] = 1
    with torch.no_grad():
        by_hand = rgb_gen.net(torch.cat([image.flip(1) * (1 - mask), torch.ones_like(mask), mask], 1)).flip(1)
        assert torch.equal(bgr_gen(image, mask), by_hand)
        assert not torch.allclose(bgr_gen(image, mask), rgb_gen(image, mask), atol=1e-3)


def test_build_generator_is_seeded_and_uses_reference_init():
    a, b, c = (build_generator("tf", 4, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.net.layers["b1conv1"].weight, c.net.layers["b1conv1"].weight)
    # tf: Glorot uniform, limit sqrt(6 / (fan_in + fan_out)); torch: N(0, 0.02)
    w = a.net.layers["b1conv1"].weight
    limit = (6 / (5 * 49 + 4 * 49)) ** 0.5
    assert w.abs().max() <= limit and w.abs().max() > 0.9 * limit
    t = build_generator("torch", 32, seed=0).net.EB1[4].weight
    assert abs(float(t.detach().std()) - 0.02) < 1e-3
    assert not a.training


@pytest.mark.parametrize("variant,cnum,words", [
    ("foo", 4, "unknown GMCNN variant 'foo'"), ("tf", 3, "cnum must be an even number >= 2, got 3"),
    ("torch", 0, "cnum must be an even number >= 2, got 0"),
])
def test_bad_variant_or_cnum(variant, cnum, words):
    with pytest.raises(ValueError, match=words):
        build_generator(variant, cnum)


def test_meta_roundtrip():
    meta = GeneratorMeta(variant="torch", cnum=8, channel_order="bgr", train_size=(512, 680), source="x",
                         source_sha256="ab" * 32, description="d")
    assert GeneratorMeta.from_dict(meta.to_dict()) == meta
    assert GeneratorMeta.from_dict({**meta.to_dict(), "unknown_future_key": 1}) == meta


@pytest.mark.parametrize("variant", ["tf", "torch"])
def test_project_checkpoint_roundtrip(tmp_path, variant):
    gen = build_generator(variant, 4, seed=7, train_size=(512, 680), description="test model")
    path = models.save_checkpoint(gen, tmp_path / "sub" / "m.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not a private temp file
    meta = read_project_metadata(path)
    assert meta["variant"] == variant and meta["cnum"] == 4 and meta["train_size"] == [512, 680]
    assert meta["format_version"] == 1 and meta["weights_dtype"] == "float32"
    assert meta["mask_polarity"] == "1=hole" and meta["normalization"] == "x/127.5-1"
    loaded = models.load_generator(path)
    assert loaded.meta == gen.meta and not loaded.training
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in gen.state_dict().items())


def test_float16_checkpoint_loads_as_float32(tmp_path):
    gen = build_generator("tf", 4, seed=7)
    path = models.save_checkpoint(gen, tmp_path / "h.safetensors", dtype="float16")
    loaded = models.load_generator(path)
    for k, v in gen.state_dict().items():
        got = loaded.state_dict()[k]
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), v.numpy(), rtol=1e-3, atol=1e-7)


def test_default_checkpoint_env_override(tmp_path, monkeypatch):
    path = models.save_checkpoint(build_generator("tf", 4, seed=1), tmp_path / "d.safetensors")
    monkeypatch.setenv("GMCNN_CHECKPOINT", str(path))
    assert models.default_checkpoint() == path
    assert models.load_generator().meta.cnum == 4
    monkeypatch.setenv("GMCNN_CHECKPOINT", str(tmp_path / "missing.safetensors"))
    with pytest.raises(models.checkpoint.CheckpointError, match="default checkpoint"):
        models.load_generator()


def test_models_import_is_light():
    """``import models`` alone must not pull in torch (runtime code imports it for paths)."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, models; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"
