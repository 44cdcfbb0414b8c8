"""Sensitivity-guided fallback (export.fallback) on a tiny generator with one planted outlier layer.

b1conv11 gets one output channel 1000 above the rest, which b1conv12 then ignores: in float the
network is unchanged, but the int8 grid of b1conv12's input spreads over 0..1000 and rounds the
other channels to a few levels, so int8 and int8-dynamic files fail their gate. The fallback
must find b1conv12, keep it in float and pass; the manifest must say so. int8-dynamic passes in
the first phase (b1conv12 alone: its input is then never quantized); int8 needs the second (with
b1conv12 alone float, b1conv11's int8 output still rounds the tensor before the ELU between them).
With a MAC budget too small for b1conv12, int8-dynamic passes in its own second phase (the ranked
layers alone whatever their MACs).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import lively_generator

SHAPE = (64, 96)
PLANTED = "net.layers.b1conv12"


def planted_generator(outlier: float = 1000.0):
    """The tiny generator with b1conv11's first output channel ``outlier`` above the rest, which b1conv12 ignores."""
    import torch

    gen = lively_generator("tf", 4, seed=0)
    convs = dict(gen.named_modules())
    with torch.no_grad():
        convs["net.layers.b1conv11"].bias[0] += outlier
        convs[PLANTED].weight[:, 0] = 0.0
    return gen


@pytest.fixture(scope="module")
def fallback_export(tmp_path_factory):
    from benchmarks.measure import measure_file
    from export.api import export_artifacts

    out = tmp_path_factory.mktemp("fallback_export")
    gen = planted_generator()
    manifest = export_artifacts(gen, out, shapes=[SHAPE], formats=["tflite"], precisions=["int8", "int8-dynamic"],
                                ios=["tensor"], threads=2, keep_work=True, progress=False,
                                calibration_masks_per_photo=1, measure=measure_file)
    return {"out": out, "gen": gen, "manifest": manifest}


def test_failing_int8_files_pass_with_the_planted_layer_kept_float(fallback_export):
    from export import tflite_graph

    import torch

    m = fallback_export["manifest"]
    # the converter leaves filters under 1024 values in float in dynamic-range files
    small = sum(mod.weight.numel() < 1024 for mod in fallback_export["gen"].modules()
                if isinstance(mod, torch.nn.Conv2d))
    for precision, float_convs in (("int8", 2), ("int8-dynamic", small + 1)):
        a = m.find("tflite", SHAPE, precision, "tensor")
        q = a.build["quantization"]
        fb = q["fallback"]
        assert a.parity.passed and a.parity.hole_psnr_db >= a.parity.tolerance["min_hole_psnr_db"]
        # the pure file failed, by a wide margin
        assert fb["pure_file"]["hole_psnr_db"] < a.parity.tolerance["min_hole_psnr_db"] - 5
        assert [k["layer"] for k in fb["layers_kept_float"]] == [PLANTED]
        assert fb["layers_kept_float"][0]["snr_db"] < 30.0
        inputs = precision == "int8"
        assert fb["inputs_kept_float"] is inputs and fb["float_mac_budget"] == 0.1
        searched = [c for c in fb["search"] if c["phase"] != 4]
        assert searched[-1] == {"phase": 1 + inputs, "layers": 1, "inputs_float": inputs,
                                "hole_psnr_db": a.parity.hole_psnr_db, "samples": a.parity.samples, "passed": True}
        if inputs:  # the planted layer and its producer, 2 layers: pruning tried each alone, and both failed
            assert fb["pruning"]["from_layers"] == 2 and fb["pruning"]["quantized_again"] == []
            assert fb["search"][len(searched):] and not any(c["passed"] for c in fb["search"][len(searched):])
        else:  # one layer: nothing to prune
            assert "pruning" not in fb and searched == fb["search"]
        assert fb["phase"] == 1 + inputs
        first = [c for c in fb["search"] if c["phase"] == 1]
        assert first[0]["layers"] == 1 and (inputs or first == fb["search"])
        assert not any(c["inputs_float"] for c in first)
        if inputs:  # the first phase, the layers alone within the MAC budget, failed every size it tried
            assert not any(c["passed"] for c in first) and len(first) >= 2
            # each stopped at the first held-out sample it failed (the pure file failed them all)
            assert all(c["samples"] == 1 for c in first)
            # then the simulation: the second phase's largest candidate (the planted layer and its producer
            # among those kept float) predicted to pass, so it went before the branches
            br = fb["branches"]
            assert br["order"] == [2, 3] and br["phase_2_predicted_hole_psnr_db"] >= 38.0
            assert [r["branch"] for r in br["ranking"]][0] == "b1" and "kept_float" not in br
            # the simulation of the first phase's largest candidate (the planted layer alone, its input float
            # there) over-predicts int8, whose producer still rounds that input: int8's first phase is never
            # deferred on a prediction too low, only tried in vain
            largest = max(first, key=lambda c: c["layers"])
            assert largest["predicted_hole_psnr_db"] >= a.parity.tolerance["min_hole_psnr_db"] > largest["hole_psnr_db"]
        else:  # passed in the first phase: only its largest candidate was simulated, the branches never
            assert "branches" not in fb
        assert fb["phase_1_deferred"] is False and fb["phase_1_predicted_hole_psnr_db"] > 0
        # the setting that made this file is part of its record (a file that passed as converted has none)
        assert a.build["quant_fallback"] is True and a.build["fallback_limit"] == 11
        assert a.build["fallback_branch_limit"] == 33
        if precision == "int8":  # the candidate quantized the pure file's calibrated model: no statistics pass
            assert q["activations"]["calibrated_model_reused"] is True and q["activations"]["statistics_reused"]
        # int8: the planted layer and the layer producing its input (so the tensor between stays
        # float); int8-dynamic: the planted layer (and the small filters the converter never quantizes)
        assert len(q["float_convs"]) == float_convs and q["convs"] == 44
        assert 0.7 < q["conv_macs_quantized_fraction"] < 1.0
        price = fb["price"]
        assert price["pure"]["bytes"] < price["fallback"]["bytes"] == a.bytes
        assert price["pure"]["latency_median_s"] > 0 and price["fallback"]["peak_rss_mib"] > 0
        # the file itself: exactly those convolutions compute in float
        rows = tflite_graph.conv_macs(tflite_graph.read((fallback_export["out"] / a.file).read_bytes()))
        # the manifest names the biases the file stores (hybrid convolutions keep float ones)
        assert q["weights"].endswith("; biases int32" if precision == "int8" else "; biases float32")
        if precision == "int8":
            assert sorted(r["node"] for r in rows if r["input"] == "float32") == sorted(q["float_convs"])
        else:
            assert sorted(r["node"] for r in rows if r["weights"] == "float32") == sorted(q["float_convs"])


