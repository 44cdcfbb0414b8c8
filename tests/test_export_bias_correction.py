"""int8-dynamic bias correction (issue 13): each int8 convolution's float bias absorbs the mean output shift of its
rounded weights, measured with the input channel means of the calibration samples (export.tflite.correct_biases)."""
import json
import shutil

import numpy as np
import pytest

from helpers import TINY_EXPORT_SHAPE, lively_generator

pytest.importorskip("ai_edge_litert")

SHAPE = TINY_EXPORT_SHAPE


def _biases(model) -> dict:
    """Output tensor name of each CONV_2D -> (filter type, its float32 bias or None)."""
    from export import tflite_graph as g

    sg = model.subgraphs[0]
    out = {}
    for name, i in g.conv_nodes(model):
        ids = list(sg.operators[i].inputs)
        w, b = sg.tensors[ids[1]], sg.tensors[ids[2]] if len(ids) > 2 and ids[2] >= 0 else None
        bias = (np.frombuffer(bytes(model.buffers[b.buffer].data), np.float32).copy()
                if b is not None and b.type == g.schema.TensorType.FLOAT32 else None)
        out[name] = (w.type, bias)
    return out


def test_correction_is_the_rounding_error_times_the_input_means(tiny_mixed_export):
    """On the converter's own int8-dynamic file: zero means change nothing; other means move each int8
    convolution's bias by -(dequantized - float filter) . means, exactly; a float convolution is left alone."""
    from export import tflite_graph as g

    work = tiny_mixed_export / ".work" / f"tflite_{SHAPE[0]}x{SHAPE[1]}_tensor"
    raw = (work / "converter_int8-dynamic.tflite").read_bytes()
    float_model = g.read((work / "converter_fp32.tflite").read_bytes())
    filters = {name: g.conv_weights(float_model, i) for name, i in g.conv_nodes(float_model)}
    before = _biases(g.read(raw))
    int8 = [n for n, (t, b) in before.items() if t == g.schema.TensorType.INT8 and b is not None]
    assert len(int8) >= 10

    zero = g.read(raw)
    assert g.correct_conv_biases(zero, filters, {n: np.zeros(f.shape[-1]) for n, f in filters.items()}) == len(int8)
    assert all(np.array_equal(_biases(zero)[n][1], before[n][1]) for n in int8)

    rng = np.random.default_rng(0)
    means = {n: rng.normal(0, 2, f.shape[-1]) for n, f in filters.items()}
    kept_float = int8[0]
    model = g.read(raw)
    g.restore_float_weights(model, float_model, [kept_float])
    assert g.correct_conv_biases(model, filters, means) == len(int8) - 1
    after = _biases(g.read(g.write(model)))
    assert np.array_equal(after[kept_float][1], before[kept_float][1])
    dyn = g.read(raw)
    for name, i in g.conv_nodes(dyn):
        if name not in int8 or name == kept_float:
            continue
        error = (g.conv_weights(dyn, i) - filters[name]).astype(np.float64).sum(axis=(1, 2))
        want = (before[name][1] - error @ means[name]).astype(np.float32)
        np.testing.assert_array_equal(after[name][1], want)
        assert not np.array_equal(after[name][1], before[name][1])


