"""Core ML export: tiny GMCNN programs converted, checked structurally, and executed by the
reference executor against PyTorch within the tolerance table (export.coreml.EXECUTOR_TOLERANCES)."""
from __future__ import annotations

import importlib.util
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

# Not importorskip: importing coremltools (it imports TensorFlow and torch) costs ~10 s of CPU, and every xdist
# worker collects every module; only the worker that runs these tests pays it (tests/conftest.py groups them).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("coremltools") is None, reason="could not import 'coremltools'")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from coreml_fixtures import (TINY_TF_SHAPE, TINY_TORCH_SHAPE, composite_u8, sample_inputs,  # noqa: E402
                             scaled_generator, tiny_artifact, torch_reference)
from export.coreml import EXECUTOR_TOLERANCES, convert_generator, kmeans_1d, predict_samples  # noqa: E402
from runtime_py.errors import UserError  # noqa: E402
from runtime_py.metrics import psnr  # noqa: E402
from runtime_py.mil_executor import load_program  # noqa: E402


# Reference executor vs PyTorch fp32 at the sizes these tests use (sample_inputs(n=1, seed 0); the executor is
# numpy, so repeated runs give the same numbers). Measured: `pytest -s -k "tolerance or composite or reflect or
# exactly" tests/test_coreml_export.py` prints each. The full-size table export.coreml.EXECUTOR_TOLERANCES (cnum 32,
# 512x680) is 4-12x looser and would hide a regression at this size.
#   tf cnum 4, 64x96:    fp16 compute=fp32 1.01e-6 | fp16 0.00144, 64.31 dB | w8 0.0159, 50.02 dB
#                        palettized 0.0908, 39.79 dB | w8 image 2 levels, 50.04 dB
#                        w8a8 (int8 activations, min/max ranges) 0.0612, 43.53 dB | w8a8 image 6 levels, 43.69 dB
#                        (im2col fast path; the exact path 7 levels, 43.48 dB; the ONNX Runtime fast path, 2026-12-03:
#                        w8a8 tensor 0.0703, 43.28 dB, image 9 levels, 43.28 dB -- with quantized activations the
#                        fp32 summation order decides which side of a rounding step a few values land on, so its
#                        image bound is the largest of those three orders plus their spread, 9 + 3 levels, for the
#                        kernels another CPU's ONNX Runtime picks)
#   torch cnum 4, 200x204: fp16 0.00276, 60.96 dB
# Bounds: max abs 1.5x the measurement (image: +1 level), hole PSNR 2 dB under it; fp32 compute 3x (float32 kernel
# order differs between CPUs).
TINY_FP32_COMPUTE_MAX_ABS = 3e-6
TINY_TOLERANCES = {
    ("tf", "fp16"): {"max_abs": 2.2e-3, "hole_psnr_db": 62.0},
    ("tf", "w8"): {"max_abs": 0.024, "max_abs_u8": 3, "hole_psnr_db": 48.0},
    ("tf", "palettized"): {"max_abs": 0.14, "hole_psnr_db": 37.5},
    ("tf", "w8a8"): {"max_abs": 0.106, "max_abs_u8": 12, "hole_psnr_db": 41.2},
    ("torch", "fp16"): {"max_abs": 4.2e-3, "hole_psnr_db": 59.0},
}


def _to_u8(x):
    return np.round(np.clip((x.astype(np.float64) + 1) * 127.5, 0, 255)).astype(np.uint8)


def _compare(precision, io, variant="tf", compute="fp16"):
    path = tiny_artifact(precision, io, variant, compute)
    shape = TINY_TF_SHAPE if variant == "tf" else TINY_TORCH_SHAPE
    images, masks = sample_inputs(shape, n=1)
    raw = torch_reference(scaled_generator(variant), images, masks)
    out = predict_samples(path, io, images, masks)
    hole = masks[..., 0] >= 128
    if io == "tensor":
        return path, out, raw, np.abs(out - raw), psnr(_to_u8(out), _to_u8(raw), hole)
    ref = composite_u8(images, masks, raw)
    return path, out, (images, masks), np.abs(out.astype(np.float64) - ref), psnr(out, ref, hole)


