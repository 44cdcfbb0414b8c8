"""Input channel groups for int8-dynamic convolutions (issue 13): each convolution split by input channels, grouped
by their calibrated ranges, so that every group gets its own run-time int8 grid (export.input_groups)."""
import numpy as np
import pytest

from helpers import lively_generator


def test_choose_groups_isolates_the_wide_channels_and_partitions_all():
    """Two channels 100x wider than the other six: with two groups they are a group of their own; every channel is
    in exactly one group, narrowest group first; more groups than needed are not made."""
    from export.input_groups import choose_groups

    high = np.array([1.0, 100.0, 0.9, 1.1, 120.0, 1.0, 0.8, 1.2])
    low = -high
    groups = choose_groups(low, high, 2)
    assert [g.tolist() for g in groups] == [[0, 2, 3, 5, 6, 7], [1, 4]]
    many = choose_groups(low, high, 4)
    assert sorted(np.concatenate(many).tolist()) == list(range(8))
    assert 2 <= len(many) <= 4
    same = choose_groups(np.zeros(5), np.ones(5), 3)  # equal ranges: one grid fits all
    assert len(same) == 1 and same[0].tolist() == list(range(5))


def test_grouped_generator_computes_the_same_function():
    """The grouped generator (producers' outputs permuted, every planned convolution a sum over contiguous input
    slices) gives the original's output to float rounding, on a plan with a group per channel-range class."""
    import torch

    from export.input_groups import channel_ranges, grouped_generator, plan_groups

    gen = lively_generator()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    masks = (rng.random((2, 64, 96)) > 0.7).astype(np.uint8) * 255
    plan = plan_groups(gen, channel_ranges(gen, images, masks), 4, min_elements=0)
    assert plan and max(len(groups) for groups in plan.values()) > 1
    grouped = grouped_generator(gen, plan)
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    m = (torch.rand(1, 1, 64, 96) > 0.6).float()
    with torch.no_grad():
        diff = float((gen(x, m) - grouped(x, m)).abs().max())
    assert diff < 1e-5
    parts = [mod for name, mod in grouped.named_modules() if isinstance(mod, torch.nn.Conv2d)]
    assert len(parts) == sum(len(g) for g in plan.values()) + sum(
        1 for name, mod in gen.named_modules() if isinstance(mod, torch.nn.Conv2d) and name not in plan)


