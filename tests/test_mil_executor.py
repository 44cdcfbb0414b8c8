"""Op-level tests of the Core ML reference executor against the MIL op definitions' documented semantics.

Hand-computed cases come from the op definitions' own text (coremltools/converters/mil/mil/ops/defs);
larger cases compare with the PyTorch equivalents. A last test builds small ML programs with
coremltools' MIL builder, saves them as .mlpackage and runs them through the loader, so the
wiring between the milproto loader and the op implementations is tested too.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtime_py import mil_ops as ops

# Not importorskip: importing coremltools (it imports TensorFlow) costs ~10 s of CPU, and every xdist worker collects
# every module; the tests that build programs import it (tests/conftest.py runs them in the Core ML tests' worker).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("coremltools") is None, reason="could not import 'coremltools'")


def rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------- conv

def test_conv_hand_case():
    x = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    w = np.array([[[[1, 0], [0, -1]]]], np.float32)  # x[i,j] - x[i+1,j+1] = -4 everywhere
    y = ops.conv(x=x, weight=w, bias=np.array([0.5], np.float32), pad_type="valid")
    np.testing.assert_array_equal(y, np.full((1, 1, 2, 2), -3.5, np.float32))


# the exact per-tap conv and the fast path's (ONNX Runtime), whole and in bands of one output row
CONVS = {"exact": ops.conv, "fast": ops.conv_fast,
         "fast-bands": lambda **kw: ops.conv_fast(band_bytes=1, **kw)}


@pytest.mark.parametrize("impl", CONVS)
@pytest.mark.parametrize("stride,dilation,groups", [(1, 1, 1), (2, 1, 1), (1, 3, 1), (1, 2, 2), (2, 1, 4), (1, 1, 8)])
def test_conv_matches_torch(stride, dilation, groups, impl):
    r = rng(stride * 10 + dilation + groups)
    x = r.standard_normal((2, 8, 13, 11)).astype(np.float32)
    w = r.standard_normal((8, 8 // groups, 3, 5)).astype(np.float32)
    b = r.standard_normal(8).astype(np.float32)
    pad = [1, 2, 3, 0]
    y = CONVS[impl](x=x, weight=w, bias=b, strides=[stride, stride], pad_type="custom", pad=pad,
                    dilations=[dilation, dilation], groups=groups)
    xp = F.pad(torch.from_numpy(x), (3, 0, 1, 2))
    ref = F.conv2d(xp, torch.from_numpy(w), torch.from_numpy(b), stride=stride, dilation=dilation, groups=groups)
    assert y.shape == tuple(ref.shape)
    np.testing.assert_allclose(y, ref.numpy(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kernel,dilation,stride", [(3, 1, 1), (4, 1, 1), (4, 1, 2), (3, 2, 2), (2, 3, 1)])
def test_conv_same_padding_rule(kernel, dilation, stride):
    """``same``: odd dilated kernel -> dk//2 both sides; even -> ceil((dk-1)/2) before, floor after (``same_lower`` swaps)."""
    dk = (kernel - 1) * dilation + 1
    before, after = (dk // 2, dk // 2) if dk % 2 else (-(-(dk - 1) // 2), (dk - 1) // 2)
    r = rng(kernel)
    x = r.standard_normal((1, 2, 9, 10)).astype(np.float32)
    w = r.standard_normal((3, 2, kernel, kernel)).astype(np.float32)
    for pad_type, (pb, pa) in (("same", (before, after)), ("same_lower", (after, before) if dk % 2 == 0 else (before, after))):
        y = ops.conv(x=x, weight=w, pad_type=pad_type, strides=[stride] * 2, dilations=[dilation] * 2)
        ref = F.conv2d(F.pad(torch.from_numpy(x), (pb, pa, pb, pa)), torch.from_numpy(w), stride=stride, dilation=dilation)
        np.testing.assert_allclose(y, ref.numpy(), atol=1e-4)
        assert y.shape[2:] == (-(-9 // stride), -(-10 // stride))  # d_out = ceil(d_in / stride)


@pytest.mark.parametrize("impl", CONVS)
def test_conv_fp16_rounds_once_at_the_end(impl):
    r = rng(3)
    x = r.standard_normal((1, 16, 9, 9)).astype(np.float16)
    w = (r.standard_normal((4, 16, 3, 3)) * 0.1).astype(np.float16)
    b = r.standard_normal(4).astype(np.float16)
    y = CONVS[impl](x=x, weight=w, bias=b, pad_type="same")
    assert y.dtype == np.float16
    exact = F.conv2d(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(w.astype(np.float64)),
                     torch.from_numpy(b.astype(np.float64)), padding=1).numpy()
    # fp32 accumulation of exact fp16 products, one rounding: within one fp16 ulp of the exact value
    ulp = np.spacing(np.abs(exact).astype(np.float16)).astype(np.float64)
    assert np.all(np.abs(y.astype(np.float64) - exact) <= ulp)


@pytest.mark.parametrize("impl", CONVS)
def test_conv_rejects_bad_groups(impl):
    with pytest.raises(ValueError, match="groups"):
        CONVS[impl](x=np.zeros((1, 6, 4, 4), np.float32), weight=np.zeros((4, 4, 1, 1), np.float32), pad_type="valid",
                    groups=2)


# ---------------------------------------------------------------------------------- pad

def test_pad_modes_hand_case():
    x = np.array([[1, 2, 3], [4, 5, 6]], np.float32)[None, None]
    np.testing.assert_array_equal(
        ops.pad(x=x, pad=np.array([0, 0, 2, 1], np.int32), mode="reflect")[0, 0],
        [[3, 2, 1, 2, 3, 2], [6, 5, 4, 5, 6, 5]])
    np.testing.assert_array_equal(
        ops.pad(x=x, pad=np.array([1, 0, 0, 1], np.int32), mode="replicate")[0, 0],
        [[1, 2, 3, 3], [1, 2, 3, 3], [4, 5, 6, 6]])
    y = ops.pad(x=x, pad=np.array([1, 0, 1, 0], np.int32), mode="constant", constant_val=np.float32(-1))
    np.testing.assert_array_equal(y[0, 0], [[-1, -1, -1, -1], [-1, 1, 2, 3], [-1, 4, 5, 6]])


def test_pad_pairs_address_the_last_dims_outermost_first():
    x = np.zeros((2, 3, 4, 5), np.float16)
    assert ops.pad(x=x, pad=np.array([1, 2, 3, 4], np.int32)).shape == (2, 3, 7, 12)
    assert ops.pad(x=x, pad=np.array([1, 1], np.int32), mode="reflect").dtype == np.float16


def test_reflect_pad_matches_torch_and_refuses_too_large():
    x = rng(1).standard_normal((1, 3, 6, 7)).astype(np.float32)
    y = ops.pad(x=x, pad=np.array([5, 5, 4, 4], np.int32), mode="reflect")
    np.testing.assert_array_equal(y, F.pad(torch.from_numpy(x), (4, 4, 5, 5), mode="reflect").numpy())
    with pytest.raises(ValueError, match="too large"):
        ops.pad(x=x, pad=np.array([6, 0, 0, 0], np.int32), mode="reflect")


# ---------------------------------------------------------------------------------- resampling

UPSAMPLES = {"exact": ops.upsample_bilinear, "matmul": ops.upsample_bilinear_matmul}


@pytest.mark.parametrize("impl", UPSAMPLES)
def test_upsample_bilinear_documented_grids(impl):
    up = UPSAMPLES[impl]
    x = np.array([0.0, 1.0], np.float32).reshape(1, 1, 1, 2)
    ac = up(x=x, scale_factor_height=1, scale_factor_width=2.5, align_corners=True)
    np.testing.assert_allclose(ac[0, 0, 0], [0, 0.25, 0.5, 0.75, 1.0], atol=1e-7)
    hp = up(x=x, scale_factor_height=1, scale_factor_width=2.5, align_corners=False)
    np.testing.assert_allclose(hp[0, 0, 0], [0, 0.1, 0.5, 0.9, 1.0], atol=1e-6)
    six = up(x=x, scale_factor_height=1, scale_factor_width=3, align_corners=False)
    np.testing.assert_allclose(six[0, 0, 0], [0, 0, 1 / 3, 2 / 3, 1, 1], atol=1e-6)


@pytest.mark.parametrize("impl", UPSAMPLES)
@pytest.mark.parametrize("scale", [2, 4])
def test_upsample_bilinear_align_corners_matches_torch(scale, impl):
    up = UPSAMPLES[impl]
    x = rng(scale).standard_normal((1, 3, 5, 7)).astype(np.float32)
    y = up(x=x, scale_factor_height=scale, scale_factor_width=scale, align_corners=True)
    ref = F.interpolate(torch.from_numpy(x), scale_factor=scale, mode="bilinear", align_corners=True)
    np.testing.assert_allclose(y, ref.numpy(), atol=1e-5)
    y16 = up(x=x.astype(np.float16), scale_factor_height=scale, scale_factor_width=scale)
    assert y16.dtype == np.float16
    np.testing.assert_allclose(y16.astype(np.float32), ref.numpy(), atol=4e-3)


def test_resize_bilinear_modes():
    x = rng(5).standard_normal((1, 2, 4, 6)).astype(np.float32)
    for mode, kw in (("ALIGN_CORNERS", dict(align_corners=True)), ("UNALIGN_CORNERS", dict(align_corners=False))):
        y = ops.resize_bilinear(x=x, target_size_height=9, target_size_width=11, sampling_mode=mode)
        ref = F.interpolate(torch.from_numpy(x), size=(9, 11), mode="bilinear", **kw)
        np.testing.assert_allclose(y, ref.numpy(), atol=1e-5)


def test_upsample_nearest_duplicates_pixels():
    x = np.array([[1, 2], [3, 4]], np.float16)[None, None]
    y = ops.upsample_nearest_neighbor(x=x, scale_factor_height=2, scale_factor_width=3)
    np.testing.assert_array_equal(y[0, 0], [[1, 1, 1, 2, 2, 2]] * 2 + [[3, 3, 3, 4, 4, 4]] * 2)
    assert y.dtype == np.float16


# ---------------------------------------------------------------------------------- elementwise

def test_elu_clip_round_floor_fill_like():
    x = np.array([-2.0, -0.5, 0.0, 0.75, 3.0], np.float16)
    y = ops.elu(x=x, alpha=np.float16(1.0))
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float64), np.where(x > 0, x, np.expm1(x.astype(np.float64))), atol=1e-3)
    np.testing.assert_array_equal(ops.clip(x=x, alpha=np.float16(-1), beta=np.float16(1)), [-1, -0.5, 0, 0.75, 1])
    np.testing.assert_array_equal(ops.round_(x=np.array([0.5, 1.5, 2.5, -0.5, 2.6], np.float32)), [0, 2, 2, -0, 3])
    np.testing.assert_array_equal(ops.floor(x=np.array([-0.5, 1.5], np.float16)), [-1, 1])
    f = ops.fill_like(ref_tensor=np.zeros((2, 3), np.float16), value=np.float16(1))
    assert f.dtype == np.float16 and f.shape == (2, 3) and np.all(f == 1)


def test_binary_ops_broadcast_keep_dtype_and_refuse_mixed():
    a = np.array([[1.0, 2.0]], np.float16)
    b = np.array([[4.0], [8.0]], np.float16)
    assert ops.add(x=a, y=b).shape == (2, 2) and ops.add(x=a, y=b).dtype == np.float16
    np.testing.assert_array_equal(ops.sub(x=a, y=b), [[-3, -2], [-7, -6]])
    np.testing.assert_array_equal(ops.mul(x=a, y=b), [[4, 8], [8, 16]])
    np.testing.assert_array_equal(ops.real_div(x=a, y=b), [[0.25, 0.5], [0.125, 0.25]])
    # fp16 arithmetic rounds to fp16: 2049 is not representable
    assert ops.add(x=np.array([2048.0], np.float16), y=np.array([1.0], np.float16))[0] == 2048
    with pytest.raises(TypeError, match="dtypes"):
        ops.add(x=a, y=b.astype(np.float32))


def test_cast_rounds_to_fp16_and_truncates_to_int():
    x = np.array([1.0 + 2 ** -12, -2.7, 2.7], np.float32)
    y = ops.cast(x=x, dtype="fp16")
    assert y.dtype == np.float16 and y[0] == 1.0
    np.testing.assert_array_equal(ops.cast(x=x, dtype="int32"), [1, -2, 2])
    with pytest.raises(ValueError, match="unsupported"):
        ops.cast(x=x, dtype="complex64")


def test_concat_and_interleave():
    a = np.array([[1, 2]], np.float32)
    b = np.array([[3, 4]], np.float32)
    np.testing.assert_array_equal(ops.concat(values=(a, b), axis=0), [[1, 2], [3, 4]])
    np.testing.assert_array_equal(ops.concat(values=(a, b), axis=1, interleave=True), [[1, 3, 2, 4]])


# ---------------------------------------------------------------------------------- weight decompression

def test_affine_dequantize_per_channel():
    q = np.array([[-128, 0, 127], [10, 20, 30]], np.int8)
    scale = np.array([0.5, 0.25], np.float16)
    zp = np.array([0, 10], np.int8)
    y = ops.constexpr_affine_dequantize(quantized_data=q, zero_point=zp, scale=scale, axis=np.int32(0))
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y, [[-64, 0, 63.5], [0, 2.5, 5]])