def test_exported_file_is_corrected_with_the_calibration_means(tiny_mixed_export):
    """The shared tiny export's int8-dynamic files: every int8 convolution's bias is the converter's minus the
    correction from the PyTorch input means over the export's calibration samples; the manifest says so."""
    from export import tflite_graph as g
    from export.activations import conv_input_means
    from export.samples import CALIBRATION_DIR, load_samples
    from export.tflite import MEASURED_BY_CALIBRATION, conv_nodes_of

    gen = lively_generator("tf", 4, seed=0)
    calib = load_samples(CALIBRATION_DIR, SHAPE, 1, seed=1)
    means = conv_input_means(gen, calib.images, calib.masks)
    manifest = json.loads((tiny_mixed_export / "manifest.json").read_text())
    work = tiny_mixed_export / ".work" / f"tflite_{SHAPE[0]}x{SHAPE[1]}_tensor"
    converter = g.read((work / "converter_int8-dynamic.tflite").read_bytes())
    convs = dict(gen.named_modules())
    for io in ("tensor", "image"):
        entry = next(a for a in manifest["artifacts"] if a["precision"] == "int8-dynamic" and a["io"] == io)
        assert entry["build"]["bias_correction"] is True
        record = entry["build"]["quantization"]["bias_correction"]
        assert record["samples"] == len(calib.images)
        assert record["input_means"] == MEASURED_BY_CALIBRATION  # the int8 file's calibration pass measured them
        data = (tiny_mixed_export / entry["file"]).read_bytes()
        model = g.read(data)
        nodes = conv_nodes_of(gen, data)
        corrected = 0
        for module, node in nodes.items():
            i = dict(g.conv_nodes(model))[node]
            if model.subgraphs[0].tensors[list(model.subgraphs[0].operators[i].inputs)[1]].type != g.schema.TensorType.INT8:
                continue
            w = convs[module].weight.detach().numpy().transpose(0, 2, 3, 1)
            shift = (g.conv_weights(model, i) - w).astype(np.float64).sum(axis=(1, 2)) @ means[module]
            got = _biases(model)[node][1]
            if io == "tensor":  # the converter's own file is the tensor signature's
                np.testing.assert_allclose(got, _biases(converter)[node][1] - shift, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got, convs[module].bias.detach().numpy() - shift, rtol=1e-5, atol=1e-5)
            corrected += 1
        assert corrected == record["layers"] >= 10


def test_calibration_pass_measures_the_input_means_pytorch_would(tiny_mixed_export):
    """The int8 calibration pass's MEAN probes (export.tflite_calibration.calibrate_ranges' input_means) give every
    convolution's input channel means as a PyTorch forward per calibration sample does, to float32 rounding, for
    both signatures' passes; where no pass left them the bias correction measures them in PyTorch."""
    import torch

    from export.activations import conv_input_means
    from export.samples import CALIBRATION_DIR, load_samples
    from export.tflite import calibration_input_means

    gen = lively_generator("tf", 4, seed=0)
    calib = load_samples(CALIBRATION_DIR, SHAPE, 1, seed=1)
    want = conv_input_means(gen, calib.images, calib.masks)
    convs = [n for n, m in gen.named_modules() if isinstance(m, torch.nn.Conv2d)]
    for io in ("tensor", "image"):
        work = tiny_mixed_export / ".work" / f"tflite_{SHAPE[0]}x{SHAPE[1]}_{io}"
        got = calibration_input_means(gen, work)
        assert got is not None and sorted(got) == sorted(want) == sorted(convs)
        # measured: at most 2.2e-6 of the layer's largest mean (XNNPACK's and PyTorch's float convolutions differ
        # in their last bits, and the difference grows along the network); float64 accumulation on both sides
        worst = max(float(np.abs(got[n] - want[n]).max()) / max(float(np.abs(want[n]).max()), 1e-3) for n in convs)
        assert worst < 1e-5, (io, worst)
    assert calibration_input_means(gen, tiny_mixed_export / ".work" / "nowhere") is None


def test_no_bias_correction_keeps_the_converters_biases(tmp_path):
    """--no-bias-correction: the file's biases are the converter's, and the manifest records the setting."""
    from export import tflite_graph as g
    from export.api import export_artifacts
    from export.cli import options_from_args
    from export.tflite import conv_nodes_of
    from gmcnn_mobile.cli import build_parser

    args = build_parser().parse_args(["export", "--out", str(tmp_path / "x"), "--no-bias-correction"])
    assert options_from_args(args, None, None).bias_correction is False

    out = tmp_path / "off"
    gen = lively_generator("tf", 4, seed=0)
    m = export_artifacts(gen, out, shapes=[SHAPE], formats=["tflite"],
                         precisions=["int8-dynamic"], ios=["tensor"], threads=2, progress=False,
                         calibration_masks_per_photo=1, quant_fallback=False, bias_correction=False, keep_work=True,
                         tolerances={"int8-dynamic": {"min_hole_psnr_db": 0.0}})
    entry = m.find("tflite", SHAPE, "int8-dynamic", "tensor")
    assert entry.build["bias_correction"] is False and "bias_correction" not in entry.build["quantization"]
    def by_module(path):  # the final file's tensor names are not the converter's: match by weights
        data = path.read_bytes()
        biases = _biases(g.read(data))
        return {module: biases[node] for module, node in conv_nodes_of(gen, data).items()}

    got = by_module(out / entry.file)
    want = by_module(out / ".work" / f"tflite_{SHAPE[0]}x{SHAPE[1]}_tensor" / "converter_int8-dynamic.tflite")
    assert set(got) == set(want) and sum(t == g.schema.TensorType.INT8 for t, _ in want.values()) >= 10
    assert all(np.array_equal(got[n][1], want[n][1]) for n in want if want[n][1] is not None)


