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


def _gates_of(out, file):
    """How many times the export gated ``file`` as converted (each gate is a stage of its own)."""
    stages = json.loads((out / "export_stages.json").read_text())["stages"]
    return sum(s["name"] == f"gate {file}" for s in stages)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    from benchmarks.measure import measure_file

    out = tmp_path_factory.mktemp("seeded")
    return out, _export(out, measure=measure_file)


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
    # the tensor file's pure file ran every sample (its search ranks on them); the image file's, whose seed was to
    # come, stopped at its first failing one, and its seed passed: it never ran the others
    every = tensor.parity.details["nudged"]["samples"]  # the passing file's samples (and as many copies)
    assert t["pure_file"]["samples"] == every > 1 and "stopped_at" not in t["pure_file"]
    assert i["pure_file"]["samples"] == 1 and i["pure_file"]["stopped_at"] == {"sample": 0, "nudged": False}
    assert _gates_of(out, image.file) == _gates_of(out, tensor.file) == 1
    assert "branches" not in i and "phase_1_predicted_hole_psnr_db" not in i
    # the tensor file's price was timed, on this machine; the image file, keeping the same layer float, takes its
    # latency ratio
    from runtime_py.machine import timing_machine

    assert t["price"]["runs"] == 3 and t["price"]["latency_ratio"] > 0 and "latency_ratio_of" not in t["price"]
    assert t["price"]["machine"] == timing_machine() and i["price"]["machine"] == t["price"]["machine"]
    assert i["price"]["latency_ratio"] == t["price"]["latency_ratio"] and i["price"]["latency_ratio_of"] == tensor.file
    assert i["price"]["runs"] == 0 and "latency_median_s" not in i["price"]["fallback"]
    assert i["price"]["fallback"]["bytes"] == image.bytes and i["price"]["pure"]["bytes"] > 0
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
    # its pure file, gated until its first failing sample while the seed was to come, was gated again on every
    # sample before its own search ranked on them
    assert _gates_of(tmp_path, image.file) == 2
    every = image.parity.details["nudged"]["samples"]
    assert i["pure_file"]["samples"] == every > 1 and "stopped_at" not in i["pure_file"]


def test_an_earlier_exports_layers_seed_the_first_file_of_its_kind(seeded, tmp_path):
    """--quant-fallback-seeds DIR: the tensor file gates the layers DIR's file of its kind kept float before any
    search of its own (no sensitivity at all in this run), records where they came from, and seeds the image file
    of this run as before."""
    from benchmarks.measure import measure_file

    earlier_out, earlier = seeded
    m = _export(tmp_path, fallback_seeds=str(earlier_out), measure=measure_file)
    tensor, image = (m.find("tflite", SHAPE, "int8-dynamic", io) for io in ("tensor", "image"))
    t, i = tensor.build["quantization"]["fallback"], image.build["quantization"]["fallback"]
    before = earlier.find("tflite", SHAPE, "int8-dynamic", "tensor")
    assert tensor.parity.passed and t["phase"] == 0 and t["seeded_from"] == before.file
    assert t["seeded_from_earlier_export"] == {"checkpoint_sha256": earlier.checkpoint["sha256"],
                                               "weights_sha256": earlier.checkpoint["weights_sha256"],
                                               "created": earlier.created}
    assert [c["phase"] for c in t["search"]] == [0] and t["search"][0]["passed"]
    assert t["layers_kept_float"] == before.build["quantization"]["fallback"]["layers_kept_float"]
    # the ranking the earlier search measured, every convolution the file rounds, travels with the seed
    assert t["ranking"] == before.build["quantization"]["fallback"]["ranking"] and len(t["ranking"]) > 1
    assert i["seeded_from"] == tensor.file and "seeded_from_earlier_export" not in i and i["phase"] == 0
    assert _sensitivity_stages(tmp_path) == []
    # both pure files stopped at their first failing sample, as both had a seed to come
    assert t["pure_file"]["samples"] == i["pure_file"]["samples"] == 1
    # the same layers, timed on this machine at these threads by the earlier export: its latency ratio, no timing
    earlier_price = before.build["quantization"]["fallback"]["price"]
    assert t["price"]["runs"] == i["price"]["runs"] == 0
    assert t["price"]["latency_ratio"] == i["price"]["latency_ratio"] == earlier_price["latency_ratio"]
    assert t["price"]["latency_ratio_of"] == f"{before.file} of an earlier export"
    assert i["price"]["latency_ratio_of"] == tensor.file
    assert t["price"]["machine"] == earlier_price["machine"] and t["price"]["fallback"]["bytes"] == tensor.bytes
    stages = json.loads((tmp_path / "export_stages.json").read_text())["stages"]
    assert not any(s["name"].startswith("fallback price") and s.get("own_seconds", 0) > 1 for s in stages)