def test_lut_to_dense_documented_packing():
    # definition's example: n_bits=2, shape (5,), byte0 = i3 i2 i1 i0 = 01 10 11 00, byte1 low bits = i4 = 11
    indices = np.array([0b01101100, 0b00000011], np.uint8)
    lut = np.array([10, 20, 30, 40], np.float16)
    y = ops.constexpr_lut_to_dense(indices=indices, lut=lut, shape=np.array([5], np.uint32))
    np.testing.assert_array_equal(y, [10, 40, 30, 20, 40])  # i0=0, i1=3, i2=2, i3=1, i4=3


def test_lut_to_dense_6bit_roundtrip():
    r = rng(9)
    idx = r.integers(0, 64, size=(4, 3, 2, 5))
    bits = ((idx.ravel()[:, None] >> np.arange(6)) & 1).astype(np.uint8).ravel()
    packed = np.packbits(bits, bitorder="little")
    lut = np.linspace(-1, 1, 64).astype(np.float16)
    y = ops.constexpr_lut_to_dense(indices=packed, lut=lut, shape=np.array(idx.shape, np.uint32))
    np.testing.assert_array_equal(y, lut[idx])


# ---------------------------------------------------------------------------------- whole programs via the loader

def _save_program(prog, tmp_path, name):
    import warnings

    import coremltools as ct

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                           compute_precision=ct.precision.FLOAT32, skip_model_load=True)
    path = tmp_path / name
    model.save(str(path))
    return path


