"""Unit tests of the benchmark harness on small synthetic inputs (no artifacts, no ../shared)."""
import json
import re
import sys

import numpy as np
import pytest

from benchmarks import android, quality, readme, report, stats
from runtime_py import memory
from runtime_py.engines import delegation as xnnpack
from benchmarks.spawn import run_in_subprocess
from helpers import photo


def test_summarize_percentiles():
    s = stats.summarize([0.5, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert s["n"] == 10 and s["min_s"] == 0.1 and s["max_s"] == 1.0
    assert s["median_s"] == pytest.approx(0.55)
    assert s["p90_s"] == pytest.approx(0.91)
    with pytest.raises(ValueError):
        stats.summarize([])


def test_rss_readings_grow_with_allocation():
    import mmap

    # 64 MiB of new pages from the kernel, touched. Not np.ones: in a process that ran other tests first the
    # allocator may hand back freed memory that is still resident (seen in a pytest-xdist worker: RSS unchanged).
    block = mmap.mmap(-1, 64 << 20)
    before = memory.rss_bytes()
    pages = np.frombuffer(block, np.uint8)
    pages[:] = 1
    after = memory.rss_bytes()
    assert after - before > 48 << 20
    assert memory.peak_rss_bytes() >= after
    del pages
    block.close()


def test_anonymous_readings_count_private_memory_not_mapped_files(tmp_path):
    """RssAnon (what the stage report's budget counts) grows with private memory, not with the pages of a file
    mapped and read, which the RSS counts too; AnonPeak's thread catches a peak that has passed."""
    import mmap
    import time

    peak = memory.AnonPeak(every=0.01)
    private = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # new pages, as above
    before = memory.anon_rss_bytes()
    np.frombuffer(private, np.uint8)[:] = 1
    grown = memory.anon_rss_bytes() - before
    time.sleep(0.1)
    private.close()
    assert grown > 48 << 20
    assert peak.peak() >= before + grown - (8 << 20) > memory.anon_rss_bytes() + (32 << 20)
    peak.close()
    path = tmp_path / "pages"
    path.write_bytes(bytes(64 << 20))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        rss, anon = memory.resident_of(["self"])
        assert int(np.frombuffer(mapped, np.uint8).sum()) == 0  # every page read in
        rss_read, anon_read = memory.resident_of(["self"])
    assert rss_read - rss > 48 << 20 and abs(anon_read - anon) < 8 << 20


_GIVE_BACK_PROBE = """
import gc, json
import numpy as np
from export.stages import StageLog
from runtime_py import memory

log = StageLog()
try:
    held = {}
    for give_back in (False, True):
        gc.collect()
        memory.give_back()
        before = memory.anon_rss_bytes()
        with log.stage(f"allocate and free, give_back={give_back}", give_back=give_back):
            # 64 KiB arrays (heap, not mmap), each followed by a small block that stays: the freed ones cannot
            # merge back into the heap's top, which free() would trim
            pairs = [(np.ones(16 << 10, np.float32), bytearray(4096)) for _ in range(1024)]
            kept = [small for _, small in pairs]
            del pairs
        held[give_back] = memory.anon_rss_bytes() - before
        del kept
finally:
    log.close()
print(json.dumps({"held": [held[False], held[True]], "stages": sorted(s.name for s in log.stages)}))
"""


def test_a_stage_that_gives_back_leaves_the_next_no_freed_heap():
    """A stage run with give_back (the export's heavy stages) returns to the system what it freed and the C
    allocator kept (glibc keeps freed small blocks in its heap: 64 MiB of 64 KiB arrays here, like the activations
    of a PyTorch forward pass, 346 MiB of them at 512x680); one without keeps them. In a fresh interpreter: in a
    test process whose heap earlier tests left fragmented, the arrays partly reuse pages already resident (the
    held figure without give_back fell to 37.6 MiB in the whole suite, against 64 MiB alone)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", _GIVE_BACK_PROBE], cwd=root, capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    without, with_give_back = result["held"]
    # measured in a fresh interpreter: 71.6 MiB held without, 8.0 MiB with (the 4 MiB of small blocks kept on
    # purpose, and what the first stage of a process allocates for itself)
    assert without - with_give_back > 48 << 20 and with_give_back < 16 << 20, result
    assert result["stages"] == ["allocate and free, give_back=False", "allocate and free, give_back=True"]


def _op(index, name, inputs, outputs):
    return {"index": index, "op_name": name, "inputs": np.array(inputs), "outputs": np.array(outputs)}


def test_nodes_outside_delegates_walks_partitions():
    # 0 conv -> 1 elu -> 2 mirror_pad -> 3 conv -> 4 resize_nn -> 5 conv ; constants 100..
    ops = [_op(0, "CONV_2D", [0, 100, 101], [10]), _op(1, "ELU", [10], [11]),
           _op(2, "MIRROR_PAD", [11, 102], [12]), _op(3, "CONV_2D", [12, 103, 101], [13]),
           _op(4, "RESIZE_NEAREST_NEIGHBOR", [13, 104], [14]), _op(5, "CONV_2D", [14, 105, 101], [15]),
           # partitions as LiteRT lists them: inputs = boundary tensors (incl. constants), outputs
           _op(6, "DELEGATE", [0, 100, 101], [11]), _op(7, "DELEGATE", [12, 103, 101], [13]),
           _op(8, "DELEGATE", [14, 105, 101], [15])]
    outside = xnnpack.nodes_outside_delegates(ops)
    assert [o["op_name"] for o in outside] == ["MIRROR_PAD", "RESIZE_NEAREST_NEIGHBOR"]
    summary = xnnpack.delegation_summary(ops)
    assert summary["partitions"] == 3 and summary["nodes"] == 6 and summary["nodes_outside"] == 2
    assert summary["ops_outside"] == {"MIRROR_PAD": 1, "RESIZE_NEAREST_NEIGHBOR": 1}
    # no delegate at all: everything is outside
    assert len(xnnpack.nodes_outside_delegates(ops[:6])) == 6


def test_benchmark_model_command_flags():
    args = android.benchmark_model_args("out/gmcnn_512x680_int8.tflite", threads=2, warmup=3, runs=10, xnnpack=False)
    assert args[0] == "/data/local/tmp/benchmark_model"
    assert "--graph=/data/local/tmp/gmcnn_512x680_int8.tflite" in args
    for flag in ("--num_threads=2", "--warmup_runs=3", "--num_runs=10", "--use_xnnpack=false",
                 "--report_peak_memory_footprint=true"):
        assert flag in args
    cmd = android.benchmark_model_command("a/b.tflite", 1, 1, 5)
    assert cmd.startswith("adb push b.tflite /data/local/tmp/ && adb shell ") and "--use_xnnpack=true" in cmd


def test_sgemm_worker_in_subprocess(tmp_path):
    r = run_in_subprocess({"kind": "sgemm", "label": "sgemm", "n": 256, "threads": 1, "runs": 3}, tmp_path)
    assert r["ok"], r.get("error")
    assert r["gmac_per_s"] > 0.1 and r["blas_threads_env"] == "1" and len(r["runs_s"]) == 3
    assert (tmp_path / "sgemm.log").exists()


def test_failing_worker_reports_error(tmp_path):
    r = run_in_subprocess({"kind": "tflite", "label": "missing", "path": str(tmp_path / "nope.tflite"),
                           "threads": 1}, tmp_path)
    assert r["ok"] is False and "nope.tflite" in r["error"]


def _photo(rows=96, cols=128, seed=0):
    return photo(rows, cols, seed, period=9.0, noise=4.0)


def test_make_cases_records_seeds_and_cycles_photos():
    cases = quality.make_cases(["a.jpg", "b.jpg"], per_cell=1)
    assert len(cases) == 9 and len({c.seed for c in cases}) == 9
    assert {c.photo for c in cases} == {"a.jpg", "b.jpg"}
    assert {(c.kind, c.size) for c in cases} == {(k, s) for k in quality.KINDS for s in quality.SIZES}
    assert quality.make_cases([], per_cell=1) == []
    medium = quality.make_cases(["a.jpg", "b.jpg"], sizes=("medium",))
    assert set(medium) <= set(cases) and len(medium) == 3  # same photo and seed per cell in any subset


def test_evaluate_scores_methods_and_catches_errors():
    from benchmarks.classical import navier_stokes, telea

    img = _photo()
    identity = quality.MethodSpec("copy-original", "test", lambda im, m: im.copy())
    grey = quality.MethodSpec("grey-fill", "test", lambda im, m: np.where(m[..., None] > 0, 128, im).astype(np.uint8))
    broken = quality.MethodSpec("broken", "test", lambda im, m: 1 / 0)
    methods = [identity, grey, broken, quality.MethodSpec("opencv-telea", "classical", telea),
               quality.MethodSpec("opencv-ns", "classical", navier_stokes)]
    cases = quality.make_cases(["p"], kinds=("rect", "blob"), sizes=("medium",))
    rows = quality.evaluate(cases, methods, lambda p: img)
    assert len(rows) == 2 * len(methods)
    by = {(r["method"], r["kind"]): r for r in rows}
    assert by[("copy-original", "rect")]["hole_psnr"] == float("inf")
    assert "ZeroDivisionError" in by[("broken", "rect")]["error"]
    # a smooth photo: diffusion fills beat a flat grey fill inside the hole
    assert by[("opencv-telea", "blob")]["hole_psnr"] > by[("grey-fill", "blob")]["hole_psnr"]
    assert all(by[(m, "rect")]["unmasked_identical"] for m in ("grey-fill", "opencv-telea", "opencv-ns"))
    summary = quality.summarize(rows, by=("method",))
    s = {x["method"]: x for x in summary}
    assert s["broken"]["n"] == 0 and s["broken"]["errors"] == 2
    assert s["grey-fill"]["n"] == 2 and np.isfinite(s["grey-fill"]["hole_psnr"])


def test_resize_method_runs_small_and_composites():
    img = _photo(200, 300)
    mask = np.zeros((200, 300), np.uint8)
    mask[50:120, 100:200] = 1
    seen = {}

    def fill(im, m):
        seen["shape"] = im.shape
        out = im.copy()
        out[m > 0] = 0
        return out

    out = quality.resize_method(fill, 100 * 150)(img, mask)
    assert seen["shape"][0] * seen["shape"][1] <= 100 * 150
    assert out.shape == img.shape
    assert (out[60:110, 110:190] == 0).all()  # hole interior (its border mixes in bicubic-upscaled context)
    assert np.array_equal(out[mask == 0], img[mask == 0])


def _fake_results():
    lat_rows = []
    for eng, prec in (("pytorch-eager", "fp32"), ("tflite", "fp32"), ("tflite", "int8")):
        for shape in ("64x88", "128x176"):
            lat_rows.append({"label": f"{eng} {prec} {shape}", "engine": eng, "precision": prec, "io": "tensor",
                             "shape": shape, "threads": 2, "init_s": 0.1, "first_s": 0.2, "min_s": 0.1,
                             "median_s": 0.12, "p90_s": 0.15, "rss_idle_mib": 50.0, "rss_after_first_mib": 60.0,
                             "peak_rss_mib": 70.0, "peak_added_over_idle_mib": 20.0, "speedup_vs_torch": 2.0,
                             "gmac_per_s": 3.0, "fraction_of_sgemm_peak": 0.5, "bytes": 1 << 20})
    q_rows = []
    for method, group, mode in (("baseline fp32", "mode", "baseline"), ("shrink fp32", "mode", "shrink"),
                                ("opencv-telea", "classical", "")):
        for kind in ("strokes", "rect"):
            q_rows.append({"photo": "p.jpg", "kind": kind, "size": "medium", "seed": 1, "method": method,
                           "group": group, "mode": mode, "precision": "fp32" if mode else "", "seconds": 1.0,
                           **{k: 20.0 for k in quality.SCORE_KEYS}})
    return {
        "meta": {"command": "gmcnn-mobile bench --quick", "started": "2026-11-25T00:00:00+00:00", "wall_s": 1.0,
                 "cpu": "test cpu", "cpu_count": 2, "load_avg_start": 1.0, "load_avg_end": 1.0,
                 "contention_note": "shared.", "versions": {"ai-edge-litert": "2.1.0"}, "artifacts": "a",
                 "runs": 2, "warmup": 1, "threads": [2], "sgemm_n": 256, "notes": [], "skipped": ["Core ML: macOS only"],
                 "cpu_simd": {"present": ["avx2", "fma"], "absent": ["avx512f"]}},
        "latency": {"rows": lat_rows, "sgemm_peak_gmac_per_s": {"2": 6.0}},
        "android": [{"label": "x", "file": "f.tflite", "push": "adb push f.tflite /data/local/tmp/",
                     "shell": "/data/local/tmp/benchmark_model --graph=/data/local/tmp/f.tflite"}],
        "pipeline": {"rows": [{"photo": "p.jpg", "megapixels": 4.1, "mode": "baseline", "tiles": "auto",
                               "end_to_end_s": 2.0, "model_s": 1.5, "non_model_share": 0.25, "model_runs": 1,
                               "tiles_run": 0, "tiles_skipped": 0, "peak_rss_mib": 300.0,
                               "stage_seconds": {"decode": 0.2, "model": 1.5, "encode": 0.3}}],
                     "mask": {"kind": "blob", "size": "medium", "seed": 1}, "threads": 2, "precision": "fp32"},
        "quality": {"rows": q_rows, "cases": 2, "band_px": 8},
    }


def test_write_report_writes_every_file(tmp_path):
    files = report.write_report(tmp_path, _fake_results())
    for name in ("results.json", "latency.csv", "pipeline.csv", "quality.csv", "quality_summary.csv", "report.md",
                 "latency.png", "pipeline.png", "quality.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
        assert name in files
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    assert "## Headline" in md and "| tflite | int8 |" in md and "benchmark_model" in md
    assert "### hole PSNR (dB) by method x mask kind x size" in md and "Core ML: macOS only" in md
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["latency"]["rows"][0]["median_s"] == 0.12
    assert not list(tmp_path.glob(".*.tmp"))


def test_readme_section_replaced_between_markers(tmp_path):
    res = _fake_results()
    path = tmp_path / "README.md"
    path.write_text("# x\n\nintro\n\n<!-- bench:start -->\nold table\n<!-- bench:end -->\n\n## Later\n")
    readme.update_readme(path, res)
    text = path.read_text()
    assert "old table" not in text and text.count(readme.START) == 1 and text.endswith("## Later\n")
    assert "| tflite | int8 |" in text and "```sh\nmake bench\n```" in text
    # the machine next to the tables; the run's own command and notes stay in the full report
    assert "test cpu (2 cores; CPU flags avx2 fma, no avx512f), 2 thread(s), 1-minute load average 1.0" in text
    assert "gmcnn-mobile bench --quick" not in text
    path2 = tmp_path / "R2.md"
    path2.write_text("# y\n")
    readme.update_readme(path2, res)
    assert path2.read_text().startswith("# y\n\n" + readme.START)


def test_each_readme_table_names_the_machine_its_own_run_measured_it_on(tmp_path):
    """A merge keeps each section's source: the latency table says the machine of the run that timed it, the
    quality table that of the run that scored it, even when another run was merged in after it."""
    from benchmarks.merge import merge_results
    from benchmarks.run import section_machine

    old, new = _fake_results(), _fake_results()
    for res, cpu, day, simd in ((old, "old cpu", "2026-12-03", ["avx2"]), (new, "new cpu", "2026-12-04", ["amx_tile"])):
        res["meta"].update(cpu=cpu, started=f"{day}T00:00:00+00:00", cpu_simd={"present": simd, "absent": []})
        for section in ("latency", "pipeline", "quality"):
            res[section]["source"] = {"command": f"bench {cpu}", "started": day, "machine": section_machine(res["meta"]),
                                      "model_sha256": cpu[0] * 64}
    del new["quality"]  # the new run timed latency (and the pipeline) only
    merged = merge_results(old, new, lambda raw, macs: {"rows": new["latency"]["rows"]})
    path = tmp_path / "README.md"
    readme.update_readme(path, merged)
    text = path.read_text()
    lat, qual = text.index("Model latency (median)"), text.index("Quality per mode")
    new_line = "Measured 2026-12-04 on new cpu (2 cores; CPU flags amx_tile), 2 thread(s)"
    old_line = "Measured 2026-12-03 on old cpu (2 cores; CPU flags avx2), 2 thread(s)"
    assert text.count(new_line) == 1 and text.count(old_line) == 1
    assert text.index(new_line) < lat < text.index(old_line) < qual
    assert "XNNPACK; the artifacts' checkpoint sha256 nnnnnnnn..." in text[:lat]
    assert "XNNPACK; the artifacts' checkpoint sha256 oooooooo..." in text[lat:qual]
    assert "merged runs" not in text  # each line is its section's own run


def test_plan_latency_covers_every_artifact_thread_count_and_reference():
    from types import SimpleNamespace as NS

    from benchmarks.latency import plan_latency

    arts = [NS(format=f, shape=list(sh), height=sh[0], width=sh[1], precision=p, io=io, file=f"{p}_{io}_{sh[0]}.x",
               bytes=10)
            for f in ("tflite", "coreml") for sh in ((64, 88), (128, 176)) for p in ("fp32", "int8") for io in ("tensor", "image")]
    manifest = NS(artifacts=arts)
    specs = plan_latency(manifest, __import__("pathlib").Path("/a"), [1, 2], warmup=1, runs=3, checkpoint="ck",
                         onnx_files={"64x88": "m.onnx"}, sgemm_n=64)
    labels = [s["label"] for s in specs]
    assert labels[:2] == ["sgemm n=64 1t", "sgemm n=64 2t"]
    tfl = [s for s in specs if s["kind"] == "tflite"]
    # 2 shapes x 2 precisions x 2 io x 2 threads, plus XNNPACK off for fp32 tensor per shape and thread count
    assert len(tfl) == 16 + 4 and all(s["path"].startswith("/a/") for s in tfl)
    assert sum(1 for s in tfl if s["xnnpack"] is False) == 4
    assert sum(1 for s in specs if s["kind"] == "torch") == 4
    assert sum(1 for s in specs if s["kind"] == "onnxruntime") == 2  # only where an ONNX file exists
    assert not any("coreml" in s["label"] for s in specs)
    only = plan_latency(manifest, __import__("pathlib").Path("/a"), [2], 1, 3, None, {}, 64,
                        shapes=["64x88"], precisions=["int8"], ios=["image"])
    assert [s["label"] for s in only] == ["sgemm n=64 2t", "tflite int8 image 64x88 2t"]


def test_find_photos_skips_masks_and_upscales_when_nothing_is_large(tmp_path):
    import cv2

    from benchmarks.photos import describe, ensure_large_photo, find_photos

    cv2.imwrite(str(tmp_path / "b.png"), _photo(60, 80))
    cv2.imwrite(str(tmp_path / "a.jpg"), _photo(90, 120))
    cv2.imwrite(str(tmp_path / "a_mask.png"), np.zeros((90, 120), np.uint8))
    (tmp_path / "notes.txt").write_text("x")
    found = find_photos([tmp_path, tmp_path / "a.jpg"])
    assert [p.name for p in found] == ["a.jpg", "b.png"]
    infos = describe(found)
    assert (infos[0].rows, infos[0].cols) == (90, 120)
    big = ensure_large_photo(infos, tmp_path / "work", min_pixels=40_000)
    assert big.upscaled_from == "a.jpg" and big.rows * big.cols >= 40_000 and big.path.is_file()
    assert cv2.imread(str(big.path)).shape[:2] == (big.rows, big.cols)
    assert ensure_large_photo(infos, tmp_path / "work", min_pixels=10_000).path.name == "a.jpg"


def test_a_merged_runs_model_rows_keep_their_own_runs_ceiling(tmp_path):
    """Two runs on one machine measure the ceiling 5 % apart: after the merge each model row is divided by its own
    run's ceiling, not the newest run's, and the ceiling table lists both runs' measurements with their run."""
    from benchmarks.latency import derive
    from benchmarks.merge import merge_results

    def row(label, kind, median, fastest=None, role=None):
        spec = {"kind": kind, "label": label, "engine": "tflite", "precision": "fp32", "io": "tensor",
                "shape_key": "64x88", "threads": 2, "warmup": 1, "runs": 3}
        if role:
            spec.update(role=role, conv="7x7 128->128 at 16x22", gmac=1.0)
        return {"spec": spec, "ok": True, "init_s": 0, "first_s": 0, "warmup_s": [], "runs_s": [median],
                "stats": {"min_s": fastest or median, "median_s": median, "p90_s": median}, "rss_after_init": 0,
                "rss_after_first": 0, "peak_rss": 0, "peak_added_over_idle": 0}

    ceiling = "xnnpack conv 7x7 128->128 at 16x22 fp32 2t"
    old = _fake_results()
    old["meta"]["started"] = "2026-12-06T01:00:00+00:00"
    old["latency"] = {"raw": [row(ceiling, "tflite", 0.1, 1 / 20, "roofline"), row("tensor", "tflite", 1.0)]}
    new = {"meta": dict(old["meta"], command="second", started="2026-12-06T02:00:00+00:00", macs={"64x88": 10 ** 10}),
           "latency": {"raw": [row(ceiling, "tflite", 0.1, 1 / 21, "roofline"), row("image", "tflite", 1.0)]}}
    merged = merge_results(old, new, derive)
    frac = {r["label"]: r["fraction_of_xnnpack_conv"] for r in merged["latency"]["rows"]}
    assert frac == pytest.approx({"tensor": 10 / 20, "image": 10 / 21})
    table = report.conv_ceiling_table(merged["latency"])
    assert "| run |" in table and "2026-12-06T01:00:00+00:00" in table and "2026-12-06T02:00:00+00:00" in table
    # merged once more, the first two runs' rows keep the runs they were tagged with
    third = {"meta": dict(new["meta"], command="third", started="2026-12-06T03:00:00+00:00"),
             "latency": {"raw": [row("other", "tflite", 2.0)]}}
    again = merge_results(merged, third, derive)
    frac = {r["label"]: r["fraction_of_xnnpack_conv"] for r in again["latency"]["rows"]}
    assert frac == pytest.approx({"tensor": 10 / 20, "image": 10 / 21, "other": None})


def test_merge_keeps_old_sections_and_replaces_same_rows(tmp_path):
    from benchmarks.latency import derive
    from benchmarks.merge import merge_results

    def lat(label, median, shape="64x88"):
        return {"spec": {"kind": "tflite", "label": label, "engine": "tflite", "precision": "fp32", "io": "tensor",
                         "shape_key": shape, "threads": 2, "warmup": 1, "runs": 2},
                "ok": True, "init_s": 0.1, "first_s": 0.1, "warmup_s": [0.1], "runs_s": [median] * 2,
                "stats": {"min_s": median, "median_s": median, "p90_s": median}, "rss_after_init": 1 << 20,
                "rss_after_first": 2 << 20, "peak_rss": 3 << 20, "peak_added_over_idle": 2 << 20}

    old = _fake_results()
    old["latency"] = {"raw": [lat("a", 1.0), lat("b", 2.0)], "rows": []}
    new = {"meta": dict(old["meta"], command="second", macs={"64x88": 10 ** 9}),
           "latency": {"raw": [lat("b", 5.0), lat("c", 3.0, "128x176")], "rows": []}}
    merged = merge_results(old, new, derive)
    rows = {r["label"]: r for r in merged["latency"]["rows"]}
    assert set(rows) == {"a", "b", "c"} and rows["b"]["median_s"] == 5.0
    assert rows["a"]["gmac_per_s"] == 1.0  # re-derived with the merged MAC table
    assert merged["quality"] == old["quality"] and merged["pipeline"] == old["pipeline"]
    assert merged["meta"]["merged_from"][0]["command"] == "gmcnn-mobile bench --quick"
    report.write_report(tmp_path, merged)
    assert "merges earlier runs" in (tmp_path / "report.md").read_text()


def test_merge_keeps_best_sgemm_and_drops_budget_skips_measured_since(tmp_path):
    from benchmarks.latency import derive
    from benchmarks.merge import merge_results

    def sgemm(gmac):
        return {"spec": {"kind": "sgemm", "label": "sgemm n=64 2t", "threads": 2}, "ok": True, "gmac_per_s": gmac}

    def tfl(label):
        return {"spec": {"kind": "tflite", "label": label, "engine": "tflite", "precision": "fp32", "io": "tensor",
                         "shape_key": "64x88", "threads": 2, "warmup": 1, "runs": 2},
                "ok": True, "init_s": 0.1, "first_s": 0.1, "warmup_s": [0.1], "runs_s": [1.0] * 2,
                "stats": {"min_s": 1.0, "median_s": 1.0, "p90_s": 1.0}, "rss_after_init": 1 << 20,
                "rss_after_first": 2 << 20, "peak_rss": 3 << 20, "peak_added_over_idle": 2 << 20}

    old = _fake_results()
    old["latency"] = {"raw": [sgemm(70.0), tfl("a")], "rows": []}
    old["quality"]["planned"] = [list(c) for c in dict.fromkeys(
        (r["photo"], r["kind"], r["size"], r["seed"]) for r in old["quality"]["rows"])]
    old["quality"]["planned"].append(["x.jpg", "blob", "large", 99])
    old["meta"]["skipped"] = ["latency b: --time-budget spent before it started",
                              "latency c: --time-budget spent before it started",
                              "quality: 1 of 3 planned cases not scored (blob/large; --time-budget spent)",
                              "2 Core ML artifact(s): Core ML runs only on macOS/iOS, not on this Linux host"]
    new = {"meta": dict(old["meta"], command="second", macs={"64x88": 10 ** 9}, skipped=[]),
           "latency": {"raw": [sgemm(50.0), tfl("b")], "rows": []}}
    merged = merge_results(old, new, derive)
    assert merged["latency"]["sgemm_peak_gmac_per_s"] == {"2": 70.0}
    peak_row = [r for r in merged["latency"]["raw"] if r["spec"]["kind"] == "sgemm"]
    assert len(peak_row) == 1 and peak_row[0]["gmac_per_s_measured"] == [70.0, 50.0]
    skipped = merged["meta"]["skipped"]
    assert not any(s.startswith("latency b:") for s in skipped)  # measured by the second run
    assert any(s.startswith("latency c:") for s in skipped)
    assert any("Core ML" in s for s in skipped)
    assert [s for s in skipped if s.startswith("quality:")] == [
        "quality: 1 of 3 planned cases not scored (blob/large; --time-budget spent)"]
    report.write_report(tmp_path, merged)
    assert "best of 2 merged runs: 50.0-70.0" in (tmp_path / "report.md").read_text()

    scored = dict(old["quality"]["rows"][0], kind="blob", size="large", seed=99, photo="x.jpg")
    third = {"meta": dict(old["meta"], command="third", skipped=[]),
             "quality": dict(old["quality"], rows=[scored], planned=[["x.jpg", "blob", "large", 99]])}
    again = merge_results(merged, third, derive)
    assert not any(s.startswith("quality:") for s in again["meta"]["skipped"])
    assert again["quality"]["cases"] == len(old["quality"]["planned"])


def test_evaluate_stops_when_told():
    img = _photo()
    calls = []
    m = quality.MethodSpec("copy", "test", lambda im, mk: im.copy())
    cases = quality.make_cases(["p"], kinds=("rect", "blob", "strokes"), sizes=("small",))
    rows = quality.evaluate(cases, [m], lambda p: img, should_stop=lambda: calls.append(1) or len(calls) > 2)
    assert len(rows) == 2 and len(calls) == 3


def test_contention_note_follows_the_load_at_start():
    from benchmarks.run import contention_note

    assert "idle" in contention_note(0.2, 2) and "inflated" not in contention_note(0.2, 2)
    busy = contention_note(5.3, 2)
    assert "5.3" in busy and "inflated" in busy and "2 cores" in busy


# ----------------------------------------------------------------------------- convolution ceiling

def test_dominant_convolutions_of_the_shipped_layout():
    """tf cnum 32 at 512x680: the quarter-resolution encoder layers carry the MACs (8 layers each)."""
    from benchmarks.roofline import ConvShape, dominant_convs
    from models.gmcnn import build_generator, conv_layers, count_macs

    gen = build_generator("tf", 32, seed=0)
    layers = conv_layers(gen, 512, 680)
    assert sum(layer["macs"] for layer in layers) == count_macs(gen, 512, 680)
    seven, three = dominant_convs(layers)
    assert seven == ConvShape(7, 128, 128, 128, 170) and three == ConvShape(3, 128, 128, 128, 170)
    assert seven.gmac == pytest.approx(17.47, abs=0.01)
    assert dominant_convs(layers, kernels=(5,)) == [ConvShape(5, 128, 128, 128, 170)]


def test_conv_microbenchmark_files_run_through_the_tflite_engine(tmp_path):
    """Tiny one-convolution files: NHWC in/out of the declared shape, int8 close to fp32, built once."""
    pytest.importorskip("tensorflow")
    from benchmarks.roofline import ConvShape, build_conv_files
    from benchmarks.worker import synthetic_feed
    from runtime_py.engines.tflite_engine import TFLiteEngine

    shape = ConvShape(3, 8, 6, 9, 11)
    files = build_conv_files(shape, tmp_path)
    assert sorted(files) == ["fp32", "int8"] and all(f.name.startswith("conv3x3_8to6_9x11_") for f in files.values())
    outs = {}
    for precision, path in files.items():
        engine = TFLiteEngine(path, threads=1).activate()
        (spec_in,), (spec_out,) = engine.input_specs(), engine.output_specs()
        assert tuple(spec_in.shape) == (1, 9, 11, 8) and tuple(spec_out.shape) == (1, 9, 11, 6)
        feed = synthetic_feed(engine)
        y = next(iter(engine.infer(feed).values()))
        if spec_out.quantization:
            scale, zero = spec_out.quantization
            y = (y.astype(np.float32) - zero) * scale
        outs[precision] = (y, feed)
    y32, y8 = outs["fp32"][0], outs["int8"][0]
    assert y32.min() >= -1.0 and np.abs(y32).max() > 0.1  # ELU output, not all zero
    # both files get the same noise (synthetic_feed, quantized for int8): int8 within a few output steps
    assert np.abs(y32 - y8).max() < 0.1
    mtime = files["fp32"].stat().st_mtime_ns
    assert build_conv_files(shape, tmp_path)["fp32"].stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_models_are_divided_by_the_ceiling_of_their_precision():
    from pathlib import Path

    from benchmarks.latency import derive, plan_latency
    from benchmarks.roofline import ROOFLINE_RUNS, ConvShape, roofline_specs
    from types import SimpleNamespace as NS

    conv = ConvShape(7, 128, 128, 16, 22)
    files = {(conv, "fp32"): Path("c32.tflite"), (conv, "int8"): Path("c8.tflite")}
    roof = roofline_specs("64x88", files, [2], warmup=1, runs=3)
    arts = [NS(format="tflite", shape=[64, 88], height=64, width=88, precision=p, io="tensor", file=f"{p}.tflite", bytes=1)
            for p in ("fp32", "int8-dynamic", "int8")]
    specs = plan_latency(NS(artifacts=arts), Path("/a"), [2], 1, 3, None, {}, 64, xnnpack_off=False, roofline=roof)
    assert [s["label"] for s in specs[:3]] == ["sgemm n=64 2t", "xnnpack conv 7x7 128->128 at 16x22 fp32 2t",
                                               "xnnpack conv 7x7 128->128 at 16x22 int8 2t"]
    assert [s["runs"] for s in roof] == [ROOFLINE_RUNS] * 2  # a ceiling gets more runs than the models' 3
    median = {"sgemm": 1.0, "c32.tflite": conv.gmac / 16.0, "c8.tflite": conv.gmac / 30.0,
              "/a/fp32.tflite": 1.0, "/a/int8-dynamic.tflite": 1.0, "/a/int8.tflite": 0.5}
    # the ceiling is each convolution's fastest run (20 and 40 GMAC/s), not its median (16 and 30)
    fastest = {"c32.tflite": conv.gmac / 20.0, "c8.tflite": conv.gmac / 40.0}
    results = [{"spec": s, "ok": True, "gmac_per_s": 50.0, "openblas_kernels": "Haswell",
                "stats": {"median_s": median.get(s.get("path", "sgemm")), "min_s": fastest.get(s.get("path"), 0.1),
                          "p90_s": 0},
                "init_s": 0, "first_s": 0, "warmup_s": [], "rss_after_init": 0, "rss_after_first": 0, "peak_rss": 0,
                "peak_added_over_idle": 0} for s in specs]
    out = derive(results, {"64x88": 10 ** 10})  # 10 GMAC per inference
    frac = {r["precision"]: r["fraction_of_xnnpack_conv"] for r in out["rows"]}
    assert frac == pytest.approx({"fp32": 10 / 20, "int8-dynamic": 10 / 40, "int8": 20 / 40})
    assert out["xnnpack_conv_gmac_per_s"] == {"64x88": {"2": pytest.approx({"fp32": 20.0, "int8": 40.0})}}
    assert out["sgemm_kernels"] == "Haswell" and len(out["roofline_rows"]) == 2
    assert all(r["engine"] == "tflite" and "xnnpack conv" not in r["label"] for r in out["rows"])
    headline = report.headline_tables({"latency": out})
    assert "% of conv ceiling 2t" in headline and "| 50 % |" in headline and "7x7 128->128 at 16x22" in headline


def test_reports_carry_no_absolute_path_of_this_machine(tmp_path):
    """Paths under a folder that exists here become relative to the checkout, in values and inside commands;
    device paths (Android) and slashes that are not paths stay."""
    from benchmarks.report import REPO_ROOT, portable

    res = _fake_results()
    runs = REPO_ROOT.parent / "runs"
    res["meta"]["command"] = f"gmcnn-mobile bench --artifacts {runs}/a --out '{tmp_path}/o' --photos {REPO_ROOT}/p"
    res["meta"]["artifacts"] = str(runs / "a")
    res["meta"]["notes"] = ["12.5 GMAC/s, fp16/w8 and 1/2 of /no-such-top-folder/x"]
    got = portable(res)
    rel_tmp = __import__("os").path.relpath(tmp_path, REPO_ROOT)
    assert got["meta"]["command"] == f"gmcnn-mobile bench --artifacts ../runs/a --out '{rel_tmp}/o' --photos p"
    assert got["meta"]["artifacts"] == "../runs/a" and got["meta"]["notes"] == res["meta"]["notes"]
    assert got["android"] == res["android"]  # /data/local/tmp is the phone's
    res["meta"]["merged_from"] = [{"command": f"gmcnn-mobile bench --out {runs}/b", "started": "x"}]
    files = report.write_report(tmp_path / "out", res)
    md = files["report.md"].read_text()
    top_folders = "|".join(sorted({REPO_ROOT.parts[1], tmp_path.parts[1]}))
    absolute = re.compile(rf"(?<![\w.~-])/({top_folders})/")  # "../runs/b" and "/data/local/tmp/" do not match
    assert not absolute.search(md) and "--out ../runs/b" in md and "/data/local/tmp/" in md
    assert not absolute.search(files["results.json"].read_text())
    readme_path = tmp_path / "README.md"
    readme.update_readme(readme_path, res)
    assert not absolute.search(readme_path.read_text())
