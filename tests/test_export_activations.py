"""export.activations: per-layer ranges that explain a failed int8 gate (tiny model, no TensorFlow)."""
import json

import numpy as np
import torch

from export.activations import conv_output_stats, format_table, main
from models.checkpoint import save_checkpoint
from models.gmcnn import build_generator


def _inputs(n=2, h=64, w=96, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    masks = np.zeros((n, h, w, 1), np.uint8)
    masks[:, 16:40, 24:60] = 255
    return images, masks


def test_stats_cover_every_conv_and_are_consistent():
    gen = build_generator("tf", 4, seed=0)
    rows = conv_output_stats(gen, *_inputs())
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in gen.modules())
    assert len(rows) == n_convs
    for r in rows:
        assert r["min"] <= r["p25"] <= r["median"] <= r["p75"] <= r["max"]
        assert np.isclose(r["int8_step"], (r["max"] - r["min"]) / 255)
        assert r["levels_iqr"] >= 0 and 0 <= r["at_floor"] <= 1


def test_a_layer_with_a_few_huge_outputs_is_flagged():
    gen = build_generator("tf", 4, seed=0)
    images, masks = _inputs()
    name, conv = [(n, m) for n, m in gen.named_modules() if isinstance(m, torch.nn.Conv2d)][5]
    before = {r["layer"]: r for r in conv_output_stats(gen, images, masks)}[name]
    # one output channel of this layer driven to large positive values: the tensor's int8 range
    # grows ~100x while the other channels' values stay where they were
    with torch.no_grad():
        conv.bias[0] += 100.0
    after = {r["layer"]: r for r in conv_output_stats(gen, images, masks)}[name]
    assert after["max"] > 50 * before["max"]
    assert after["levels_iqr"] < before["levels_iqr"] / 10
    assert "int8 flattens it" in format_table([after])