def test_fp32_program_matches_pytorch_exactly():
    """With fp16 out of the way the executor's op semantics must reproduce PyTorch to float32 noise."""
    _, _, _, diff, _ = _compare("fp16", "tensor", compute="fp32")
    print(f"fp32 compute: max abs {diff.max():.3g}")
    assert diff.max() <= TINY_FP32_COMPUTE_MAX_ABS


@pytest.mark.parametrize("precision", ["fp16", "w8", "palettized", "w8a8"])
def test_tensor_io_within_tolerance(precision):
    path, out, _, diff, hole_psnr = _compare(precision, "tensor")
    print(f"{precision} tensor: max abs {diff.max():.3g}, hole PSNR {hole_psnr:.2f} dB")
    tol = TINY_TOLERANCES[("tf", precision)]
    assert out.dtype == np.float32 and out.shape == (1, *TINY_TF_SHAPE, 3)
    assert diff.max() <= tol["max_abs"], diff.max()
    assert hole_psnr >= tol["hole_psnr_db"], hole_psnr
    if precision == "fp16":
        assert diff.max() > 0  # fp16 arithmetic did happen: an fp32 run would be (near) exact


def test_program_computes_in_fp16_and_has_expected_ops():
    program = load_program(tiny_artifact("w8", "tensor"))
    conv_dtypes = {dt for s in program.steps if s.op_type == "conv" for _, dt, _ in s.outputs}
    assert conv_dtypes == {np.dtype(np.float16)}
    assert [s.dtype for s in program.inputs] == [np.float32, np.float32]
    assert {"conv", "elu", "upsample_bilinear", "upsample_nearest_neighbor", "concat", "clip", "cast"} <= set(program.op_counts)
    assert program.op_counts["constexpr_affine_dequantize"] > 0
    assert program.op_counts["conv"] == 44


@pytest.mark.parametrize("precision", ["w8", "w8a8"])
def test_image_io_composite_and_known_pixels(precision):
    """w8a8: the image signature's own ops (normalisation, composite) stay float; quantized, they moved half
    the known pixels by a level."""
    path, out, (images, masks), diff, hole_psnr = _compare(precision, "image")
    known = masks[..., 0] < 128
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[known], images[known])  # compositing and de-normalisation inside the model
    print(f"{precision} image: max abs {diff.max():g} levels, hole PSNR {hole_psnr:.2f} dB")
    tol = TINY_TOLERANCES[("tf", precision)]
    assert diff.max() <= tol["max_abs_u8"] and hole_psnr >= tol["hole_psnr_db"]
    program = load_program(path)
    assert [(s.kind, s.color) for s in program.inputs] == [("image", "RGB"), ("image", "GRAYSCALE")]
    assert (program.outputs[0].kind, program.outputs[0].color) == ("image", "RGB")


def test_image_io_mask_threshold_at_128(tmp_path):
    """Values >= 128 are hole; soft masks binarise exactly like the TFLite image signature."""
    program = load_program(tiny_artifact("w8", "image"))
    images, _ = sample_inputs(TINY_TF_SHAPE, n=1)
    hard = np.zeros(TINY_TF_SHAPE, np.uint8)
    hard[10:30, 20:50] = 255
    soft = np.where(hard > 0, 128, 127).astype(np.uint8)
    a = program({"image": images[0], "mask": hard})["output"]
    b = program({"image": images[0], "mask": soft})["output"]
    np.testing.assert_array_equal(a, b)