def test_fallback_simulation_rounds_as_a_corrected_file_does():
    """The fallback's simulation of int8-dynamic with corrected biases (rounding ``bias``) is the network with every
    rounded convolution's weights rounded and its bias corrected by the same rule as the file's; without the means
    it refuses rather than simulating an uncorrected file."""
    import copy

    import torch

    from export import activations as A
    from export.samples import CALIBRATION_DIR, load_samples

    gen = lively_generator("tf", 4, seed=0)
    calib = load_samples(CALIBRATION_DIR, SHAPE, 1, seed=1)
    hold = load_samples(CALIBRATION_DIR, SHAPE, 1, seed=2, limit=2)
    means = A.input_means(gen, calib)
    convs = [n for n, m in gen.named_modules() if isinstance(m, torch.nn.Conv2d)]
    rounded = convs[::3]
    got = A.rounded_hole_psnr(gen, hold.images, hold.masks, {"some": rounded}, rounded=("weights", "bias"),
                              bias_means=means)["some"]
    plain = A.rounded_hole_psnr(gen, hold.images, hold.masks, {"some": rounded}, rounded=("weights",))["some"]

    by_hand = copy.deepcopy(gen)
    modules = dict(by_hand.named_modules())
    with torch.no_grad():
        for name in rounded:
            mod = modules[name]
            w = mod.weight.data.clone()
            mod.weight.data = A._round_weights_int8(w)
            mod.bias.data = A.corrected_bias(mod.bias.data, w, mod.weight.data, means[name])
        x, m = A._network_batch(hold.images, hold.masks)
        want = [A._hole_psnr(by_hand(x[i:i + 1], m[i:i + 1]), gen(x[i:i + 1], m[i:i + 1]), m[i:i + 1] > 0)
                for i in range(len(x))]
    assert got == pytest.approx(want, abs=1e-6) and got != pytest.approx(plain, abs=1e-3)
    with pytest.raises(ValueError, match="input means"):
        A.rounded_hole_psnr(gen, hold.images, hold.masks, {"some": rounded}, rounded=("weights", "bias"))
    snr = A.layer_snr(gen, hold.images, hold.masks, rounded=("input", "weights", "bias"), bias_means=means)
    assert set(snr) == set(convs) and snr != A.layer_snr(gen, hold.images, hold.masks, rounded=("input", "weights"))


def test_one_pass_ranks_with_and_without_corrected_biases():
    """layer_snr_each with int8's and int8-dynamic's roundings in one float forward per sample: int8's SNRs are
    layer_snr's bit for bit; the corrected rounding's, taken from int8's rounded output plus the bias change, agree
    with layer_snr's own to float32 rounding; a rounding with no bias-only partner is computed as layer_snr does."""
    import torch

    from export import activations as A
    from export.samples import CALIBRATION_DIR, load_samples

    gen = lively_generator("tf", 4, seed=0)
    calib = load_samples(CALIBRATION_DIR, SHAPE, 1, seed=1)
    hold = load_samples(CALIBRATION_DIR, SHAPE, 1, seed=2, limit=2)
    means = A.input_means(gen, calib)
    plain, corrected, weights = ("input", "weights"), ("input", "weights", "bias"), ("weights",)
    forwards = []
    real = A.forward_each_sample
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(A, "forward_each_sample", lambda gen, images, *a, **k: forwards.append(len(images)) or real(
            gen, images, *a, **k))
        both = A.layer_snr_each(gen, hold.images, hold.masks, [plain, corrected, weights], bias_means=means)
    assert forwards == [len(hold.images)] and set(both) == {plain, corrected, weights}
    for rounding in (plain, corrected, weights):
        per = {}
        A.layer_snr(gen, hold.images, hold.masks, rounded=rounding, per_sample=per, bias_means=means)
        assert set(per) == set(both[rounding]) == {n for n, m in gen.named_modules() if isinstance(m, torch.nn.Conv2d)}
        if rounding == corrected:
            # measured: at most 2.9e-5 dB apart (float32 rounding of the bias added after the convolution, not in it)
            worst = max(abs(a - b) for n in per for a, b in zip(per[n], both[rounding][n]))
            assert worst < 1e-3
            assert per != both[plain]  # the correction does change the SNRs
        else:
            assert per == both[rounding]