def test_a_retrained_model_exported_into_the_same_folder_is_seeded_by_the_previous_run(seeded, tmp_path):
    """By default (auto) the previous manifest in the export folder seeds a new checkpoint's files; none searches
    from scratch; a folder with no manifest named is one error line before any work."""
    import shutil

    from export.api import export_artifacts
    from runtime_py.errors import UserError

    earlier_out, earlier = seeded
    retrained = planted_generator(outlier=1001.0)  # other weights: every file is made again
    for seeds, phase in (("auto", 0), ("none", 1)):
        out = tmp_path / seeds
        shutil.copytree(earlier_out, out)
        m = export_artifacts(retrained, out, shapes=[SHAPE], formats=["tflite"], precisions=["int8-dynamic"],
                             ios=["tensor"], threads=2, progress=False, calibration_masks_per_photo=1,
                             fallback_seeds=seeds)
        assert m.checkpoint["weights_sha256"] != earlier.checkpoint["weights_sha256"]
        t = m.find("tflite", SHAPE, "int8-dynamic", "tensor").build["quantization"]["fallback"]
        assert t["phase"] == phase and [k["layer"] for k in t["layers_kept_float"]] == [PLANTED]
        assert ("seeded_from_earlier_export" in t) == (seeds == "auto")
        assert len(_sensitivity_stages(out)) == (seeds == "none")
    missing = tmp_path / "no-export-here"
    with pytest.raises(UserError, match="--quant-fallback-seeds: .*no-export-here.*no export manifest") as exc:
        _export(tmp_path / "fresh", fallback_seeds=str(missing))
    assert "\n" not in str(exc.value) and not (tmp_path / "fresh").exists()


def test_seeds_from_a_manifest_leave_out_what_this_network_cannot_use(seeded):
    """export.fallback.seeds_from_manifest: the first file of each kind; a record naming a convolution this network
    lacks is left out, as is a grouped one without a ranking; an older record without a ranking gives its kept
    layers' own SNRs."""
    import copy

    from export import fallback

    _, earlier = seeded
    convs = [k["layer"] for k in earlier.find("tflite", SHAPE, "int8-dynamic", "tensor")
             .build["quantization"]["fallback"]["ranking"]]
    seeds, left_out = fallback.seeds_from_manifest(earlier, convs)
    key = ("tflite", SHAPE, "int8-dynamic")
    assert list(seeds) == [key] and left_out == []
    seed = seeds[key]
    assert seed.file.endswith("_tensor_int8-dynamic.tflite") and seed.layers == [PLANTED] and not seed.input_groups
    assert [n for n, _ in seed.ranking] == convs and seed.earlier["created"] == earlier.created
    assert seed.source == f"{seed.file} of an earlier export"

    older = copy.deepcopy(earlier)
    for a in older.artifacts:
        del a.build["quantization"]["fallback"]["ranking"]
    (seed,) = fallback.seeds_from_manifest(older, convs)[0].values()
    assert seed.ranking == ((PLANTED, older.artifacts[0].build["quantization"]["fallback"]["layers_kept_float"][0]
                             ["snr_db"]),)
    for a in older.artifacts:
        a.build["quantization"]["fallback"]["phase"] = fallback.GROUPS_PHASE
    seeds, left_out = fallback.seeds_from_manifest(older, convs)
    assert seeds == {} and len(left_out) == 2 and all("no ranking" in line for line in left_out)
    seeds, left_out = fallback.seeds_from_manifest(earlier, [c for c in convs if c != PLANTED])
    assert seeds == {} and len(left_out) == 2 and all(PLANTED in line for line in left_out)
    # only the kinds a run makes: none of this manifest's at another shape
    assert fallback.seeds_from_manifest(earlier, [c for c in convs if c != PLANTED],
                                        kinds=[("tflite", (128, 192), "int8-dynamic")]) == ({}, [])