def test_palettized_and_w8_weights_decompress_like_coremltools():
    """Our decompression of the stored weights equals coremltools' own value inference of the same ops."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    for precision, op_type in (("w8", "constexpr_affine_dequantize"), ("palettized", "constexpr_lut_to_dense")):
        path = tiny_artifact(precision, "tensor")
        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
        prog = milproto_load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)
        ours = load_program(path).constants
        ops = [op for op in prog.functions["main"].operations if op.op_type == op_type]
        assert ops
        for op in ops:
            np.testing.assert_array_equal(ours[op.outputs[0].name], op.materialized_val_inference())


def test_the_backend_names_the_convolutions_its_w8_package_leaves_fp16():
    """export.coreml.unrounded_convs is what the quantizer did: in the w8 program the convolutions whose weights
    are a plain constant (no constexpr_affine_dequantize) are exactly those (the tiny model's filters of at most
    512 values); fp16 names none."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    from export import coreml

    model = ct.models.MLModel(str(tiny_artifact("w8", "tensor")), skip_model_load=True)
    spec = model.get_spec()
    prog = milproto_load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)
    plain = {op.inputs["weight"].name for op in prog.functions["main"].operations
             if op.op_type == "conv" and op.inputs["weight"].op.op_type == "const"}
    named = {f"generator_{module.replace('.', '_')}_weight_to_fp16"
             for module in coreml.unrounded_convs(scaled_generator("tf", 4), "w8")}
    assert plain and named == plain
    assert coreml.unrounded_convs(scaled_generator("tf", 4), "fp16") == set()


def test_torch_variant_reflect_pads():
    path, _, _, diff, hole_psnr = _compare("fp16", "tensor", variant="torch")
    assert load_program(path).op_counts["pad"] == 44
    print(f"torch fp16 tensor: max abs {diff.max():.3g}, hole PSNR {hole_psnr:.2f} dB")
    tol = TINY_TOLERANCES[("torch", "fp16")]
    assert diff.max() <= tol["max_abs"] and hole_psnr >= tol["hole_psnr_db"]


def test_metadata_filled_in():
    import coremltools as ct

    model = ct.models.MLModel(str(tiny_artifact("w8", "image")), skip_model_load=True)
    meta = model.user_defined_metadata
    assert meta["gmcnn_mobile.variant"] == "tf" and meta["gmcnn_mobile.cnum"] == "4"
    assert meta["gmcnn_mobile.shape"] == "64x96" and meta["gmcnn_mobile.precision"] == "w8"
    assert meta["gmcnn_mobile.io"] == "image" and meta["gmcnn_mobile.checkpoint_sha256"] == "0" * 64
    assert meta["gmcnn_mobile.mask_polarity"].startswith("255=hole")
    assert not any("date" in key for key in meta), "a conversion date makes the bytes differ from day to day"
    assert model.author and model.license and "GMCNN" in model.short_description
    assert "255 = hole" in model.input_description["mask"]
    assert "prediction inside the hole" in model.output_description["output"]