def test_cli_prints_json_for_a_checkpoint(tmp_path, capsys):
    import cv2

    photos = tmp_path / "photos"
    photos.mkdir()
    images, _ = _inputs(n=1, h=120, w=160)
    cv2.imwrite(str(photos / "a.png"), images[0])
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(build_generator("tf", 4, seed=1), ckpt)
    rc = main(["--checkpoint", str(ckpt), "--shape", "64x96", "--photos", str(photos), "--masks-per-photo", "1",
               "--json", "--sensitivity"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["layers"]
    assert rows and {"layer", "min", "max", "levels_iqr", "input_int8_hole_psnr_db"} <= set(rows[0])
    assert set(out["whole_model_hole_psnr_db"]) == {"all", "weights", "weights+all"}
    assert all(0 < v <= 100 for v in out["whole_model_hole_psnr_db"].values())


def test_cli_bad_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert main(["--checkpoint", str(bad), "--shape", "64x96"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.safetensors" in err[0]


def test_sensitivity_ranks_the_blown_up_layer_first():
    from export.activations import int8_sensitivity

    gen = build_generator("tf", 4, seed=0)
    images, masks = _inputs(n=1)
    convs = [(n, m) for n, m in gen.named_modules() if isinstance(m, torch.nn.Conv2d)]
    name, conv = convs[-2]  # the layer before the output convolution
    with torch.no_grad():
        conv.bias[0] += 200.0  # one channel far outside the others: a coarse int8 step for the whole tensor
        convs[-1][1].weight[:, 0] = 0.0  # ...which the output ignores, so only the rounding of the rest shows
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    sens = int8_sensitivity(gen, images, masks)
    assert all(torch.equal(before[k], v) for k, v in gen.state_dict().items())  # weights restored
    assert set(sens) == {n for n, _ in convs} | {"all", "weights", "weights+all"}
    # the blown-up tensor is the output convolution's input
    last = convs[-1][0]
    assert min(sens, key=sens.get) in (last, "all", "weights+all")
    assert sens[last] < 40.0 < sorted(sens[n] for n, _ in convs)[len(convs) // 2]
    assert sens["all"] <= sens[last] + 1.0


def test_layer_snr_ranks_the_blown_up_layer_first_in_one_forward():
    """The fallback's cheap sensitivity: the same planted layer as above comes first by its own
    output SNR; the other layers' int8 noise is small; the forward runs once per sample (each
    convolution's rounded twin computed beside it) and leaves the weights as they were."""
    from export.activations import layer_snr

    gen = build_generator("tf", 4, seed=0)
    images, masks = _inputs(n=2)
    convs = [(n, m) for n, m in gen.named_modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        convs[-2][1].bias[0] += 200.0
        convs[-1][1].weight[:, 0] = 0.0
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    calls = []
    hook = convs[0][1].register_forward_hook(lambda *a: calls.append(1))
    per = {}
    snr = layer_snr(gen, images, masks, per_sample=per)
    hook.remove()
    assert len(calls) == 2 and all(len(v) == 2 for v in per.values())
    assert all(torch.equal(before[k], v) for k, v in gen.state_dict().items())
    assert set(snr) == {n for n, _ in convs}
    last = convs[-1][0]
    assert min(snr, key=snr.get) == last
    others = sorted(v for k, v in snr.items() if k != last)
    # int8 rounding of an ordinary layer's input and weights: ~30-40 dB SNR; the planted one's far less
    assert snr[last] < others[0] - 10 and others[len(others) // 2] > 25.0
    weights_only = layer_snr(gen, images, masks, rounded=("weights",))
    assert weights_only[last] > snr[last] + 10  # the planted error is in the input's rounding


def test_input_rounding_is_the_grid_formula_exactly_and_leaves_its_input_alone():
    """The sensitivity's and simulations' rounding of a layer's input works in place on one copy (it runs on every
    layer's input, full size): the values of the plain formulas -- int8 over the tensor's own min..max, int16
    symmetric over its largest magnitude -- bit for bit, on tensors of either sign and a constant one, contiguous
    or channels-last (what a forward fed NHWC samples makes; the extremes are taken another way there)."""
    from export.activations import _fake_int8, _fake_int16, tensor_extremes

    gen = torch.Generator().manual_seed(0)
    cases = [torch.randn(1, 8, 17, 23, generator=gen) * 3 + shift for shift in (0.0, 9.0, -9.0)]
    cases.append(torch.full((1, 2, 3, 3), 0.25))
    cases += [t.contiguous(memory_format=torch.channels_last) for t in cases]
    assert all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in cases[4:7])
    for t in cases:
        before = t.clone()
        lo, hi = float(t.min()), float(t.max())
        assert tensor_extremes(t) == (lo, hi)
        step8 = max(hi - lo, 1e-12) / 255.0
        assert torch.equal(_fake_int8(t), ((t - lo) / step8).round() * step8 + lo)
        step16 = max(float(t.abs().max()), 1e-12) / 32767.0
        assert torch.equal(_fake_int16(t), (t / step16).round().clamp(-32767, 32767) * step16)
        assert torch.equal(t, before)
    assert 100 < len(torch.unique(_fake_int8(cases[0]))) <= 256  # on the int8 grid: many levels, at most 256


def test_only_the_input_means_reuse_freed_memory(monkeypatch):
    """The input means' forwards run inside runtime_py.memory.reuse_freed_memory (1.4x faster at 1024x1360 for
    0.1 GiB), layer_snr's do not (its hook computes every convolution again: 1.8 GiB more, over the memory budget),
    and the means are the same bit for bit either way."""
    import export.activations as activations
    from runtime_py import memory

    gen = build_generator("tf", 4, seed=0).eval()
    images, masks = _inputs()
    depths = {}

    def spy(name, after_conv):
        def hook(*args):
            depths.setdefault(name, set()).add(memory._reuse_depth)
            return after_conv(*args)
        return hook

    real = activations.forward_each_sample
    def spied(g, i, m, after_conv, **kw):
        return real(g, i, m, spy(kw.get("reuse_memory", False), after_conv), **kw)

    monkeypatch.setattr(activations, "forward_each_sample", spied)
    reused = activations.conv_input_means(gen, images, masks)
    activations.layer_snr(gen, images, masks)
    assert depths == {True: {1}, False: {0}}
    monkeypatch.setattr(memory, "_glibc", lambda: None)  # the block a no-op, as off glibc
    plain = activations.conv_input_means(gen, images, masks)
    assert reused.keys() == plain.keys()
    for name in plain:
        np.testing.assert_array_equal(reused[name], plain[name])