def test_builder_program_through_loader(tmp_path):
    """pad(reflect) -> dilated grouped conv -> elu -> bilinear x2 (align corners), in fp16, end to end."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    from runtime_py.mil_executor import load_program

    r = rng(11)
    w = (r.standard_normal((4, 2, 3, 3)) * 0.3).astype(np.float16)
    bias = r.standard_normal(4).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 8, 10))], opset_version=ct.target.iOS16)
    def prog(x):
        h = mb.cast(x=x, dtype="fp16")
        h = mb.pad(x=h, pad=np.array([2, 2, 2, 2], np.int32), mode="reflect", constant_val=np.float16(0))
        h = mb.conv(x=h, weight=w, bias=bias, pad_type="valid", dilations=[2, 2], groups=2)
        h = mb.elu(x=h, alpha=np.float16(1.0))
        h = mb.upsample_bilinear(x=h, scale_factor_height=2, scale_factor_width=2, align_corners=True)
        return mb.cast(x=h, dtype="fp32")

    path = _save_program(prog, tmp_path, "small.mlpackage")
    program = load_program(path)
    x = r.standard_normal((1, 4, 8, 10)).astype(np.float32)
    name = program.inputs[0].name
    y = next(iter(program({name: x}).values()))

    t = torch.from_numpy(x.astype(np.float16).astype(np.float32))
    t = F.pad(t, (2, 2, 2, 2), mode="reflect")
    t = F.elu(F.conv2d(t, torch.from_numpy(w.astype(np.float32)), torch.from_numpy(bias.astype(np.float32)),
                       dilation=2, groups=2))
    ref = F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True).numpy()
    assert y.shape == (1, 4, 16, 20)
    np.testing.assert_allclose(y, ref, atol=1e-2)  # a few fp16 roundings of values of size ~1
    assert {"pad", "conv", "elu", "upsample_bilinear", "cast"} <= set(program.op_counts)


def test_fast_and_exact_paths_agree_on_a_tiny_program(tmp_path):
    """The gate's default (fast: float32 conv in ONNX Runtime, matrix bilinear) against the exact op-by-op path,
    fp16 program: 7x7 dilated conv -> elu -> stride-2 conv -> bilinear x4. Both round every op once to fp16 from
    fp32, so they differ by fp32 summation order only. Measured on seeds 0-9 (ONNX Runtime 1.23, 2026-12-04): at
    most 0.00195, one fp16 ulp at magnitudes 2-4 and half of one at the output's largest (4-6; near zero a
    cancelling sum can differ by many of its own tiny ulps), on at most 1.1 % of the outputs (the im2col path
    it replaced: 0.9 %)."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    from runtime_py.mil_executor import load_program

    for seed in range(3):
        r = rng(seed)
        w1 = (r.standard_normal((16, 4, 7, 7)) * 0.1).astype(np.float16)
        w2 = (r.standard_normal((8, 16, 3, 3)) * 0.1).astype(np.float16)
        b1 = r.standard_normal(16).astype(np.float16)

        @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 24, 30))], opset_version=ct.target.iOS16)
        def prog(x):
            h = mb.cast(x=x, dtype="fp16")
            h = mb.conv(x=h, weight=w1, bias=b1, pad_type="same", dilations=[2, 2])
            h = mb.elu(x=h, alpha=np.float16(1.0))
            h = mb.conv(x=h, weight=w2, pad_type="custom", pad=[1, 1, 1, 1], strides=[2, 2])
            h = mb.upsample_bilinear(x=h, scale_factor_height=4, scale_factor_width=4, align_corners=True)
            return mb.cast(x=h, dtype="fp32")

        path = _save_program(prog, tmp_path, f"tiny{seed}.mlpackage")
        fast, exact = load_program(path, mode="fast"), load_program(path, mode="exact")
        x = r.standard_normal((1, 4, 24, 30)).astype(np.float32)
        feed = {fast.inputs[0].name: x}
        a, b = next(iter(fast(feed).values())), next(iter(exact(feed).values()))
        ulp = float(np.spacing(np.float16(np.abs(b).max())))
        diff = np.abs(a - b)
        assert diff.max() <= ulp, f"seed {seed}: {diff.max() / ulp:.1f} fp16 ulps (of the largest output) apart"
        assert np.mean(diff > 0) <= 0.02, f"seed {seed}: {np.mean(diff > 0):.2%} of outputs differ"


