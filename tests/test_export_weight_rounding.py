"""Error-compensating weight rounding (issue 13): int8 filters whose levels, on the converter's own grid, are chosen
for the layer's output error on the calibration inputs (export.weight_rounding), written into TFLite int8 and
int8-dynamic files (export.tflite.round_weights)."""
import json

import numpy as np
import pytest

from helpers import TINY_EXPORT_SHAPE, lively_generator

SHAPE = TINY_EXPORT_SHAPE


def _correlated_inputs(rng, n, mix, size=12):
    """(n, C, size, size) float32: smooth channels mixed from two sources by ``mix`` (C, 2), plus a little noise;
    channel 0 20x wider (a GMCNN-like outlier)."""
    import torch

    base = torch.as_tensor(rng.normal(0, 1, (n, 2, size, size)), dtype=torch.float32)
    base = torch.nn.functional.avg_pool2d(base, 3, stride=1, padding=1)
    x = torch.einsum("nkhw,ck->nchw", base, torch.as_tensor(mix, dtype=torch.float32)) + 0.1 * torch.as_tensor(
        rng.normal(0, 1, (n, mix.shape[0], size, size)), dtype=torch.float32)
    x[:, 0] *= 20
    return x


def test_compensated_rounding_halves_a_layers_output_error_on_the_same_grid():
    """On inputs with correlated channels and one wide one: the compensated levels' output error on held-out inputs
    is well under nearest rounding's; every level is on the converter's grid (-127..127, the same scale per output
    channel: re-rounding the dequantized filter to nearest gives the levels back, and each channel keeps +-127)."""
    import torch
    import torch.nn.functional as F

    from export.weight_rounding import channel_scales, compensated_levels_of, nearest_levels

    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.1, (8, 6, 3, 3)).astype(np.float32)
    mix = rng.normal(0, 1, (6, 2))
    fit, held = _correlated_inputs(rng, 16, mix), _correlated_inputs(rng, 16, mix)
    cols = F.unfold(fit, 3, padding=1).permute(1, 0, 2).reshape(54, -1).double()
    hessian = (cols @ cols.T / cols.shape[1]).numpy()

    levels = compensated_levels_of(weight, hessian)
    nearest = nearest_levels(weight)
    scale = channel_scales(weight).reshape(-1, 1, 1, 1)
    assert levels.dtype == np.int8 and levels.shape == weight.shape and np.abs(levels).max() <= 127
    assert not np.array_equal(levels, nearest)
    dequantized = levels.astype(np.float32) * scale
    assert np.array_equal(nearest_levels(dequantized), levels)
    np.testing.assert_array_equal(channel_scales(dequantized), channel_scales(weight))
    assert (np.abs(levels.reshape(8, -1)).max(axis=1) == 127).all()

    def error(q):
        ref = F.conv2d(held, torch.as_tensor(weight), padding=1)
        return float((F.conv2d(held, torch.as_tensor(q.astype(np.float32) * scale), padding=1) - ref).norm())

    # measured: 0.34 of nearest rounding's error with this seed, 0.34-0.48 with seeds 0-5
    assert error(levels) < 0.5 * error(nearest), (error(levels), error(nearest))


def test_hessians_are_taken_around_the_hole_and_anywhere():
    """The crops' second moments: one (d, d) symmetric matrix per convolution, in unfold's patch order; a hole
    (mask channel 1) shows in the first convolution's mask-channel entries, which a sample without a hole leaves 0."""
    import torch

    from export.samples import CALIBRATION_DIR, load_samples
    from export.weight_rounding import input_hessians

    gen = lively_generator("tf", 4, seed=0)
    samples = load_samples(CALIBRATION_DIR, SHAPE, 1, seed=1, limit=2)
    convs = {n: m for n, m in gen.named_modules() if isinstance(m, torch.nn.Conv2d)}
    hessians = dict(input_hessians(gen, samples))
    assert sorted(hessians) == sorted(convs)
    for name, h in hessians.items():
        d = convs[name].in_channels * convs[name].kernel_size[0] * convs[name].kernel_size[1]
        assert h.shape == (d, d) and np.allclose(h, h.T) and (np.diag(h) >= 0).all()
    first = next(iter(convs))
    taps = convs[first].kernel_size[0] * convs[first].kernel_size[1]
    mask_channel = convs[first].in_channels - 1  # [image*(1-mask) x3, ones, mask]
    patch = slice(mask_channel * taps, (mask_channel + 1) * taps)
    assert np.diag(hessians[first])[patch].max() > 0
    no_hole = load_samples(CALIBRATION_DIR, SHAPE, 1, seed=1, limit=1)
    no_hole.masks[:] = 0
    assert np.diag(dict(input_hessians(gen, no_hole))[first])[patch].max() == 0