def test_bad_requests_are_user_errors(tmp_path):
    gen = scaled_generator("tf")
    with pytest.raises(UserError, match="not a multiple of 4"):
        convert_generator(gen, (62, 96), "fp16", "tensor", tmp_path)
    with pytest.raises(UserError, match="unknown Core ML precision"):
        convert_generator(gen, (64, 96), "int4", "tensor", tmp_path)
    with pytest.raises(UserError, match="unknown I/O signature"):
        convert_generator(gen, (64, 96), "fp16", "rgb", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_nothing_and_replacement_is_atomic(tmp_path, monkeypatch):
    from export import coreml

    src = tiny_artifact("fp16", "tensor")
    model_dir = tmp_path / "out"

    class Model:
        def __init__(self, fail):
            self.fail = fail

        def save(self, path):
            import shutil

            shutil.copytree(src, path)
            if self.fail:
                raise OSError("disk full")

    final = coreml.save_atomically(Model(False), model_dir / "a.mlpackage")
    first = sorted(p.relative_to(final) for p in final.rglob("*"))
    with pytest.raises(OSError):
        coreml.save_atomically(Model(True), model_dir / "a.mlpackage")
    with pytest.raises(OSError):
        coreml.save_atomically(Model(True), model_dir / "b.mlpackage")
    assert sorted(p.name for p in model_dir.iterdir()) == ["a.mlpackage"]  # no temp dirs, no partial b
    assert sorted(p.relative_to(final) for p in final.rglob("*")) == first
    coreml.save_atomically(Model(False), model_dir / "a.mlpackage")  # replace an existing package
    assert sorted(p.name for p in model_dir.iterdir()) == ["a.mlpackage"]


def test_the_same_model_saves_into_the_same_package_bytes(tmp_path):
    """coremltools draws each package item's identifier at random; save_atomically names them from their path
    and contents, so two saves of one model are the same bytes (and so the same manifest digest), and the
    package still loads. An item of other contents gets another identifier: the `image` signature's program
    differs from the `tensor` one's, their weights are the same bytes."""
    import json
    import uuid

    import coremltools as ct

    from export import coreml
    from runtime_py.manifest import artifact_digest

    src = tiny_artifact("fp16", "tensor")
    saved = [coreml.save_atomically(ct.models.MLModel(str(src), skip_model_load=True), tmp_path / f"{n}.mlpackage")
             for n in ("a", "b")]
    files = [{f.relative_to(p).as_posix(): f.read_bytes() for f in p.rglob("*") if f.is_file()} for p in saved]
    assert files[0] == files[1] and artifact_digest(saved[0]) == artifact_digest(saved[1])
    index = json.loads(files[0]["Manifest.json"])
    items = index["itemInfoEntries"]
    assert [item["path"] for item in items.values()] == ["com.apple.CoreML/model.mlmodel", "com.apple.CoreML/weights"]
    assert all(uuid.UUID(key).version == 5 for key in items)
    assert items[index["rootModelIdentifier"]]["name"] == "model.mlmodel"
    assert load_program(saved[0]).outputs  # the program reads back through the rewritten index
    other = coreml.save_atomically(ct.models.MLModel(str(tiny_artifact("fp16", "image")), skip_model_load=True),
                                   tmp_path / "c.mlpackage")
    other_items = json.loads((other / "Manifest.json").read_text())["itemInfoEntries"]
    same_bytes = {f.relative_to(other).as_posix(): f.read_bytes() == files[0].get(f.relative_to(other).as_posix())
                  for f in other.rglob("*") if f.is_file()}
    assert same_bytes == {"Manifest.json": False, "Data/com.apple.CoreML/model.mlmodel": False,
                          "Data/com.apple.CoreML/weights/weight.bin": True}
    assert [key in items for key in other_items] == [False, True]


def test_trace_shape_halves_down_to_the_smallest_side_a_program_needs():
    from export.coreml import trace_shape

    assert trace_shape("tf", (512, 680)) == (256, 340)
    assert trace_shape("tf", (1024, 1360)) == (256, 340)
    assert trace_shape("tf", TINY_TF_SHAPE) == TINY_TF_SHAPE
    assert trace_shape("tf", (1024, 1364)) == (1024, 1364)  # 682 is no multiple of 4
    assert trace_shape("tf", (64, 96), min_side=8) == (8, 12)
    assert trace_shape("torch", (400, 408), min_side=8) == (200, 204)  # the torch variant's 196 px


@pytest.mark.parametrize("variant,io,shape", [("tf", "tensor", (64, 96)), ("tf", "image", (64, 96)),
                                              ("torch", "image", (400, 408))])
def test_a_program_traced_at_a_smaller_shape_is_the_same_package(tmp_path, monkeypatch, variant, io, shape):
    """The generator's TorchScript trace does not depend on the shape it ran at (export.coreml.trace_shape): a
    package converted from a trace at the smallest shape the rule allows is the bytes of one traced at its own."""
    from export import coreml
    from runtime_py.manifest import artifact_digest

    digests, said = [], []
    for tag, min_side in (("full", 10 ** 6), ("small", 8)):
        monkeypatch.setattr(coreml, "TRACE_MIN_SIDE", min_side)
        path = convert_generator(scaled_generator(variant), shape, "fp16", io, tmp_path / tag, checkpoint_sha256="0" * 64,
                                 progress=said.append)
        digests.append(artifact_digest(path)[0])
    small = coreml.trace_shape(variant, shape, min_side=8)
    assert small != shape and f"tracing at {small[0]}x{small[1]}" in " ".join(said)
    assert digests[0] == digests[1]


def test_kmeans_palette():
    r = np.random.default_rng(0)
    w = np.concatenate([r.normal(-1, 0.01, 500), r.normal(2, 0.01, 300)])
    lut, idx = kmeans_1d(w, 1)
    np.testing.assert_allclose(sorted(lut), [-1, 2], atol=0.01)
    assert idx.dtype == np.uint8 and np.abs(lut[idx] - w).max() < 0.05  # every weight on its own cluster's centre
    w6 = r.standard_normal(5000)
    lut6, idx6 = kmeans_1d(w6, 6)
    assert lut6.shape == (64,) and np.all(np.diff(lut6) > 0)
    np.testing.assert_array_equal(idx6, np.abs(w6[:, None] - lut6[None, :]).argmin(axis=1))  # nearest centre


def test_weight_constants_are_found_by_the_traced_parameter_path():
    """weight_const_names on a program's convolutions (stand-ins: it reads only each op's type and the name of
    the op making its weight): the one constant ending in the module's path; none or two is a UserError."""
    from types import SimpleNamespace as Op

    from export.coreml import weight_const_names

    def conv(weight):
        return Op(op_type="conv", inputs={"weight": Op(op=Op(name=weight))})

    ops = [conv("generator_net_layers_b1conv1_weight_to_fp16"), conv("generator_net_layers_b1conv10_weight_to_fp16"),
           Op(op_type="elu", inputs={}), conv("generator_net_layers_b2conv1_weight_to_fp16"),
           conv("copy_net_layers_b2conv1_weight_to_fp16")]
    model = Op(_mil_program=Op(functions={"main": Op(operations=ops)}))
    assert weight_const_names(model, ["net.layers.b1conv1", "net.layers.b1conv10"]) == {
        "net.layers.b1conv1": "generator_net_layers_b1conv1_weight_to_fp16",
        "net.layers.b1conv10": "generator_net_layers_b1conv10_weight_to_fp16"}
    for missing_or_twice in ("net.layers.b3conv1", "net.layers.b2conv1"):
        with pytest.raises(UserError, match=f"convolution {missing_or_twice} has no unique weight constant"):
            weight_const_names(model, [missing_or_twice])


@pytest.mark.skipif(platform.system() != "Darwin", reason="Core ML predict runs only on macOS")
@pytest.mark.parametrize("precision,io", [("fp16", "tensor"), ("w8", "tensor"), ("w8", "image")])
def test_reference_executor_matches_real_coreml(precision, io):
    path = tiny_artifact(precision, io)
    images, masks = sample_inputs(TINY_TF_SHAPE, n=1)
    ours = predict_samples(path, io, images, masks)
    real = predict_samples(path, io, images, masks, reference=False, compute_units="CPU_ONLY")
    if io == "tensor":
        assert np.abs(ours - real).max() <= EXECUTOR_TOLERANCES[precision]["max_abs"]
    else:
        assert np.abs(ours.astype(int) - real.astype(int)).max() <= EXECUTOR_TOLERANCES[precision]["max_abs_u8"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "w8"])