def _branching_program(tmp_path):
    """x -> fp16 -> conv a -> elu b -> add(a, b) c -> x2 upsample d -> fp32 e; e and fp32(b) are both outputs, and
    fp32(b) is read again by upsample_nearest_neighbor (an output some later op reads). Returns the loaded program and a feed."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    from runtime_py.mil_executor import load_program

    r = rng(21)
    w = (r.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 6, 8))], opset_version=ct.target.iOS16)
    def prog(x):
        a = mb.conv(x=mb.cast(x=x, dtype="fp16"), weight=w, pad_type="same")
        b = mb.elu(x=a, alpha=np.float16(1.0))
        b32 = mb.cast(x=b, dtype="fp32")
        c = mb.add(x=a, y=b)
        d = mb.upsample_bilinear(x=c, scale_factor_height=2, scale_factor_width=2, align_corners=True)
        e = mb.add(x=mb.cast(x=d, dtype="fp32"), y=mb.upsample_nearest_neighbor(x=b32, scale_factor_height=2,
                                                                            scale_factor_width=2))
        return e, b32

    program = load_program(_save_program(prog, tmp_path, "branching.mlpackage"))
    return program, {program.inputs[0].name: r.standard_normal((1, 3, 6, 8)).astype(np.float32)}


def _alive_at_each_step(program, feed):
    """Run ``program`` and return, per step, the names of the earlier steps' results still allocated when that
    step's result is observed (weak references: a value counts only while something still holds it), and the
    outputs."""
    import weakref

    refs, alive = {}, []

    def observe(step, result):
        alive.append({n for n, ref in refs.items() if ref() is not None})
        refs[step.outputs[0][0]] = weakref.ref(result)

    return alive, program(feed, observe=observe)


def test_each_value_is_released_after_its_last_reader(tmp_path):
    import dataclasses

    program, feed = _branching_program(tmp_path)
    steps = program.steps
    outputs = {s.name for s in program.outputs}
    last_read = {}
    for i, step in enumerate(steps):
        for v in step.inputs.values():
            for n in (v if isinstance(v, tuple) else (v,)):
                last_read[n] = i
    alive, out = _alive_at_each_step(program, feed)
    for j in range(len(steps)):
        expected = {s.outputs[0][0] for s in steps[:j]
                    if s.outputs[0][0] in outputs or last_read.get(s.outputs[0][0], -1) >= j}
        assert alive[j] == expected, f"step {j} ({steps[j].op_type})"
    # the conv's result is read by elu and by add: alive through add, gone after it
    conv = next(s.outputs[0][0] for s in steps if s.op_type == "conv")
    add = next(j for j, s in enumerate(steps) if s.op_type == "add" and conv in s.inputs.values())
    assert conv in alive[add] and conv not in alive[add + 1]
    # outputs stay to the end, the one read again too
    assert outputs <= {s.outputs[0][0] for s in steps} and outputs <= alive[-1] | {steps[-1].outputs[0][0]}
    assert set(out) == outputs
    # without release every result is still allocated at the last step: what the assertions above rule out
    kept, out_kept = _alive_at_each_step(dataclasses.replace(program, release=False), feed)
    assert kept[-1] == {s.outputs[0][0] for s in steps[:-1]} != alive[-1]
    for name in outputs:
        np.testing.assert_array_equal(out[name], out_kept[name])


def test_ops_run_with_freed_memory_reused_and_the_same_results(tmp_path, monkeypatch):
    """Every op runs inside runtime_py.memory.reuse_freed_memory (what made a 1024x1360 inference 1.6x faster),
    and the results are the same bit for bit as with the allocator's defaults."""
    from runtime_py import memory

    program, feed = _branching_program(tmp_path)
    depths = []
    reused = program(feed, observe=lambda step, result: depths.append(memory._reuse_depth))
    assert len(depths) == len(program.steps) and min(depths) >= 1 and memory._reuse_depth == 0
    monkeypatch.setattr(memory, "_glibc", lambda: None)  # the block becomes a no-op, as off glibc
    plain = program(feed)
    for name in plain:
        np.testing.assert_array_equal(reused[name], plain[name])