def test_manifest_records_the_range_of_every_calibrated_tensor(fallback_export):
    from export.quant_ranges import METHODS

    a = fallback_export["manifest"].find("tflite", SHAPE, "int8", "tensor")
    act = a.build["quantization"]["activations"]
    assert act["activation_bits"] == 8 and act["method"] == "minmax"  # the default
    assert "per output channel" in a.build["quantization"]["weights"]
    tensors = act["tensors"]
    assert len(tensors) > 90 and sum(act["methods"].values()) == len(tensors)
    for name, t in tensors.items():
        lo, hi = t["range"]
        assert t["method"] in METHODS and lo <= 0.0 <= hi, (name, t)
    # the planted channel: b1conv11's output reaches ~1000 and its range says so
    big = [t for t in tensors.values() if t["max"] > 500]
    assert big and all(t["range"][1] > 100 for t in big)


def test_every_key_of_the_quantization_record_is_documented(fallback_export):
    """docs/MANIFEST.md's `build.quantization` section names every key the export writes there (each
    key of the record, of its activations and their tensors, and of the fallback's record)."""
    import re

    from test_export_manifest import DOC

    section = DOC.read_text().split("## `build.quantization`", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([a-z_0-9]+)`", section)) | set(re.findall(r'"([a-z_0-9]+)"', section))
    written = set()
    for a in fallback_export["manifest"].artifacts:
        q = a.build["quantization"]
        fb = q["fallback"]
        price = fb["price"]
        parts = [q, q["activations"], fb, fb["pure_file"], price, price["pure"], price["fallback"],
                 *q["activations"].get("tensors", {}).values(), *fb["search"], *fb["layers_kept_float"]]
        written |= {key for part in parts for key in part}
    assert "floor_on_grid" in written and "phase" in written  # the record's newest keys are among those checked
    assert written <= documented, f"undocumented build.quantization keys: {sorted(written - documented)}"


def _replaying_backend(export_dir: Path):
    """convert_all stand-in without TensorFlow (tensor I/O, int8 and int8-dynamic): the pure file is
    the worker's converter output post-passed again, every fallback candidate the file the real
    fallback chose."""
    from export import tflite
    from export.backends import ConvertResult

    work = export_dir / ".work" / f"tflite_{SHAPE[0]}x{SHAPE[1]}_tensor"

    def convert_all(backend, jobs, progress=None, stages=None):
        results = {}
        for job in jobs:
            if job.extra.get("keep_float"):
                shutil.copy(export_dir / f"gmcnn_tf_c4_{SHAPE[0]}x{SHAPE[1]}_tensor_{job.precision}.tflite", job.out)
            else:
                raw = (work / f"converter_{job.precision}.tflite").read_bytes()
                Path(job.out).write_bytes(tflite.postprocess(raw, job.precision, "tensor")[0])
            results[job.key] = ConvertResult(Path(job.out), 0.1)
        return results

    return convert_all


def _dynamic_range_backend(export_dir: Path):
    """convert_all stand-in without TensorFlow for tensor I/O int8-dynamic: every file made as the
    worker makes it from the fixture's converter output, a candidate with its kept layers' float32
    filters given back (the real candidate, not a replay of the file the fallback chose), then its biases
    corrected as the backend corrects them."""
    from export import tflite
    from export.backends import ConvertResult
    from export.options import ExportOptions
    from export.tflite_worker import convert_precision

    work = export_dir / ".work" / f"tflite_{SHAPE[0]}x{SHAPE[1]}_tensor"
    converted = work / "converter_int8-dynamic.tflite"

    def convert_all(backend, jobs, progress=None, stages=None):
        results = {}
        for job in jobs:
            assert job.precision == "int8-dynamic"
            raw = converted.read_bytes()
            if job.extra.get("keep_float"):
                quant = {"converted": str(converted), "float_model": str(work / "converter_fp32.tflite"),
                         "float_nodes": tflite.float_nodes(job.generator, work, job.precision, job.extra["keep_float"])}
                raw = convert_precision(str(work / "no_saved_model"), job.precision, "tensor", None, ExportOptions(),
                                        quant)
            Path(job.out).write_bytes(tflite.postprocess(raw, job.precision, "tensor", metadata=job.metadata)[0])
            results[job.key] = ConvertResult(Path(job.out), 0.1)
            if job.options.bias_correction:  # as the backend's conversion does after the worker
                # with the input means the real export's int8 calibration pass left (the same samples): its file
                # is corrected with those
                Path(job.workdir).mkdir(parents=True, exist_ok=True)
                for kept in ("calibrated_int8.tflite", "calibrated_int8.tflite" + tflite.CALIBRATION_MEANS_SUFFIX):
                    if not (Path(job.workdir) / kept).exists():
                        shutil.copy(work / kept, Path(job.workdir) / kept)
                results[job.key].details["bias_correction"] = tflite.correct_biases(job, Path(job.out))
        return results

    return convert_all


@pytest.mark.parametrize("defer", [True, False], ids=["phase-1-deferred", "phase-1-first"])
def test_int8_dynamic_keeps_layers_float_beyond_the_mac_budget_in_a_second_phase(fallback_export, tmp_path,
                                                                                monkeypatch, defer):
    """With a budget under the planted layer's MACs (4.5 % of the network's at cnum 4), the first
    phase keeps only cheaper layers float; the second keeps the ranked layers whatever their MACs,
    passes with the planted layer alone and records the phase and the price (sizes here; the timed
    price is the command's, tested above). The simulation puts the first phase's largest candidate far
    under the gate, so by default it waits behind the second and is never gated; with no margin that
    lets it wait (DEFER_MARGIN_DB infinite) it goes first and fails, and the file is the same."""
    from export import api, backends, fallback
    from models.gmcnn import conv_layers

    macs = {layer["name"]: layer["macs"] for layer in conv_layers(fallback_export["gen"], *SHAPE)}
    share = macs[PLANTED] / sum(macs.values())
    budget = 0.04
    assert budget < share < 0.05
    monkeypatch.setattr(fallback, "FLOAT_MAC_BUDGET", budget)
    margin = fallback.DEFER_MARGIN_DB
    if not defer:
        monkeypatch.setattr(fallback, "DEFER_MARGIN_DB", float("inf"))
    monkeypatch.setattr(backends, "convert_all", _dynamic_range_backend(fallback_export["out"]))
    m = api.export_artifacts(fallback_export["gen"], tmp_path, shapes=[SHAPE], formats=["tflite"],
                             precisions=["int8-dynamic"], ios=["tensor"], threads=2, progress=False,
                             fallback_limit=2, calibration_masks_per_photo=1)
    a = m.find("tflite", SHAPE, "int8-dynamic", "tensor")
    q = a.build["quantization"]
    fb = q["fallback"]
    assert a.parity.passed and fb["phase"] == 2 and fb["float_mac_budget"] == budget and fb["limit"] == 2
    assert [k["layer"] for k in fb["layers_kept_float"]] == [PLANTED] and fb["inputs_kept_float"] is False
    first = [c for c in fb["search"] if c["phase"] == 1]
    gate = a.parity.tolerance["min_hole_psnr_db"]
    assert fb["phase_1_deferred"] is defer and fb["phase_1_predicted_hole_psnr_db"] < gate - margin
    if defer:
        assert not first and fb["branches"]["order"] == [2, 3, 1]
    else:
        assert first and not any(c["passed"] for c in first) and fb["branches"]["order"] == [2, 3]
        # the largest candidate's row carries its prediction, which its gate confirmed (w8-like: a dynamic-range
        # file rounds what the simulation rounds)
        largest = max(first, key=lambda c: c["layers"])
        assert largest["predicted_hole_psnr_db"] == fb["phase_1_predicted_hole_psnr_db"] < gate
    assert fb["search"][-1] == {"phase": 2, "layers": 1, "inputs_float": False, "hole_psnr_db": a.parity.hole_psnr_db,
                                "samples": a.parity.samples, "passed": True}
    # each candidate gated once: the first phase's layers fitted the budget, the planted one did not
    assert len({(c["phase"], c["layers"]) for c in fb["search"]}) == len(fb["search"])
    # the file the real export's first phase made under the full budget, and its price: the share of the
    # MACs still quantized (the planted layer's 4.5 % less, and the small filters the converter leaves float)
    real = fallback_export["manifest"].find("tflite", SHAPE, "int8-dynamic", "tensor")
    assert a.sha256 == real.sha256 and q["float_convs"] == real.build["quantization"]["float_convs"]
    assert q["conv_macs_quantized_fraction"] == real.build["quantization"]["conv_macs_quantized_fraction"] < 1 - share
    assert fb["price"]["pure"]["bytes"] < fb["price"]["fallback"]["bytes"] == a.bytes


def test_the_second_phase_keeps_the_ranked_layers_whatever_their_macs():
    from export.fallback import phases

    ranking = [("a", 30.0), ("big", 31.0), ("b", 32.0)]
    macs = {"a": 4, "big": 50, "b": 3, "rest": 43}
    alone, with_inputs = phases(ranking, macs, 11, False, 0.10), phases(ranking, macs, 2, True, 0.10)
    assert [(ph.number, ph.layers, ph.inputs_float) for ph in alone] == [
        (1, [("a", 30.0), ("b", 32.0)], False), (2, ranking, False)]
    assert [(ph.number, [n for n, _ in ph.layers], ph.inputs_float) for ph in with_inputs] == [
        (1, ["a", "b"], False), (2, ["a", "big"], True)]
    # every ranked layer fits: a second phase alone would repeat the first; none fits: the second alone
    assert [ph.number for ph in phases(ranking, macs, 11, False, 0.6)] == [1]
    assert [ph.number for ph in phases(ranking, macs, 11, True, 0.6)] == [1, 2]
    assert [(ph.number, ph.layers) for ph in phases(ranking, macs, 11, False, 0.01)] == [(2, ranking)]


def test_torch_work_is_done_once_per_shape_for_every_file_and_candidate(fallback_export, tmp_path, monkeypatch):
    """Issue 17, work done once: the PyTorch reference outputs are computed once per shape and shared by
    the gate of every file and every fallback candidate; the layer sensitivity and the branch simulation
    once per rounding and sample, shared by the precisions that round the same way (int8 and
    int8-dynamic without its bias correction, which the simulation of a corrected file models). A candidate that fails stops at the first held-out sample it fails.
    The reference's forwards run inside runtime_py.memory.reuse_freed_memory."""
    from export import activations, api, backends, parity, tflite
    from runtime_py import memory

    calls = {"reference": 0, "sensitivity": [], "simulated": [], "runs": [], "fed": [], "reuse": []}
    real_reference, real_snr = parity.reference_outputs_and_peak, activations.layer_snr_each
    real_sim, real_run = activations.rounded_hole_psnr, tflite.run

    def reference(*args, **kwargs):
        calls["reference"] += 1
        calls["reuse"].append(memory._reuse_depth)
        return real_reference(*args, **kwargs)

    def snr(generator, images, masks, roundings, *args, **kwargs):
        calls["sensitivity"].append((len(images), len(roundings)))
        return real_snr(generator, images, masks, roundings, *args, **kwargs)

    def simulated(generator, images, masks, configs, *args, **kwargs):
        calls["simulated"].append((len(images), sorted(configs)))
        return real_sim(generator, images, masks, configs, *args, **kwargs)

    def run(path, io, samples, threads=2, keep_going=None):
        out, executor = real_run(path, io, samples, threads, keep_going=keep_going)
        calls["runs"].append(len(out))
        calls["fed"].append(len(samples))
        return out, executor

    monkeypatch.setattr(parity, "reference_outputs_and_peak", reference)
    monkeypatch.setattr(activations, "layer_snr_each", snr)
    monkeypatch.setattr(activations, "rounded_hole_psnr", simulated)
    monkeypatch.setattr(tflite, "run", run)
    monkeypatch.setattr(backends, "convert_all", _replaying_backend(fallback_export["out"]))
    with pytest.raises(api.ExportFailed) as err:  # an unreachable gate: every candidate up to the limits is gated
        api.export_artifacts(fallback_export["gen"], tmp_path, shapes=[SHAPE], formats=["tflite"],
                             precisions=["int8", "int8-dynamic"], ios=["tensor"], fallback_limit=2, progress=False,
                             tolerances={"int8": {"min_hole_psnr_db": 99.0}, "int8-dynamic": {"min_hole_psnr_db": 99.0}},
                             calibration_masks_per_photo=1, bias_correction=False)
    samples = fallback_export["manifest"].artifacts[0].parity.samples
    assert calls["reference"] == 1 and calls["sensitivity"] == [(samples, 1)]
    # the reference's forwards reuse freed memory (12 % faster at 1024x1360), and the block is left afterwards
    assert calls["reuse"] == [1] and memory._reuse_depth == 0
    # int8's simulations, each on the worst sample alone: its first phase's largest candidate (far under this
    # gate: the phase waits), then the four branches and its second phase's largest candidate; int8-dynamic's own
    # (its ranking, phases and branches leave out the filters its file leaves float, the tiny model's many under
    # 1,024 values): its first phase's, its second would repeat its first (left out), and the branches but the
    # merge, whose two filters it leaves float
    assert samples > 1 and calls["simulated"] == [
        (1, ["phase 1"]), (1, ["branch b1", "branch b2", "branch b3", "branch merge", "phase 2"]),
        (1, ["phase 1"]), (1, ["branch b1", "branch b2", "branch b3"])]
    # the two pure files on every sample; every candidate on one (each fails the first it runs); per
    # precision at least 1 and 2 layers, then 1 and 2 branches; int8 1 and 2 more with their inputs
    assert calls["runs"].count(samples) == 2 and set(calls["runs"]) == {samples, 1}
    assert calls["runs"].count(1) >= (2 + 2 + 2) + (2 + 2)
    # one engine per file: every candidate was fed all its samples and stopped after the first
    assert set(calls["fed"]) == {samples}
    assert str(err.value).count("--quant-fallback-branch-limit") == 2


def test_an_int8_dynamic_candidate_starts_from_the_pure_files_converter_output(fallback_export):
    """No second conversion for a dynamic-range candidate: the worker gives the kept layers their float32
    filters in the converter file of the pure int8-dynamic (no saved_model is read, none exists here)."""
    from export import tflite_graph as g
    from export.options import ExportOptions
    from export.tflite_worker import convert_precision

    work = fallback_export["out"] / ".work" / f"tflite_{SHAPE[0]}x{SHAPE[1]}_tensor"
    converted = work / "converter_int8-dynamic.tflite"
    pure = g.read(converted.read_bytes())
    pure_weights = {name: pure.subgraphs[0].tensors[g._ids(pure.subgraphs[0].operators[i].inputs)[1]].type
                    for name, i in g.conv_nodes(pure)}
    kept = next(name for name, t in pure_weights.items() if t != g.T.FLOAT32)
    quant = {"float_nodes": [kept], "converted": str(converted), "float_model": str(work / "converter_fp32.tflite")}
    data = convert_precision(str(work / "no_saved_model"), "int8-dynamic", "tensor", None, ExportOptions(), quant)
    model = g.read(data)
    sg = model.subgraphs[0]
    weights = {name: sg.tensors[g._ids(sg.operators[i].inputs)[1]].type for name, i in g.conv_nodes(model)}
    assert weights[kept] == g.T.FLOAT32 != pure_weights[kept]
    assert {n: t for n, t in weights.items() if n != kept} == {n: t for n, t in pure_weights.items() if n != kept}


def test_the_backend_names_the_convolutions_its_dynamic_range_file_leaves_float(fallback_export):
    """export.tflite.unrounded_convs is what the converter did: the pure int8-dynamic file's float32 filters are
    exactly those convolutions' (matched by weights), and the file's precision with every filter rounded names none.
    The fallback ranks, simulates and keeps float only the others."""
    from export import tflite, tflite_graph as g

    gen = fallback_export["gen"]
    work = fallback_export["out"] / ".work" / f"tflite_{SHAPE[0]}x{SHAPE[1]}_tensor"
    data = (work / "converter_int8-dynamic.tflite").read_bytes()
    model = g.read(data)
    sg = model.subgraphs[0]
    node_type = {name: sg.tensors[g._ids(sg.operators[i].inputs)[1]].type for name, i in g.conv_nodes(model)}
    left_float = {module for module, node in tflite.conv_nodes_of(gen, data).items()
                  if node_type[node] == g.T.FLOAT32}
    assert left_float and tflite.unrounded_convs(gen, "int8-dynamic") == left_float
    assert len(left_float) < len(node_type) and tflite.unrounded_convs(gen, "int8") == set()
    fb = fallback_export["manifest"].find("tflite", SHAPE, "int8-dynamic", "tensor").build["quantization"]["fallback"]
    assert not {k["layer"] for k in fb["layers_kept_float"]} & left_float


def test_fallback_off_fails_the_file(fallback_export, tmp_path, monkeypatch):
    from export import api, backends

    monkeypatch.setattr(backends, "convert_all", _replaying_backend(fallback_export["out"]))
    with pytest.raises(api.ExportFailed) as err:
        api.export_artifacts(fallback_export["gen"], tmp_path, shapes=[SHAPE], formats=["tflite"],
                             precisions=["int8"], ios=["tensor"], quant_fallback=False, progress=False,
                             calibration_masks_per_photo=1)
    assert "hole PSNR" in str(err.value) and "short by" in str(err.value)
    assert not list(tmp_path.glob("*.tflite"))


def test_a_file_the_fallback_made_is_reused_only_under_the_same_setting(fallback_export, tmp_path, monkeypatch):
    from export import api, backends

    shutil.copytree(fallback_export["out"], tmp_path / "out")
    kw = dict(shapes=[SHAPE], formats=["tflite"], precisions=["int8"], ios=["tensor"], threads=2, progress=False,
              calibration_masks_per_photo=1)

    def no_conversion(backend, jobs, progress=None):
        raise AssertionError("an up-to-date file was converted again")

    monkeypatch.setattr(backends, "convert_all", no_conversion)
    again = api.export_artifacts(fallback_export["gen"], tmp_path / "out", keep_work=True, **kw)
    assert again.export["reused"] == 1
    monkeypatch.setattr(backends, "convert_all", _replaying_backend(fallback_export["out"]))
    with pytest.raises(api.ExportFailed, match="short by"):
        api.export_artifacts(fallback_export["gen"], tmp_path / "out", quant_fallback=False, **kw)


def test_at_the_limit_the_error_names_the_layers_and_the_option(fallback_export, tmp_path, monkeypatch):
    from export import api, backends

    monkeypatch.setattr(backends, "convert_all", _replaying_backend(fallback_export["out"]))
    with pytest.raises(api.ExportFailed) as err:
        api.export_artifacts(fallback_export["gen"], tmp_path, shapes=[SHAPE], formats=["tflite"],
                             precisions=["int8"], ios=["tensor"], fallback_limit=1, fallback_branch_limit=2,
                             progress=False, tolerances={"int8": {"min_hole_psnr_db": 99.0}},
                             calibration_masks_per_photo=1)
    msg = str(err.value)
    assert f"{PLANTED} " in msg and "dB" in msg and "--quant-fallback-limit" in msg
    # the branch phase too: within 2 layers only the merge fits
    assert "whole branches kept float, up to 2 layers (hole PSNR with only that branch rounded: merge " in msg
    assert "(2 layers)) failed too: raise --quant-fallback-branch-limit" in msg
    assert "with the 1 most sensitive layers kept float (best candidate: hole PSNR" in msg and "short by" in msg
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in (".work", "manifest.json", "export_stages.json")]
    assert leftovers == []


def test_the_first_phase_takes_ranked_layers_while_their_macs_fit_the_budget():
    """In ranking order; a layer too costly is passed over, the cheaper ones after it still taken."""
    from export.fallback import affordable

    ranking = [("a", 30.0), ("big", 31.0), ("b", 32.0), ("c", 33.0), ("d", 34.0)]
    macs = {"a": 4, "big": 50, "b": 3, "c": 3, "d": 1, "rest": 39}  # 100 in all
    assert affordable(ranking, macs, limit=11, budget=0.10) == [("a", 30.0), ("b", 32.0), ("c", 33.0)]
    assert affordable(ranking, macs, limit=2, budget=0.10) == [("a", 30.0), ("b", 32.0)]
    assert affordable(ranking, macs, limit=11, budget=0.11) == [("a", 30.0), ("b", 32.0), ("c", 33.0), ("d", 34.0)]
    assert affordable(ranking, macs, limit=11, budget=0.01) == [("d", 34.0)]


def test_search_finds_the_smallest_passing_size():
    from export.fallback import Candidate, search, search_order

    assert search_order(11) == [1, 2, 4, 8, 11] and search_order(1) == [1] and search_order(8) == [1, 2, 4, 8]
    for need in (1, 3, 5, 8, 11):
        built, gated = [], []

        def build(ks):
            built.extend(ks)
            return {k: Candidate(k, f"file{k}", {}) for k in ks}

        def gate(c):
            gated.append(c.k)
            return c.k >= need

        winner, _ = search(search_order(11), build, gate)
        assert winner.k == need, (need, gated)
        assert len(gated) <= 4 + 3  # the doubling pass, then a bisection of at most 3 steps
    winner, tried = search([1, 2], lambda ks: {k: Candidate(k, "f", {}) for k in ks}, lambda c: False)
    assert winner is None and [c.k for c in tried] == [1, 2]


def test_the_command_prices_with_the_benchmarks_measurement_and_the_api_alone_with_sizes(fallback_export, tmp_path):
    """gmcnn-mobile export hands the fallback benchmarks' one-process measurement (export never starts
    a benchmark process itself); without it the price has the sizes and says why it has no times."""
    from export.fallback import price
    from gmcnn_mobile.cli import build_parser

    args = build_parser().parse_args(["export", "--out", str(tmp_path)])
    a = fallback_export["manifest"].find("tflite", SHAPE, "int8", "tensor")
    path = fallback_export["out"] / a.file
    r = args.measure_file(path, 1, 1)
    assert r["ok"] and r["stats"]["median_s"] > 0 and r["peak_rss"] > 0
    # runs 0 (an int16x8 price): the first inference is the one timed, nothing else runs
    first = args.measure_file(path, 1, 0, 0)
    assert first["ok"] and first["warmup_s"] == [] and first["runs_s"] == [first["first_s"]] > [0]
    untimed = price(path, path, 1, "tflite")
    assert untimed["pure"] == {"bytes": a.bytes} and untimed["size_ratio"] == 1.0
    assert "no measure function" in untimed["not_timed"] and "latency_ratio" not in untimed


def test_int8_float_convolutions_take_the_resizes_between_them_out_of_int8(fallback_export):
    """A resize or concatenation between float convolutions only is denylisted with them (at 1024x1360 the
    shipped model's int8 upsamplings alone held every convolution float at 16.9 dB); one that an integer
    convolution feeds is not, and the quantizer leaves exactly the listed ones float."""
    import torch

    from export import tflite
    from export import tflite_graph as g
    from export.tflite_worker import quantize_calibrated

    work = fallback_export["out"] / ".work" / f"tflite_{SHAPE[0]}x{SHAPE[1]}_tensor"
    calibrated = (work / "calibrated_int8.tflite").read_bytes()
    model = g.read(calibrated)
    sg = model.subgraphs[0]

    def outputs_of(kind):
        return {g.tensor_name(sg.tensors[g._ids(op.outputs)[0]]) for op in sg.operators
                if g.op_name(model, op).startswith(kind)}

    resizes, convs = outputs_of("RESIZE_"), [name for name, _ in g.conv_nodes(model)]
    assert resizes
    every = set(g.ops_between_convs(model, convs))
    assert resizes <= every and not every & set(convs)
    producers = g.conv_producers(model)
    # a resize between two convolutions loses its place when its producing convolution stays int8
    resize_consumer = next(c for c in convs if any(r in every for r in g.ops_between_convs(model, [c] + producers[c])))
    without = set(g.ops_between_convs(model, [c for c in convs if c not in producers[resize_consumer]]))
    assert without < every

    gen = fallback_export["gen"]
    names = [n for n, m in gen.named_modules() if isinstance(m, torch.nn.Conv2d)]
    nodes = tflite.float_nodes(gen, work, "int8", names)
    assert resizes <= set(nodes)
    q = g.read(quantize_calibrated(calibrated, "int8", "tensor", nodes))
    qsg = q.subgraphs[0]
    resize_types = {g.tensor_name(qsg.tensors[g._ids(op.outputs)[0]]): qsg.tensors[g._ids(op.outputs)[0]].type
                    for op in qsg.operators if g.op_name(q, op).startswith("RESIZE_")}
    assert resize_types and all(t == g.T.FLOAT32 for t in resize_types.values())
    pure = g.read(quantize_calibrated(calibrated, "int8", "tensor", [n for n in nodes if n not in resizes]))
    assert any(pure.subgraphs[0].tensors[g._ids(op.outputs)[0]].type == g.T.INT8
               for op in pure.subgraphs[0].operators if g.op_name(pure, op).startswith("RESIZE_"))


def test_reference_kernel_files_are_priced_once_each_side_by_side_on_one_thread(tmp_path):
    """An int16x8 inference on LiteRT's reference kernels takes minutes (about 2 at 512x680 here): the price times
    each file's first inference alone (``runs`` 0, no warm-up), on one thread, the pure and the fallback file at
    the same time (the barrier breaks if the two measurements run one after the other)."""
    import threading

    from export.fallback import price

    pure, fb = tmp_path / "pure.tflite", tmp_path / "fallback.tflite"
    pure.write_bytes(b"p" * 100)
    fb.write_bytes(b"f" * 150)
    calls, both_running = [], threading.Barrier(2, timeout=20)

    def measure(path, threads, runs, warmup=1):
        calls.append((path.name, threads, runs, warmup))
        both_running.wait()
        return {"ok": True, "stats": {"median_s": 2.0 if path == fb else 1.0}, "peak_rss": 2 ** 20}

    out = price(pure, fb, 2, "tflite", measure, reference_kernels=True)
    assert sorted(calls) == [("fallback.tflite", 1, 0, 0), ("pure.tflite", 1, 0, 0)]
    assert out["threads"] == 1 and out["runs"] == 1 and out["warmup_runs"] == 0 and out["side_by_side"]
    assert out["first_inference_timed"]
    assert out["latency_ratio"] == 2.0 and out["size_ratio"] == 1.5 and out["pure"]["peak_rss_mib"] == 1.0
    calls.clear()
    timed = price(pure, fb, 2, "tflite", lambda path, threads, runs: calls.append((path.name, threads, runs))
                  or {"ok": True, "stats": {"median_s": 1.0}, "peak_rss": 1})
    assert calls == [("pure.tflite", 2, 3), ("fallback.tflite", 2, 3)] and "side_by_side" not in timed


def test_nudged_copies_move_one_percent_of_values_by_one_level():
    from export.samples import NUDGED_FRACTION, Samples, nudged

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    images[0, :8] = 255  # saturated values may only go down
    masks = (rng.random((2, 64, 96, 1)) < 0.2).astype(np.uint8) * 255
    original = Samples(images.copy(), masks.copy(), ["a", "b"])
    copy = nudged(original)
    moved = copy.images.astype(np.int16) - images.astype(np.int16)
    # binomial over 36,864 values: 1 % is 369 +- 19
    assert abs(np.count_nonzero(moved) / moved.size - NUDGED_FRACTION) < 0.002
    assert set(np.unique(moved)) == {-1, 0, 1}
    assert np.all(moved[images == 255] <= 0) and np.all(moved[images < 255] >= 0)
    assert np.array_equal(original.images, images) and np.array_equal(copy.masks, masks)  # the input untouched
    assert copy.names == ["a~nudged", "b~nudged"]
    assert np.array_equal(nudged(original).images, copy.images)  # the same copy every time
    assert not np.array_equal(nudged(original, seed=1).images, copy.images)


def test_int8_dynamic_gate_runs_the_nudged_copies_and_int8_does_not(fallback_export):
    m = fallback_export["manifest"]
    static, dynamic = (m.find("tflite", SHAPE, precision, "tensor").parity for precision in ("int8", "int8-dynamic"))
    assert "nudged" not in static.details
    n = static.samples
    assert dynamic.details["nudged"] == {"samples": n, "fraction": 0.01} and dynamic.samples == 2 * n
    per = dynamic.details["hole_psnr_db_per_sample"]
    assert len(per) == 2 * n and dynamic.hole_psnr_db == min(per)


def test_a_runtime_quantized_file_failing_on_the_nudged_copies_fails(fallback_export, tmp_path, monkeypatch):
    """A file passing on the held-out samples but not on their nudged copies fails, saying so; an int8 file, never
    run on the copies, passes whatever they would give."""
    from export import api, backends, tflite
    from export.backends import ConvertResult

    final = {p: fallback_export["out"] / f"gmcnn_tf_c4_{SHAPE[0]}x{SHAPE[1]}_tensor_{p}.tflite"
             for p in ("int8", "int8-dynamic")}

    def convert_all(backend, jobs, progress=None, stages=None):  # every file the one the fixture's fallback chose
        for job in jobs:
            shutil.copy(final[job.precision], job.out)
        return {job.key: ConvertResult(Path(job.out), 0.1) for job in jobs}

    real_run, copies_run = tflite.run, []

    def run(path, io, samples, threads=2, keep_going=None):
        # the first file to pass its samples runs the copies in an engine of their own (no copies' reference yet)
        assert keep_going is None or not any(name.endswith("~nudged") for name in samples.names)
        out, executor = real_run(path, io, samples, threads, keep_going=keep_going)
        if any(name.endswith("~nudged") for name in samples.names):
            copies_run.append(Path(path).name)
            out = np.clip(out + 0.5, -1.0, 1.0)  # far off in the hole
        return out, executor

    monkeypatch.setattr(backends, "convert_all", convert_all)
    monkeypatch.setattr(tflite, "run", run)
    with pytest.raises(api.ExportFailed) as err:
        api.export_artifacts(fallback_export["gen"], tmp_path, shapes=[SHAPE], formats=["tflite"],
                             precisions=["int8", "int8-dynamic"], ios=["tensor"], quant_fallback=False,
                             progress=False, calibration_masks_per_photo=1)
    assert "int8-dynamic" in str(err.value) and "int8.tflite" not in str(err.value)
    assert "1% of its pixel values one level off" in str(err.value)
    assert [f.name for f in tmp_path.glob("*.tflite")] == [final["int8"].name]
    assert len(copies_run) == 1 and copies_run[0].endswith("int8-dynamic.tflite")


def test_a_sample_counts_as_the_worse_of_it_and_its_nudged_copy():
    from export import fallback
    from runtime_py.manifest import ParityResult

    per = [41.0, 45.0, 39.5, 44.0, 41.2, 33.6, 40.1, 44.5]  # four samples, then their nudged copies
    result = ParityResult(executor="x", samples=8, details={"hole_psnr_db_per_sample": per,
                                                           "nudged": {"samples": 4, "fraction": 0.01}})
    assert fallback.failing_samples(result, 40.0) == [1, 2]
    assert fallback.failing_samples(result, float("inf")) == [1, 2, 0, 3]
    plain = ParityResult(executor="x", samples=4, details={"hole_psnr_db_per_sample": per[:4]})
    assert fallback.failing_samples(plain, 40.0) == [2]
    assert fallback.failing_samples(ParityResult(executor="x", samples=8, details={
        "hole_psnr_db_per_sample": per[:4] + [45.0] * 4, "nudged": {"samples": 4}}), 39.0) == [0, 1, 2, 3]