def test_an_earlier_price_travels_with_its_seed_only_from_a_machine_that_reads_the_same(seeded):
    """seeds_from_manifest's ``machine`` and ``threads``: the seed carries the earlier file's timed price only where
    both match what it was timed on (another CPU, other SIMD features, another LiteRT or thread count: none)."""
    from export import fallback
    from runtime_py.machine import timing_machine

    _, earlier = seeded
    record = earlier.find("tflite", SHAPE, "int8-dynamic", "tensor").build["quantization"]["fallback"]
    convs = [k["layer"] for k in record["ranking"]]
    key = ("tflite", SHAPE, "int8-dynamic")
    here = timing_machine()

    def seed_price(**given):
        return fallback.seeds_from_manifest(earlier, convs, **given)[0][key].price

    assert seed_price(machine=here, threads=2) == record["price"]
    assert seed_price() is None  # no machine given: an export that times nothing
    assert seed_price(machine=here, threads=1) is None
    for field, other in (("cpu", "another CPU"), ("simd", ["sse4_2"]), ("litert", "0.0"), ("cpu_count", 64)):
        assert seed_price(machine={**here, field: other}, threads=2) is None, field


def test_a_seed_that_never_comes_leaves_the_pure_file_gated_on_every_sample_before_its_own_search(tmp_path,
                                                                                                   monkeypatch):
    """The tensor file, whose fallback was to seed the image file, finds nothing (made to fail here); the image
    file's pure file, cut short at its first failing sample while that seed was to come, is gated again on every
    sample, and its own search passes."""
    from export import api
    from runtime_py.manifest import load_manifest

    real = api._fallback

    def the_tensor_file_finds_nothing(p, mod, pure, pure_result, sensitivity, job_for, gate, accept, failures, *args,
                                      **kwargs):
        if p.io == "tensor":
            failures[p.file] = "no candidate passed (made to fail by the test)"
            return None
        return real(p, mod, pure, pure_result, sensitivity, job_for, gate, accept, failures, *args, **kwargs)

    monkeypatch.setattr(api, "_fallback", the_tensor_file_finds_nothing)
    with pytest.raises(api.ExportFailed) as exc:
        _export(tmp_path)
    assert [name.endswith("_tensor_int8-dynamic.tflite") for name in exc.value.failures] == [True]
    image = load_manifest(tmp_path).find("tflite", SHAPE, "int8-dynamic", "image")
    i = image.build["quantization"]["fallback"]
    assert "seeded_from" not in i and i["phase"] == 1 and [k["layer"] for k in i["layers_kept_float"]] == [PLANTED]
    every = image.parity.details["nudged"]["samples"]
    assert _gates_of(tmp_path, image.file) == 2
    assert i["pure_file"]["samples"] == every > 1 and "stopped_at" not in i["pure_file"]


def test_a_seed_file_carries_what_the_manifest_seeds(seeded, tmp_path):
    """export.fallback_seeds: the seed file of a manifest gives the seeds the manifest gives (first file of each
    kind; its layers, inputs, ranking and price), naming itself as their source, and holds no other record."""
    from export import fallback
    from export.fallback_seeds import read_seed_file, write_seed_file

    _, earlier = seeded
    path = write_seed_file(earlier, tmp_path / "model.fallback-seeds.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fallback-seeds.json"]  # no temporary file left
    content = json.loads(path.read_text())
    (record,) = content["files"]  # one kind: the tensor file's; the image file of the kind is not a seed
    assert record["file"] == earlier.find("tflite", SHAPE, "int8-dynamic", "tensor").file
    assert set(record["fallback"]) == {"phase", "layers_kept_float", "inputs_kept_float", "ranking", "price"}
    convs = [k["layer"] for k in record["fallback"]["ranking"]]
    from_manifest, _ = fallback.seeds_from_manifest(earlier, convs)
    source = read_seed_file(path)
    from_file, left_out = fallback.seeds_from_manifest(source, convs)
    assert left_out == [] and list(from_file) == list(from_manifest) == [("tflite", SHAPE, "int8-dynamic")]
    (a,), (b,) = from_manifest.values(), from_file.values()
    assert b.earlier == {**a.earlier, "seed_file": path.name}
    assert (b.file, b.layers, b.inputs_float, b.ranking, b.branches_kept_float, b.input_groups) == \
           (a.file, a.layers, a.inputs_float, a.ranking, a.branches_kept_float, a.input_groups) and b.layers == [PLANTED]
    from runtime_py.machine import timing_machine

    machine = timing_machine()
    priced = [next(iter(fallback.seeds_from_manifest(m, convs, machine=machine, threads=2)[0].values())).price
              for m in (earlier, source)]
    assert priced[0] is not None and priced[0] == priced[1]