def test_release_plan_never_names_constants_or_outputs(tmp_path):
    program, feed = _branching_program(tmp_path)
    plan = program.release_plan()
    assert len(plan) == len(program.steps) and program.release_plan() is plan  # computed once
    released = [n for names in plan for n in names]
    assert len(released) == len(set(released))
    assert not set(released) & (set(program.constants) | {s.name for s in program.outputs})
    # every value some step makes or reads, other than those, is released exactly once
    made = {s.outputs[0][0] for s in program.steps} | {s.name for s in program.inputs}
    assert set(released) == made - {s.name for s in program.outputs}
    constants = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in program.constants.items()}
    first, second = program(feed), program(feed)  # a second run finds every constant as the first did
    assert program.constants.keys() == constants.keys()
    for k, v in constants.items():
        np.testing.assert_array_equal(program.constants[k], v)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_release_gives_bitwise_identical_outputs_on_the_tiny_generator(mode):
    """The tiny generator's fp16 package (coreml_fixtures.tiny_artifact): the same bytes out with and without
    release, and at most a few earlier results allocated at once with it instead of all of them."""
    import dataclasses
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from coreml_fixtures import TINY_TF_SHAPE, sample_inputs, tiny_artifact

    from runtime_py.mil_executor import load_program

    program = load_program(tiny_artifact("fp16", "tensor"), mode=mode)
    images, masks = sample_inputs(TINY_TF_SHAPE, n=1)
    feed = {spec.name: (np.transpose(images, (0, 3, 1, 2)).astype(np.float32) / 127.5 - 1.0 if spec.shape[1] == 3
                        else (np.transpose(masks, (0, 3, 1, 2)) >= 128).astype(np.float32))
            for spec in program.inputs}
    alive, released = _alive_at_each_step(program, feed)
    kept_alive, kept = _alive_at_each_step(dataclasses.replace(program, release=False), feed)
    assert released.keys() == kept.keys()
    for name in kept:
        assert released[name].tobytes() == kept[name].tobytes()
    # measured 3 of 106 (both modes): the three branches' last results waiting for their concat
    most, all_ = max(map(len, alive)), len(program.steps) - 1
    assert max(map(len, kept_alive)) == all_ == 106
    assert most <= 6, f"{most} of {all_} earlier results allocated at once with release"


def test_executor_mode_is_checked(monkeypatch):
    from runtime_py.errors import UserError
    from runtime_py.mil_executor import MODE_ENV, default_mode, load_program

    assert ops.op_table("exact") is ops.OPS
    assert ops.op_table("fast")["conv"] is ops.conv_fast
    monkeypatch.delenv(MODE_ENV, raising=False)
    assert default_mode() == "fast"
    monkeypatch.setenv(MODE_ENV, "exact")
    assert default_mode() == "exact"
    monkeypatch.setenv(MODE_ENV, "quick")
    with pytest.raises(UserError, match="GMCNN_MIL_EXECUTOR='quick'"):
        load_program("whatever.mlpackage")
    with pytest.raises(ValueError, match="not one of fast, exact"):
        load_program("whatever.mlpackage", mode="quick")