def test_plan_leaves_the_input_layers_the_small_filters_and_the_merge_sources_apart():
    """No group for a branch's first convolution (it reads the image, mask and ones) or a filter the dynamic-range
    quantizer leaves float; the merge's first convolution is grouped inside each branch output it concatenates."""
    from export.input_groups import channel_ranges, plan_groups

    gen = lively_generator()
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    masks = (rng.random((2, 64, 96)) > 0.7).astype(np.uint8) * 255
    ranges = channel_ranges(gen, images, masks)
    plan = plan_groups(gen, ranges, 3, min_elements=0)
    assert not {"net.layers.b1conv1", "net.layers.b2conv1", "net.layers.b3conv1"} & set(plan)
    c = gen.meta.cnum
    sources = [(0, 4 * c), (4 * c, 6 * c), (6 * c, 6 * c + c // 2)]
    for group in plan["net.layers.mergeconv17"]:
        assert any(all(a <= ch < b for ch in group) for a, b in sources)
    small = plan_groups(gen, ranges, 3)  # the converter's threshold: this tiny model's filters are under it
    assert all(dict(gen.named_modules())[name].weight.numel() >= 1024 for name in small)


def test_groups_need_the_tf_variant():
    from export.input_groups import plan_groups
    from models.gmcnn import build_generator

    gen = build_generator("torch", cnum=4, seed=0)
    with pytest.raises(ValueError, match="tf variant"):
        plan_groups(gen, {}, 2)


def test_channels_last_removes_a_channels_first_detour_exactly(tmp_path):
    """A TFLite graph with onnx2tf's detour (TRANSPOSE to NCHW, ELU, channel STRIDED_SLICEs, a one-channel slice
    RESHAPEd, TRANSPOSEs back) loses every transpose and reshape and computes the same values."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from export import tflite_graph as g

    @tf.function(input_signature=[tf.TensorSpec([1, 6, 8, 5], tf.float32)])
    def detour(x):
        y = tf.nn.elu(tf.transpose(x, [0, 3, 1, 2]))
        a = tf.transpose(y[:, 0:3], [0, 2, 3, 1])
        b = tf.reshape(y[:, 4:5], [1, 6, 8, 1])
        return tf.concat([a * 2.0, b], axis=3)

    raw = tf.lite.TFLiteConverter.from_concrete_functions([detour.get_concrete_function()], detour).convert()
    model = g.read(raw)
    before = g.op_counts(model)
    assert before.get("TRANSPOSE", 0) >= 2
    removed = g.channels_last(model)
    after = g.op_counts(model)
    assert removed == before.get("TRANSPOSE", 0) + before.get("RESHAPE", 0) - after.get("RESHAPE", 0) > 0
    assert "TRANSPOSE" not in after
    x = np.random.default_rng(0).normal(0, 1, (1, 6, 8, 5)).astype(np.float32)
    outs = []
    for data in (raw, g.write(model)):
        it = Interpreter(model_content=bytes(data))
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        outs.append(it.get_tensor(it.get_output_details()[0]["index"]))
    assert np.array_equal(outs[0], outs[1])


def test_fallback_keeps_every_convolution_int8_with_input_groups(tmp_path, monkeypatch):
    """The planted outlier (one input channel of b1conv12 near 1000) fails the int8-dynamic gate; with a MAC budget
    under b1conv12's, no first-phase candidate passes, and the fallback's next candidate keeps every convolution
    int8 with the sensitive layers' inputs in channel groups: b1conv12's outlier channel gets a grid of its own and
    the file passes with no layer float. The manifest records the phase, the groups and the price; the file has
    its slices and no transposes left. The image signature's file then gates the grouped candidate first."""
    from export import fallback
    from export.api import export_artifacts
    from export.input_groups import RANGES_FROM_PYTORCH
    from test_export_quant_fallback import PLANTED, SHAPE, planted_generator

    monkeypatch.setattr(fallback, "FLOAT_MAC_BUDGET", 0.04)
    m = export_artifacts(planted_generator(), tmp_path, shapes=[SHAPE], formats=["tflite"],
                         precisions=["int8-dynamic"], ios=["tensor", "image"], threads=2, progress=False,
                         calibration_masks_per_photo=1)
    # the image signature's fallback starts from the tensor one's outcome: the grouped candidate, alone
    seeded = m.find("tflite", SHAPE, "int8-dynamic", "image")
    seeded_fb = seeded.build["quantization"]["fallback"]
    assert seeded.parity.passed and seeded_fb["phase"] == fallback.GROUPS_PHASE
    assert seeded_fb["seeded_from"] == m.find("tflite", SHAPE, "int8-dynamic", "tensor").file
    assert [c["phase"] for c in seeded_fb["search"]] == [fallback.GROUPS_PHASE]
    a = m.find("tflite", SHAPE, "int8-dynamic", "tensor")
    q = a.build["quantization"]
    fb = q["fallback"]
    assert a.parity.passed and fb["phase"] == fallback.GROUPS_PHASE and fb["layers_kept_float"] == []
    assert a.build["input_groups"] == 2
    groups = fb["input_groups"]
    assert groups["groups"] == 2 and PLANTED in groups["channels"] and 1 in groups["channels"][PLANTED]
    assert groups["bias_correction"] is False and groups["weight_rounding"] == "nearest"
    # no int8 file in this export, so no calibration pass to take them from
    assert groups["ranges_measured_by"] == RANGES_FROM_PYTORCH
    assert fb["pure_file"]["hole_psnr_db"] < a.parity.tolerance["min_hole_psnr_db"] <= a.parity.hole_psnr_db
    grouped = [c for c in fb["search"] if c["phase"] == fallback.GROUPS_PHASE]
    assert len(grouped) == 1 and grouped[0]["passed"] and grouped[0]["grouped_layers"] == len(groups["channels"])
    assert not any(c["passed"] for c in fb["search"] if c["phase"] != fallback.GROUPS_PHASE)
    ops = a.op_inventory["ops"]
    assert ops["STRIDED_SLICE"] > 0 and "TRANSPOSE" not in ops and a.op_inventory["postpass"]["layout_transposes_removed"] > 0
    # every slice's filter is int8 but those under the dynamic-range converter's 1024 values (this tiny model's
    # slices often are: cnum 4)
    from export import tflite_graph as g
    from export.input_groups import MIN_QUANTIZED_ELEMENTS

    model = g.read((tmp_path / a.file).read_bytes())
    sg = model.subgraphs[0]
    filters = [sg.tensors[int(sg.operators[i].inputs[1])] for _, i in g.conv_nodes(model)]
    assert len(filters) == q["convs"] > 44
    assert all((w.type == g.T.INT8) == (int(np.prod(w.shape)) >= MIN_QUANTIZED_ELEMENTS) for w in filters)
    assert fb["price"]["pure"]["bytes"] > 0 and fb["price"]["fallback"]["bytes"] == a.bytes


def test_fallback_keeps_cheap_layers_float_in_the_grouped_file_where_groups_alone_fail(tmp_path, monkeypatch):
    """Two planted outliers: b1conv12's (its input's channel 0 near 1000, a layer over the MAC budget) and
    b3conv12's (the same in b3, a cheap layer). The first phase can keep only b3conv12 float and fails on b1conv12;
    the grouped candidate, whose plan here leaves b3conv12 whole (as it would a layer whose one channel spans the
    range), fails on b3conv12; phase 6, the grouped file with b3conv12 float, passes: b1conv12 stays int8, its
    outlier channel on a grid of its own. The image signature's file gates that candidate first, and only it."""
    import torch

    from export import fallback, input_groups
    from export.api import export_artifacts
    from models.gmcnn import conv_layers
    from test_export_quant_fallback import PLANTED, SHAPE, planted_generator

    cheap = "net.layers.b3conv12"
    gen = planted_generator()
    convs = dict(gen.named_modules())
    with torch.no_grad():
        convs["net.layers.b3conv11"].bias[0] += 1000.0
        convs[cheap].weight[:, 0] = 0.0
    macs = {layer["name"]: layer["macs"] for layer in conv_layers(gen, *SHAPE)}
    budget = 0.04
    assert macs[cheap] / sum(macs.values()) < budget < macs[PLANTED] / sum(macs.values())
    monkeypatch.setattr(fallback, "FLOAT_MAC_BUDGET", budget)
    plan_groups = input_groups.plan_groups
    plans = []

    def without_cheap(*args, **kwargs):
        plans.append({name: groups for name, groups in plan_groups(*args, **kwargs).items() if name != cheap})
        return plans[-1]

    monkeypatch.setattr(input_groups, "plan_groups", without_cheap)
    m = export_artifacts(gen, tmp_path, shapes=[SHAPE], formats=["tflite"], precisions=["int8-dynamic"],
                         ios=["tensor", "image"], threads=2, progress=False, calibration_masks_per_photo=1,
                         keep_work=True)
    a = m.find("tflite", SHAPE, "int8-dynamic", "tensor")
    fb = a.build["quantization"]["fallback"]
    phases = [c["phase"] for c in fb["search"]]
    assert a.parity.passed and fb["phase"] == fallback.GROUPED_FLOAT_PHASE, phases
    assert [k["layer"] for k in fb["layers_kept_float"]] == [cheap]
    grouped = [c for c in fb["search"] if c["phase"] == fallback.GROUPS_PHASE]
    assert len(grouped) == 1 and not grouped[0]["passed"]
    assert PLANTED in fb["input_groups"]["channels"] and cheap not in fb["input_groups"]["channels"]
    last = fb["search"][-1]
    assert last["phase"] == fallback.GROUPED_FLOAT_PHASE and last["passed"] and last["layers"] == 1
    assert last["grouped_layers"] == len(fb["input_groups"]["channels"])
    assert not any(c["passed"] for c in fb["search"][:-1])
    assert "pruning" not in fb
    # the file: one filter the quantizer would round is float32, b3conv12's (its output channels permuted for the
    # groups that follow it)
    from export import tflite_graph as g
    from export.input_groups import MIN_QUANTIZED_ELEMENTS

    model = g.read((tmp_path / a.file).read_bytes())
    sg = model.subgraphs[0]
    big_float = [i for _, i in g.conv_nodes(model)
                 if sg.tensors[int(sg.operators[i].inputs[1])].type == g.T.FLOAT32
                 and int(np.prod(sg.tensors[int(sg.operators[i].inputs[1])].shape)) >= MIN_QUANTIZED_ELEMENTS]
    assert len(big_float) == 1
    w = g.conv_weights(model, big_float[0])
    assert np.array_equal(np.sort(w.ravel()), np.sort(convs[cheap].weight.detach().numpy().ravel()))
    # a grouped layer kept float is every one of its slices: b1conv12's, given back the grouped float file's filters
    from export.options import ExportOptions
    from export.tflite import float_nodes
    from export.tflite_worker import convert_precision

    work = tmp_path / ".work" / f"tflite_{SHAPE[0]}x{SHAPE[1]}_tensor_groups"
    grouped = input_groups.grouped_generator(gen, plans[0])
    parts = input_groups.part_names(grouped, [PLANTED])
    assert len(parts) == len(plans[0][PLANTED]) >= 2
    nodes = float_nodes(grouped, work, "int8-dynamic", parts)
    quant = {"float_nodes": nodes, "converted": str(work / "converter_int8-dynamic.tflite"),
             "float_model": str(work / "converter_fp32.tflite")}
    model = g.read(convert_precision(str(work / "no_saved_model"), "int8-dynamic", "tensor", None, ExportOptions(),
                                     quant))
    float_model = g.read((work / "converter_fp32.tflite").read_bytes())
    at = dict(g.conv_nodes(model))
    at_float = dict(g.conv_nodes(float_model))
    assert len(nodes) == len(parts)
    for node in nodes:
        assert model.subgraphs[0].tensors[int(model.subgraphs[0].operators[at[node]].inputs[1])].type == g.T.FLOAT32
        assert np.array_equal(g.conv_weights(model, at[node]), g.conv_weights(float_model, at_float[node]))
    image = m.find("tflite", SHAPE, "int8-dynamic", "image")
    seeded = image.build["quantization"]["fallback"]
    assert image.parity.passed and seeded["seeded_from"] == a.file
    assert [c["phase"] for c in seeded["search"]] == [fallback.GROUPED_FLOAT_PHASE]
    assert [k["layer"] for k in seeded["layers_kept_float"]] == [cheap]


def test_an_earlier_grouped_seed_that_fails_is_followed_by_the_files_own_phase_6(tmp_path, monkeypatch):
    """An earlier export of the one-outlier model passed with its inputs in channel groups (phase 5); the model
    "retrained" with a second outlier in a cheap layer the plan leaves whole is exported into the same folder: the
    earlier seed's grouped candidate fails (gated once), and the file's own search goes on to phase 6, the grouped
    file with that cheap layer float, and passes."""
    import shutil

    import torch

    from export import fallback, input_groups
    from export.api import export_artifacts
    from test_export_quant_fallback import SHAPE, planted_generator

    cheap = "net.layers.b3conv12"
    monkeypatch.setattr(fallback, "FLOAT_MAC_BUDGET", 0.04)
    options = dict(shapes=[SHAPE], formats=["tflite"], precisions=["int8-dynamic"], ios=["tensor"], threads=2,
                   progress=False, calibration_masks_per_photo=1)
    earlier = tmp_path / "earlier"
    before = export_artifacts(planted_generator(), earlier, **options).find("tflite", SHAPE, "int8-dynamic", "tensor")
    assert before.build["quantization"]["fallback"]["phase"] == fallback.GROUPS_PHASE

    gen = planted_generator()
    convs = dict(gen.named_modules())
    with torch.no_grad():
        convs["net.layers.b3conv11"].bias[0] += 1000.0
        convs[cheap].weight[:, 0] = 0.0
    plan_groups = input_groups.plan_groups
    monkeypatch.setattr(input_groups, "plan_groups", lambda *args, **kwargs: {
        name: groups for name, groups in plan_groups(*args, **kwargs).items() if name != cheap})
    out = tmp_path / "retrained"
    shutil.copytree(earlier, out)
    a = export_artifacts(gen, out, **options).find("tflite", SHAPE, "int8-dynamic", "tensor")
    fb = a.build["quantization"]["fallback"]
    phases = [c["phase"] for c in fb["search"]]
    assert fb["seeded_from"] == before.file and "seeded_from_earlier_export" in fb
    assert phases[0] == fallback.GROUPS_PHASE and not fb["search"][0]["passed"]
    assert phases.count(fallback.GROUPS_PHASE) == 1  # the grouped file is judged once
    assert a.parity.passed and fb["phase"] == fallback.GROUPED_FLOAT_PHASE and phases[-1] == fb["phase"], phases
    assert [k["layer"] for k in fb["layers_kept_float"]] == [cheap]