def test_set_conv_levels_writes_on_the_files_grid_and_leaves_another_grid(tiny_mixed_export):
    """Levels on the file's scales are written (the file's filter becomes levels x scale); levels chosen on other
    scales leave that filter as the converter wrote it; a float filter is skipped."""
    from export import tflite_graph as g

    work = tiny_mixed_export / ".work" / f"tflite_{SHAPE[0]}x{SHAPE[1]}_tensor"
    raw = (work / "converter_int8-dynamic.tflite").read_bytes()
    model = g.read(raw)
    sg = model.subgraphs[0]
    int8 = [(n, i) for n, i in g.conv_nodes(model)
            if sg.tensors[list(sg.operators[i].inputs)[1]].type == g.schema.TensorType.INT8]
    assert len(int8) >= 10
    rng = np.random.default_rng(0)
    wanted = {}
    for n, i in int8:
        t = sg.tensors[list(sg.operators[i].inputs)[1]]
        shape = list(t.shape)
        scale = np.asarray(t.quantization.scale, np.float32)
        wanted[n] = (rng.integers(-127, 128, shape).astype(np.int8), scale)
    other = int8[0][0]
    wanted[other] = (wanted[other][0], wanted[other][1] * 1.01)
    written, mismatched = g.set_conv_levels(model, wanted)
    assert mismatched == [other] and sorted(written) == sorted(n for n, _ in int8[1:])
    again = g.read(g.write(model))
    nodes = dict(g.conv_nodes(again))
    for n, _ in int8[1:]:
        levels, scale = wanted[n]
        np.testing.assert_array_equal(g.conv_weights(again, nodes[n]),
                                      levels.astype(np.float32) * scale.reshape(-1, 1, 1, 1))
    np.testing.assert_array_equal(g.conv_weights(again, nodes[other]), g.conv_weights(g.read(raw), dict(int8)[other]))
    with pytest.raises(ValueError, match="levels of shape"):
        g.set_conv_levels(g.read(raw), {int8[1][0]: (np.zeros((1, 1, 1, 1), np.int8), wanted[int8[1][0]][1])})


@pytest.fixture(scope="module")
def gptq_export(tmp_path_factory):
    """A tiny export with ``--weight-rounding gptq``: TFLite int8 and int8-dynamic, both signatures, no fallback,
    the work folder kept (the converter's own files)."""
    from export.api import export_artifacts

    out = tmp_path_factory.mktemp("gptq_export")
    export_artifacts(lively_generator("tf", 4, seed=0), out, shapes=[SHAPE], formats=["tflite"],
                     precisions=["int8-dynamic", "int8"], ios=["tensor", "image"], threads=2, progress=False,
                     calibration_masks_per_photo=1, quant_fallback=False, weight_rounding="gptq", keep_work=True,
                     tolerances={"int8-dynamic": {"min_hole_psnr_db": 0.0}, "int8": {"min_hole_psnr_db": 0.0}})
    return out