def test_unknown_op_is_one_clear_error(tmp_path):
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    from runtime_py.mil_executor import UnsupportedOpError, load_program

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3))], opset_version=ct.target.iOS16)
    def prog(x):
        return mb.sin(x=mb.relu(x=x))

    path = _save_program(prog, tmp_path, "sin.mlpackage")
    with pytest.raises(UnsupportedOpError, match=r"does not implement op\(s\) relu, sin"):
        load_program(path)


def test_missing_or_corrupt_package(tmp_path):
    from runtime_py.errors import UserError
    from runtime_py.mil_executor import load_program

    with pytest.raises(UserError, match="no such Core ML package"):
        load_program(tmp_path / "nope.mlpackage")
    bad = tmp_path / "bad.mlpackage"
    bad.mkdir()
    (bad / "Manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not a readable Core ML package"):
        load_program(bad)


def test_fast_elu_is_elu_up_to_fp32_rounding_near_zero():
    x = np.concatenate([np.linspace(-8, 8, 4001), -np.logspace(-12, 0, 200)]).astype(np.float32)
    exact, fast = ops.elu(x=x, alpha=0.7), ops.elu_exp(x=x, alpha=0.7)
    np.testing.assert_array_equal(fast[x > 0], x[x > 0])  # positive inputs pass through unchanged
    assert np.abs(fast - exact).max() <= 1.2e-7  # measured 7.1e-8 (exp(x)-1 vs expm1 near 0)
    f16 = x.astype(np.float16)
    assert ops.elu_exp(x=f16).dtype == np.float16


def test_fp16_elu_table_is_the_fp32_evaluation_rounded_once():
    """fp16 elu reads a table; every entry must be what evaluating that value in fp32 and rounding gives, per
    variant and alpha (NaN, infinities, subnormals and a non-contiguous view included)."""
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.standard_normal(20_001) * 6, [np.nan, np.inf, -np.inf, 0.0, -0.0, -6e-8, 6e-8, -70000.0]])
    x = values.astype(np.float16).reshape(1, 1, -1)[..., ::3]  # strided
    for fn, expm1_inplace in ((ops.elu, ops._expm1_inplace), (ops.elu_exp, ops._exp_minus_one_inplace)):
        for alpha in (np.float16(1.0), np.float16(0.7), 0.7):
            with np.errstate(invalid="ignore", over="ignore"):
                want = ops._elu_fp32(x.astype(np.float32), alpha, expm1_inplace).astype(np.float16)
            got = fn(x=x, alpha=alpha)
            assert got.dtype == np.float16 and got.shape == x.shape
            np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    # each alpha (0.7 and fp16's 0.7002) and each variant has its own table
    assert not np.array_equal(ops.elu(x=x, alpha=1.0), ops.elu(x=x, alpha=0.7))


# ---------------------------------------------------------------------------------- the fast path's kernels

def test_f16c_conversions_give_numpys_bits():
    """to_float32 on every float16 bit pattern, to_float16 on float32 values of every class (subnormal in either
    type, halfway cases, overflow to infinity, NaN, random bit patterns), strided and 4-D inputs included."""
    from runtime_py.mil_kernels import to_float16, to_float32

    every_half = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(4, 128, 128)
    wide = to_float32(every_half)
    assert wide.dtype == np.float32 and wide.shape == every_half.shape
    want = every_half.astype(np.float32)
    assert np.array_equal(np.isnan(wide), np.isnan(want))
    np.testing.assert_array_equal(wide[~np.isnan(want)].view(np.uint32), want[~np.isnan(want)].view(np.uint32))

    r = rng(17)
    special = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 65504, 65519.99, 65520, 6e-8, 2.98e-8, 2.99e-8, 1e-45,
                        1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11], np.float32)
    values = np.concatenate([r.standard_normal(60_000).astype(np.float32) * s for s in (1e-7, 1e-5, 1, 1e4, 1e5)]
                            + [special, r.integers(0, 2 ** 32, 60_000, dtype=np.uint64).astype(np.uint32).view(np.float32)])
    x = values[: values.size // 6 * 6].reshape(2, 3, -1, 2)[..., ::2]  # 4-D and strided
    with np.errstate(over="ignore", invalid="ignore"):
        want16 = x.astype(np.float16)
    got16 = to_float16(x)
    assert got16.dtype == np.float16 and got16.shape == x.shape
    assert np.array_equal(np.isnan(got16), np.isnan(want16))
    np.testing.assert_array_equal(got16[~np.isnan(want16)].view(np.uint16), want16[~np.isnan(want16)].view(np.uint16))
    assert to_float16(got16) is got16 and to_float32(wide) is wide  # already that dtype: no copy


def test_conv_model_bytes_are_a_valid_onnx_model():
    """The hand-written protobuf parses with the onnx package, passes its checker and runs in onnxruntime."""
    onnx = pytest.importorskip("onnx")
    from runtime_py.mil_kernels import _session, conv_onnx_model

    r = rng(5)
    w, b = r.standard_normal((6, 2, 3, 5)).astype(np.float32), r.standard_normal(6).astype(np.float32)
    model = conv_onnx_model(w, b, (1, 4, 9, 11), (1, 6, 4, 5), (1, 2, 0, 1), (2, 2), (1, 1), 2)
    proto = onnx.load_from_string(model)
    onnx.checker.check_model(proto, full_check=True)
    (node,) = proto.graph.node
    assert node.op_type == "Conv" and {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} == {
        "kernel_shape": [3, 5], "pads": [1, 2, 0, 1], "strides": [2, 2], "dilations": [1, 1], "group": 2}
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(proto.graph.initializer[0]), w)
    x = r.standard_normal((1, 4, 9, 11)).astype(np.float32)
    (y,) = _session(model).run(None, {"x": x})
    ref = F.conv2d(F.pad(torch.from_numpy(x), (2, 1, 1, 0)), torch.from_numpy(w), torch.from_numpy(b), stride=2, groups=2)
    np.testing.assert_allclose(y, ref.numpy(), atol=1e-5)