def test_full_size_cnum32_matches_pytorch(tmp_path, precision):
    gen = scaled_generator("tf", 32)
    shape = (512, 680)
    path = convert_generator(gen, shape, precision, "tensor", tmp_path)
    images, masks = sample_inputs(shape, n=1)
    out = predict_samples(path, "tensor", images, masks)
    raw = torch_reference(gen, images, masks)
    tol = EXECUTOR_TOLERANCES[precision]
    assert np.abs(out - raw).max() <= tol["max_abs"]
    assert psnr(_to_u8(out), _to_u8(raw), masks[..., 0] >= 128) >= tol["hole_psnr_db"]


@pytest.mark.slow
def test_full_size_fast_executor_path_matches_the_exact_one(tmp_path, monkeypatch):
    """The shipped model at 512x680, fp16 tensor program, one sample: the gate's fast path (convolutions in ONNX
    Runtime, matrix bilinear, exp-based elu) against the exact op-by-op path. Measured on this sample (2026-12-03):
    max |fast - exact| 0.0029 (3 fp16 ulps at 1.0), mean 2.4e-4, 68 % of the outputs differ (fp32 summation
    order through 44 convolutions); on a held-out photo 0.0039 and 2.3e-4 (docs/COREML.md). The im2col path
    before it measured the same on this sample (0.0029, 2.4e-4). Output in [-1, 1]."""
    from models import load_generator
    from runtime_py.mil_executor import MODE_ENV

    path = convert_generator(load_generator(None), (512, 680), "fp16", "tensor", tmp_path)
    images, masks = sample_inputs((512, 680), n=1)
    monkeypatch.setenv(MODE_ENV, "fast")
    fast = predict_samples(path, "tensor", images, masks)
    monkeypatch.setenv(MODE_ENV, "exact")
    exact = predict_samples(path, "tensor", images, masks)
    diff = np.abs(fast - exact)
    assert diff.max() <= 4 * 2.0 ** -10 and diff.mean() <= 4e-4, (diff.max(), diff.mean())