def test_exported_int8_files_hold_the_compensated_levels(gptq_export):
    """With gptq, the int8 and int8-dynamic files of both signatures: every int8 filter holds the levels
    export.weight_rounding computes again from the generator and the export's calibration samples, on the
    converter's scales (most differ from the converter's nearest rounding); the manifest records the method."""
    from export import tflite_graph as g
    from export.samples import CALIBRATION_DIR, load_samples
    from export.tflite import conv_nodes_of
    from export.weight_rounding import compensated_levels

    gen = lively_generator("tf", 4, seed=0)
    calib = load_samples(CALIBRATION_DIR, SHAPE, 1, seed=1)
    levels = compensated_levels(gen, calib)
    manifest = json.loads((gptq_export / "manifest.json").read_text())
    for precision in ("int8", "int8-dynamic"):
        converter = g.read((gptq_export / ".work" / f"tflite_{SHAPE[0]}x{SHAPE[1]}_tensor"
                            / f"converter_{precision}.tflite").read_bytes())
        for io in ("tensor", "image"):
            entry = next(a for a in manifest["artifacts"] if a["precision"] == precision and a["io"] == io)
            assert entry["build"]["weight_rounding"] == "gptq"
            record = entry["build"]["quantization"]["weight_rounding"]
            assert record["method"] == "gptq" and record["kept"] == [] and record["samples"] == len(calib.images)
            data = (gptq_export / entry["file"]).read_bytes()
            model = g.read(data)
            sg = model.subgraphs[0]
            nodes, ops = conv_nodes_of(gen, data), dict(g.conv_nodes(model))
            written = changed = 0
            for module, node in nodes.items():
                t = sg.tensors[list(sg.operators[ops[node]].inputs)[1]]
                if t.type != g.schema.TensorType.INT8:
                    continue
                got = np.frombuffer(bytes(model.buffers[t.buffer].data), np.int8).reshape(list(t.shape))
                np.testing.assert_array_equal(got, levels[module][0].transpose(0, 2, 3, 1))
                np.testing.assert_allclose(np.asarray(t.quantization.scale, np.float32), levels[module][1], rtol=1e-6)
                if io == "tensor":  # the converter's own file is the tensor signature's
                    theirs = g.conv_weights(converter, dict(g.conv_nodes(converter))[node])
                    changed += int(not np.array_equal(g.conv_weights(model, ops[node]), theirs))
                written += 1
            assert written == record["layers"] >= 10
            if io == "tensor":
                assert changed >= written // 2, (precision, changed, written)


def test_nearest_rounding_leaves_the_converters_filters(tiny_mixed_export):
    """The default (nearest): the shared tiny export's int8 and int8-dynamic files keep the converter's int8
    filters, and their manifest entries say so."""
    from export import tflite_graph as g

    manifest = json.loads((tiny_mixed_export / "manifest.json").read_text())
    for precision in ("int8", "int8-dynamic"):
        entry = next(a for a in manifest["artifacts"] if a["precision"] == precision and a["io"] == "tensor")
        assert entry["build"]["weight_rounding"] == "nearest"
        assert "weight_rounding" not in entry["build"]["quantization"]
        converter = g.read((tiny_mixed_export / ".work" / f"tflite_{SHAPE[0]}x{SHAPE[1]}_tensor"
                            / f"converter_{precision}.tflite").read_bytes())
        model = g.read((tiny_mixed_export / entry["file"]).read_bytes())
        filters = sorted(g.conv_weights(converter, i).tobytes() for _, i in g.conv_nodes(converter))
        assert sorted(g.conv_weights(model, i).tobytes() for _, i in g.conv_nodes(model)) == filters


def test_weight_rounding_option(tmp_path):
    """--weight-rounding: nearest by default, gptq on request, anything else one clear error; the choice is part
    of an int8 file's recorded options (its cache key and manifest entry) and of no other file's."""
    from export.cli import options_from_args
    from export.options import ExportOptions
    from gmcnn_mobile.cli import build_parser
    from runtime_py.errors import UserError

    parse = lambda *extra: build_parser().parse_args(["export", "--out", str(tmp_path / "x"), *extra])  # noqa: E731
    assert options_from_args(parse(), None, None).weight_rounding == "nearest"
    gptq = options_from_args(parse("--weight-rounding", "gptq"), None, None)
    assert gptq.weight_rounding == "gptq"
    with pytest.raises(SystemExit):
        parse("--weight-rounding", "stochastic")
    with pytest.raises(UserError, match="unknown weight rounding 'stochastic'"):
        ExportOptions(weight_rounding="stochastic")
    assert gptq.recorded(calibrated=True, weights_rounded=True)["weight_rounding"] == "gptq"
    assert "weight_rounding" not in gptq.recorded(calibrated=False)