def test_fast_conv_without_onnxruntime_names_the_package_and_the_exact_path(monkeypatch):
    import sys

    from runtime_py.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    x, w = np.ones((1, 1, 3, 3), np.float16), np.ones((1, 1, 1, 1), np.float16)
    with pytest.raises(MissingDependencyError, match=r"onnxruntime is not installed.*GMCNN_MIL_EXECUTOR=exact"):
        ops.conv_fast(x=x, weight=w)
    assert ops.conv(x=x, weight=w).dtype == np.float16  # the exact path needs NumPy alone


# ---------------------------------------------------------------------------------- activation quantization

def test_quantize_dequantize_match_coremltools_reference():
    """iOS17 quantize/dequantize against coremltools' own value inference (per tensor and per channel)."""
    from coremltools.optimize._utils import dequantize_by_scale_and_zp, quantize_by_scale_and_zp

    r = rng(11)
    x = (r.normal(0, 3, (1, 4, 5, 6))).astype(np.float16)
    for scale, zp, axis in ((np.float16(0.05), None, None), (np.float16(0.02), np.int8(3), None),
                            (np.array([0.01, 0.02, 0.05, 0.1], np.float16), np.array([0, 1, -2, 5], np.int8), 1)):
        q = ops.quantize(input=x, scale=scale, zero_point=zp, axis=axis, output_dtype="int8")
        s_b = np.asarray(scale).reshape(1, -1, 1, 1) if axis is not None else np.asarray(scale)
        z_b = None if zp is None else (np.asarray(zp).reshape(1, -1, 1, 1) if axis is not None else np.asarray(zp))
        expected = quantize_by_scale_and_zp(x.astype(np.float32), s_b.astype(np.float32), z_b, "int8")
        assert q.dtype == np.int8
        np.testing.assert_array_equal(q, expected)
        y = ops.dequantize(input=q, scale=scale, zero_point=zp, axis=axis)
        assert y.dtype == np.float16
        np.testing.assert_allclose(y.astype(np.float32),
                                   dequantize_by_scale_and_zp(q, s_b.astype(np.float32), z_b), rtol=1e-3)


def test_quantize_hand_case_rounds_half_to_even_and_saturates():
    x = np.array([-1000.0, -0.25, 0.25, 0.75, 1.0, 1000.0], np.float16)
    q = ops.quantize(input=x, scale=np.float16(0.5), output_dtype="int8")
    np.testing.assert_array_equal(q, [-128, 0, 0, 2, 2, 127])  # -0.5 -> -0, 0.5 -> 0, 1.5 -> 2
    u = ops.quantize(input=x, scale=np.float16(0.5), zero_point=np.uint8(128), output_dtype="uint8")
    np.testing.assert_array_equal(u, [0, 128, 128, 130, 130, 255])
    np.testing.assert_array_equal(ops.dequantize(input=u, scale=np.float16(0.5), zero_point=np.uint8(128)),
                                  np.array([-64, 0, 0, 1, 1, 63.5], np.float16))