def _copy_cached(precision, io):
    def convert(job, converted=None):  # export.coreml.convert's signature (convert_many passes its conversions)
        shutil.copytree(tiny_artifact(precision, io), job.out)
        return job.out

    return convert


def test_export_gate_runs_coreml_through_reference_executor(tmp_path, monkeypatch):
    """The export command's parity gate executes Core ML artifacts here and records which executor did."""
    from export import api, coreml
    from runtime_py.manifest import load_manifest

    monkeypatch.setattr(coreml, "convert", _copy_cached("w8", "image"))  # conversion is tested above
    gen = scaled_generator("tf")
    api.export_artifacts(gen, tmp_path / "ok", shapes=[TINY_TF_SHAPE], formats=["coreml"], precisions=["w8"],
                         ios=["image"], progress=False)
    (art,) = load_manifest(tmp_path / "ok").artifacts
    assert art.format == "coreml" and art.file.endswith(".mlpackage") and (tmp_path / "ok" / art.file).is_dir()
    if platform.system() != "Darwin":  # and the executor's path that gated it: the default, fast
        assert art.parity.executor.startswith("coreml-reference-executor") and "fast path" in art.parity.executor
    # measured 51.16 dB over the 4 held-out samples (printed with -s; docs/COREML.md: 51.2); bound 2 dB under,
    # as TINY_TOLERANCES (the w8 gate row itself is lower: it is for full-size models)
    print(f"gate, w8 image: hole PSNR {art.parity.hole_psnr_db} dB over {art.parity.samples} samples")
    assert art.parity.passed and art.parity.samples > 0 and art.parity.hole_psnr_db >= 49.0
    assert art.op_inventory["weight_decompression_ops"] > 0 and art.op_inventory["compute_dtype"] == "float16"
    assert [t.shape for t in art.inputs] == [[1, 64, 96, 3], [1, 64, 96, 1]]

    with pytest.raises(api.ExportFailed) as err:
        api.export_artifacts(gen, tmp_path / "bad", shapes=[TINY_TF_SHAPE], formats=["coreml"], precisions=["w8"],
                             ios=["image"], tolerances={"w8": {"min_hole_psnr_db": 99.0}}, quant_fallback=False,
                             progress=False)
    assert "w8" in str(err.value) and "hole PSNR" in str(err.value)
    assert not [p for p in (tmp_path / "bad").iterdir() if p.suffix == ".mlpackage" or p.name.startswith(".partial")]


def test_missing_coremltools_names_the_extra(monkeypatch):
    import builtins

    from export import coreml
    from runtime_py.errors import MissingDependencyError

    path = tiny_artifact("fp16", "tensor")
    real_import = builtins.__import__

    def no_coremltools(name, *args, **kwargs):
        if name == "coremltools" or name.startswith("coremltools."):
            raise ImportError("No module named 'coremltools'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_coremltools)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # check_available looks coremltools up without importing it
                        lambda name, *a: None if name == "coremltools" else real_find_spec(name, *a))
    with pytest.raises(MissingDependencyError, match=r"gmcnn-mobile\[export\]"):
        coreml.check_available()
    with pytest.raises(MissingDependencyError, match="coremltools"):
        load_program(path)