def test_a_seed_file_beside_the_checkpoint_seeds_an_export_into_a_fresh_folder(seeded, tmp_path):
    """auto: with no earlier manifest in the folder, STEM.fallback-seeds.json beside the checkpoint file seeds the
    first file of its kind (recorded as its source); none searches from scratch; a broken seed file beside it is one
    error line before any work."""
    from export.api import export_artifacts
    from export.fallback_seeds import write_seed_file
    from models.checkpoint import save_checkpoint
    from runtime_py.errors import UserError

    _, earlier = seeded
    checkpoint = save_checkpoint(planted_generator(outlier=1001.0), tmp_path / "retrained.safetensors")
    seed_file = write_seed_file(earlier, tmp_path / "retrained.fallback-seeds.json")
    for seeds, phase in (("auto", 0), ("none", 1)):
        out = tmp_path / seeds
        m = export_artifacts(checkpoint, out, shapes=[SHAPE], formats=["tflite"], precisions=["int8-dynamic"],
                             ios=["tensor"], threads=2, progress=False, calibration_masks_per_photo=1,
                             fallback_seeds=seeds)
        t = m.find("tflite", SHAPE, "int8-dynamic", "tensor").build["quantization"]["fallback"]
        assert t["phase"] == phase and [k["layer"] for k in t["layers_kept_float"]] == [PLANTED]
        assert len(_sensitivity_stages(out)) == (seeds == "none")
        if seeds == "auto":
            assert t["seeded_from_earlier_export"] == {"checkpoint_sha256": earlier.checkpoint["sha256"],
                                                       "weights_sha256": earlier.checkpoint["weights_sha256"],
                                                       "created": earlier.created, "seed_file": seed_file.name}
        else:
            assert "seeded_from_earlier_export" not in t
    # a previous manifest in the folder with no fallback file (fp32 only) seeds nothing: the seed file does
    out = tmp_path / "fp32-first"
    kwargs = dict(shapes=[SHAPE], formats=["tflite"], ios=["tensor"], threads=2, progress=False,
                  calibration_masks_per_photo=1)
    export_artifacts(checkpoint, out, precisions=["fp32"], **kwargs)
    m = export_artifacts(checkpoint, out, precisions=["fp32", "int8-dynamic"], **kwargs)
    t = m.find("tflite", SHAPE, "int8-dynamic", "tensor").build["quantization"]["fallback"]
    assert t["phase"] == 0 and t["seeded_from_earlier_export"]["seed_file"] == seed_file.name
    seed_file.write_text('{"schema": "gmcnn-mobile fallback seeds", "version": 99}')
    with pytest.raises(UserError, match="--quant-fallback-seeds: .*retrained.fallback-seeds.json.*version 99") as exc:
        export_artifacts(checkpoint, tmp_path / "fresh", shapes=[SHAPE], formats=["tflite"],
                         precisions=["int8-dynamic"], ios=["tensor"], threads=2, progress=False)
    assert "\n" not in str(exc.value) and not (tmp_path / "fresh").exists()
    missing = tmp_path / "gone.fallback-seeds.json"
    with pytest.raises(UserError, match="--quant-fallback-seeds: .*gone.fallback-seeds.json: no such seed file"):
        export_artifacts(checkpoint, tmp_path / "fresh", shapes=[SHAPE], formats=["tflite"],
                         precisions=["int8-dynamic"], ios=["tensor"], threads=2, progress=False,
                         fallback_seeds=str(missing))
    assert not (tmp_path / "fresh").exists()


def test_the_fallback_seeds_command_writes_beside_the_checkpoint_and_refuses_what_it_cannot_seed(seeded, tmp_path,
                                                                                              capsys):
    """gmcnn-mobile fallback-seeds: --out names the file (it must end .fallback-seeds.json); an export that was made
    from a generator object, not a file, needs --out; one with no fallback file has nothing to seed; each is one
    error line and a non-zero exit, leaving no file."""
    import shutil

    from gmcnn_mobile.cli import main
    from runtime_py.manifest import load_manifest

    earlier_out, earlier = seeded
    out = tmp_path / "m.fallback-seeds.json"
    assert main(["fallback-seeds", str(earlier_out), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["files"][0]["fallback"]["layers_kept_float"][0]["layer"] == PLANTED
    capsys.readouterr()
    copy = tmp_path / "copy"
    shutil.copytree(earlier_out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for a in manifest["artifacts"]:
        del a["build"]["quantization"]["fallback"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    load_manifest(copy)  # still a manifest
    for argv, message in (([str(earlier_out)], "not made from a checkpoint file; name the seed file with --out"),
                          ([str(earlier_out), "--out", str(tmp_path / "seeds.json")], "ends with .fallback-seeds"),
                          ([str(copy), "--out", str(tmp_path / "c.fallback-seeds.json")], "nothing to seed"),
                          ([str(tmp_path / "nowhere"), "--out", str(out)], "no export manifest")):
        assert main(["fallback-seeds", *argv]) != 0
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "m.fallback-seeds.json"]