def test_the_fallbacks_sensitivities_share_a_pass_where_their_samples_allow():
    """export.fallback.SensitivityCache: a rounding a later fallback expects rides along with the first ranking at
    the shape when it wants every sample that pass runs; its own ranking then runs nothing, and ranks as a pass of
    its own would. One that wants fewer samples waits for its own pass."""
    from export import activations as A
    from export.fallback import SensitivityCache
    from export.samples import CALIBRATION_DIR, load_samples

    gen = lively_generator("tf", 4, seed=0)
    calib = load_samples(CALIBRATION_DIR, SHAPE, 1, seed=1)
    hold = load_samples(CALIBRATION_DIR, SHAPE, 1, seed=2, limit=2)
    means = A.input_means(gen, calib)
    plain, corrected = ("input", "weights"), ("input", "weights", "bias")
    passes = []
    real = A.layer_snr_each
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(A, "layer_snr_each", lambda g, images, masks, roundings, **k: passes.append(
            (len(images), [tuple(r) for r in roundings])) or real(g, images, masks, roundings, **k))
        cache = SensitivityCache(gen, {SHAPE: hold}, lambda line: None, bias_means=lambda shape: means)
        cache.expect(SHAPE, corrected, [1, 0])
        cache.expect(SHAPE, plain, [0, 1])
        dynamic = cache.ranking(SHAPE, corrected, [1, 0])
        int8 = cache.ranking(SHAPE, plain, [0, 1])
        assert passes == [(2, [corrected, plain])]
        alone = SensitivityCache(gen, {SHAPE: hold}, lambda line: None, bias_means=lambda shape: means)
        alone.expect(SHAPE, plain, [1])
        assert alone.ranking(SHAPE, plain, [0, 1]) == int8
        own = alone.ranking(SHAPE, corrected, [1, 0])
        assert [n for n, _ in own] == [n for n, _ in dynamic]
        assert [db for _, db in own] == pytest.approx([db for _, db in dynamic], abs=1e-3)
        assert passes[1:] == [(2, [plain]), (2, [corrected])]


def test_calibration_pass_keeps_the_convolution_inputs_channel_ranges(tiny_mixed_export):
    """The int8 calibration pass also keeps each convolution input's per-channel least and largest values over the
    calibration samples (what the int8-dynamic fallback's input channel groups are chosen on): those of the PyTorch
    float forwards (export.input_groups.channel_ranges), up to LiteRT's float32 arithmetic."""
    from export.input_groups import channel_ranges
    from export.samples import CALIBRATION_DIR, load_samples
    from export.tflite import calibration_input_ranges

    gen = lively_generator("tf", 4, seed=0)
    calib = load_samples(CALIBRATION_DIR, SHAPE, 1, seed=1)
    want = channel_ranges(gen, calib.images, calib.masks)
    for io in ("tensor", "image"):
        got = calibration_input_ranges(gen, tiny_mixed_export / ".work" / f"tflite_{SHAPE[0]}x{SHAPE[1]}_{io}")
        assert got is not None and set(got) == set(want)
        for name, (low, high) in want.items():
            assert np.all(got[name][0] <= got[name][1])
            scale = max(float(np.abs(low).max()), float(np.abs(high).max()), 1e-6)
            np.testing.assert_allclose(got[name][0], low, rtol=0, atol=1e-4 * scale, err_msg=name)
            np.testing.assert_allclose(got[name][1], high, rtol=0, atol=1e-4 * scale, err_msg=name)