def test_w8a8_quantizes_activations_and_runs_in_the_executor():
    """w8a8: int8 quantize/dequantize pairs around every convolution, ELU and clip input (ranges
    calibrated by running the fp16 program in the reference executor, chosen per tensor), int8
    weights; the executor runs it, and the rounding it adds shows against the w8 program."""
    from coreml_fixtures import tiny_report
    from export.coreml import quantization_summary
    from export.quant_ranges import METHODS

    path = tiny_artifact("w8a8", "tensor")
    program = load_program(path)
    counts = program.op_counts
    assert counts["quantize"] == counts["dequantize"] > 80
    producer = {s.outputs[0][0]: s.op_type for s in program.steps}
    consumers = [s for s in program.steps if s.op_type in ("conv", "elu", "clip")]
    assert len(consumers) == 88 and {producer.get(s.inputs["x"]) for s in consumers} == {"dequantize"}
    q_steps = [s for s in program.steps if s.op_type == "quantize"]
    assert {str(dt) for s in q_steps for _, dt, _ in s.outputs} == {"int8"}
    assert program.spec_version >= 8  # iOS 17 ops
    _, out, _, _, _ = _compare("w8a8", "tensor")
    _, w8_out, _, _, _ = _compare("w8", "tensor")
    assert np.abs(out - w8_out).max() > 1e-3
    calibration = tiny_report("w8a8", "tensor")["calibration"]
    summary = quantization_summary(path, "w8a8", {"calibration": calibration})
    assert summary["conv_macs_quantized_fraction"] > 0.8 and "per output channel" in summary["weights"]
    tensors = summary["activations"]["tensors"]
    assert calibration["samples"] == 4 and len(tensors) > 86
    for t in tensors.values():
        lo, hi = t["range"]
        assert t["method"] in METHODS and lo == -hi and hi >= max(abs(t["min"]), abs(t["max"])) * 0.01


def test_w8_keep_float_leaves_the_named_convolutions_in_fp16(tmp_path, monkeypatch):
    """The fallback's lever for w8: the named convolutions keep fp16 weights, every other large
    filter is still int8 (decompressed by constexpr_affine_dequantize at load). Converted once (issue 17):
    the plain w8 package and the candidate compress one converted program (ct.convert runs once), and the
    plain one is the package a conversion of its own writes."""
    import coremltools as ct

    from export.coreml import quantization_summary
    from test_export_reference import package_digest

    def fp16_convs(path):
        program = load_program(path)
        return sorted(s.name for s in program.steps
                      if s.op_type == "conv" and s.inputs["weight"] not in program.decompressed)

    base = fp16_convs(tiny_artifact("w8", "tensor"))
    conversions = []
    real_convert = ct.convert
    monkeypatch.setattr(ct, "convert", lambda *a, **k: conversions.append(1) or real_convert(*a, **k))
    converted, gen = {}, scaled_generator("tf")
    plain = convert_generator(gen, TINY_TF_SHAPE, "w8", "tensor", tmp_path, checkpoint_sha256="0" * 64,
                              converted=converted)
    path = convert_generator(gen, TINY_TF_SHAPE, "w8", "tensor", tmp_path, name="keep.mlpackage",
                             keep_float=("net.layers.b1conv5",), converted=converted)
    assert len(conversions) == 1 and len(converted) == 1
    assert package_digest(plain) == package_digest(tiny_artifact("w8", "tensor"))
    kept = fp16_convs(path)
    assert len(kept) == len(base) + 1 and set(base) < set(kept)
    summary = quantization_summary(path, "w8")
    assert sorted(summary["float_convs"]) == kept
    assert summary["conv_macs_quantized_fraction"] < quantization_summary(tiny_artifact("w8", "tensor"),
                                                                          "w8")["conv_macs_quantized_fraction"]
    with pytest.raises(UserError, match="no unique weight constant"):
        convert_generator(scaled_generator("tf"), TINY_TF_SHAPE, "w8", "tensor", tmp_path, name="x.mlpackage",
                          keep_float=("net.layers.nonexistent",))