def test_coremltools_is_imported_without_its_linux_notices():
    """Off macOS coremltools says "Failed to load _MLModelProxy ..." once per missing native proxy and
    warns about untested torch/TensorFlow versions on every import; the one place the project imports it
    keeps that off the user's terminal (a plain import, run the same way, does print it)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent

    def stderr_of(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=root).stderr

    plain = stderr_of("import coremltools, coremltools.models.model, coremltools.models.compute_plan")
    quiet = stderr_of("from runtime_py.mil_executor import import_coremltools; import_coremltools()")
    notices = ("Failed to load _ML", "has not been tested with coremltools")
    if sys.platform != "darwin":
        assert any(n in plain for n in notices)
    assert not any(n in quiet for n in notices), quiet[-2000:]


def _tiny_samples(n: int, seed: int = 0):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from coreml_fixtures import TINY_TF_SHAPE, sample_inputs

    from export.samples import Samples

    images, masks = sample_inputs(TINY_TF_SHAPE, n=n, seed=seed)
    return Samples(images, masks, [f"s{i}" for i in range(n)])


def test_an_image_package_takes_its_model_core_from_the_tensor_package_run_bit_for_bit():
    """export.coreml.gate_session: the tiny generator's fp16 packages, tensor gated first. The image package's
    outputs are the bytes it gives alone; its core came from the tensor package's runs for the samples those saw,
    and was computed for a sample they did not. The w8 image package, whose core shares at most the layers the w8
    compression leaves in fp16 with the fp16 packages', gives its own bytes too."""
    from coreml_fixtures import tiny_artifact

    from export import coreml
    from runtime_py.mil_executor import CoreSharing, runs_served_by_sharing

    tensor, image, image_w8 = tiny_artifact("fp16", "tensor"), tiny_artifact("fp16", "image"), tiny_artifact("w8", "image")
    samples, other = _tiny_samples(2), _tiny_samples(1, seed=7)
    alone = {(p, which): coreml.run(p, "image", s)[0] for p, which, s in ((image, "samples", samples),
                                                                         (image, "other", other),
                                                                         (image_w8, "samples", samples))}
    with coreml.gate_session([tensor, image]) as sharing:
        assert isinstance(sharing, CoreSharing)
        coreml.run(tensor, "tensor", samples)
        assert len(sharing.values) == 2  # one value a sample: the core's last, which the image package reads
        shared, executor = coreml.run(image, "image", samples)
        assert runs_served_by_sharing() == 2 and "model core of 2 of 2 samples" in executor
        assert shared.tobytes() == alone[(image, "samples")].tobytes()
        out, executor = coreml.run(image, "image", other)
        assert runs_served_by_sharing() == 2 and "model core" not in executor
        assert out.tobytes() == alone[(image, "other")].tobytes()
    assert runs_served_by_sharing() == 0
    with coreml.gate_session([tensor, image_w8, tensor.with_name("missing.mlpackage")]):  # one that does not load
        coreml.run(tensor, "tensor", samples)
        assert coreml.run(image_w8, "image", samples)[0].tobytes() == alone[(image_w8, "samples")].tobytes()


def test_a_gated_package_runs_all_its_samples_in_one_freed_memory_block(monkeypatch):
    """export.coreml.run: every inference of a package's samples inside one runtime_py.memory.reuse_freed_memory
    block (the executor's own block, one an inference, nested in it), so that an inference takes what the one
    before it freed; the block is left when the samples are done, and the outputs are those of the runs alone."""
    from coreml_fixtures import tiny_artifact

    from export import coreml, parity
    from runtime_py import memory

    package, samples = tiny_artifact("fp16", "tensor"), _tiny_samples(2)
    alone = np.concatenate([coreml.run(package, "tensor", samples.subset([i]))[0] for i in range(2)])
    depths = []

    def run_samples(engine, feed, keep_going=None):
        infer = engine.infer

        def recorded(*args, **kwargs):
            depths.append(memory._reuse_depth)
            return infer(*args, **kwargs)

        engine.infer = recorded
        return real_run_samples(engine, feed, keep_going)

    real_run_samples = parity.run_samples
    monkeypatch.setattr(parity, "run_samples", run_samples)
    out, _ = coreml.run(package, "tensor", samples)
    assert depths == [1, 1]  # both inferences inside the one block
    assert memory._reuse_depth == 0
    assert out.tobytes() == alone.tobytes()


def test_the_model_core_starts_at_the_first_convolution_and_digests_weights_by_content():
    """find_model_core: the cut is the first conv's input; the fp16 tensor and image packages' cores share every
    convolution's digest, the w8 package's convolutions that the compression quantized have digests of their own."""
    from coreml_fixtures import tiny_artifact

    from runtime_py.mil_executor import find_model_core, load_program

    programs = {key: load_program(tiny_artifact(*key)) for key in (("fp16", "tensor"), ("fp16", "image"),
                                                                    ("w8", "tensor"))}
    cores = {key: find_model_core(program) for key, program in programs.items()}
    for key, core in cores.items():
        assert core.cut == next(s for s in programs[key].steps if s.op_type == "conv").inputs["x"]

    def conv_digests(key):
        return [cores[key].digests[s.outputs[0][0]] for s in programs[key].steps if s.op_type == "conv"]

    fp16, fp16_image, w8 = conv_digests(("fp16", "tensor")), conv_digests(("fp16", "image")), conv_digests(("w8", "tensor"))
    assert fp16 == fp16_image and len(fp16) == len(w8)
    assert fp16[-1] != w8[-1] and any(a != b for a, b in zip(fp16, w8))


def test_a_served_run_skips_the_core_ops():
    """Inside the block the image program's served run times no convolution (its core), only the ops around it."""
    from coreml_fixtures import tiny_artifact

    from runtime_py.mil_executor import load_program, sharing_model_core

    tensor, image = tiny_artifact("fp16", "tensor"), tiny_artifact("fp16", "image")
    samples = _tiny_samples(1)
    t_prog, i_prog = load_program(tensor), load_program(image)
    feed = {spec.name: (np.transpose(samples.images, (0, 3, 1, 2)).astype(np.float32) / 127.5 - 1.0
                        if spec.shape[1] == 3 else (np.transpose(samples.masks, (0, 3, 1, 2)) >= 128).astype(np.float32))
            for spec in t_prog.inputs}
    with sharing_model_core([tensor, image]):
        t_prog(feed)
        timings = {}
        i_prog(i_prog.unbatched({"image": samples.images, "mask": samples.masks}), timings=timings)
    assert "conv" not in timings and timings  # the ops around the core ran
