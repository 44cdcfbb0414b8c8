"""``gmcnn-mobile bench --quick`` end to end on tiny exported artifacts and two small generated photos.

Proves the harness runs every section and writes every file (JSON, CSV, Markdown,
PNG plots). Tiny model: GMCNN tf variant, cnum 4, TFLite at 64x88, fp32 and
int8-dynamic (no 128x176 artifact, so two-step's high-res pass runs tiled);
nothing from ../shared is used. Thread lists of more than one count are covered
by the planning unit test in test_bench_units.py.
"""
import csv
import json

import numpy as np
import pytest

from benchmarks.roofline import ROOFLINE_RUNS
from helpers import run_cli, write_photos

SHAPES = [(64, 88)]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from export.api import export_artifacts
    from models import build_generator, save_checkpoint

    root = tmp_path_factory.mktemp("bench")
    ckpt = save_checkpoint(build_generator("tf", 4, seed=0), root / "tiny.safetensors")
    arts = root / "artifacts"
    export_artifacts(ckpt, arts, shapes=SHAPES, formats=("tflite",), precisions=["fp32", "int8-dynamic"],
                     ios=["tensor"], progress=False)
    photos = write_photos(root / "photos", [(180, 260), (150, 200)], period=11.0, noise=5.0)
    return root, ckpt, arts, photos


def test_quick_bench_writes_every_file(tiny_export, capsys):
    from gmcnn_mobile.cli import main

    root, ckpt, arts, photos = tiny_export
    out = root / "out"
    readme = root / "README.md"
    readme.write_text("# project\n\n<!-- bench:start -->\nstale\n<!-- bench:end -->\n")
    rc = main(["bench", "--artifacts", str(arts), "--photos", str(photos), "--out", str(out), "--quick",
               "--checkpoint", str(ckpt), "--quality-modes", "baseline,shrink", "--sgemm-n", "256", "--no-patchmatch",
               "--update-readme", str(readme)])
    assert rc == 0
    for name in ("results.json", "latency.csv", "pipeline.csv", "quality.csv", "quality_summary.csv", "report.md",
                 "latency.png", "pipeline.png", "quality.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())

    lat = {r["label"].split("] ", 1)[-1]: r for r in res["latency"]["rows"]}
    assert {r["model"] for r in res["latency"]["rows"]} == {"tf-c4"}
    # quick: smallest shape, tensor I/O, 2 threads; torch + onnxruntime + each artifact + XNNPACK off
    for t in (2,):
        for label in (f"torch fp32 64x88 {t}t", f"onnxruntime fp32 64x88 {t}t", f"tflite fp32 tensor 64x88 {t}t",
                      f"tflite int8-dynamic tensor 64x88 {t}t", f"tflite fp32 tensor 64x88 {t}t no-xnnpack"):
            row = lat[label]
            assert "error" not in row, (label, row.get("error"))
            assert 0 < row["min_s"] <= row["median_s"] <= row["p90_s"]
            assert row["peak_rss_mib"] >= row["rss_idle_mib"] > 0
            assert row["gmac_per_s"] > 0 and row["speedup_vs_torch"] > 0
    assert {r["threads"] for r in res["latency"]["rows"]} == {2}
    assert lat["tflite fp32 tensor 64x88 2t no-xnnpack"]["xnnpack_partitions"] == 0
    assert lat["tflite fp32 tensor 64x88 2t"]["xnnpack_partitions"] >= 1
    assert set(res["latency"]["sgemm_peak_gmac_per_s"]) == {"2"}
    # the convolution ceiling: the tiny model's dominant 7x7 and 3x3 layers, fp32 and int8, in the same run
    ceiling = res["latency"]["xnnpack_conv_gmac_per_s"]["64x88"]["2"]
    assert set(ceiling) == {"fp32", "int8"} and min(ceiling.values()) > 0
    assert {r["conv"].split()[0] for r in res["latency"]["roofline_rows"]} == {"7x7", "3x3"}
    assert all(0 < lat[f"tflite {p} tensor 64x88 2t"]["fraction_of_xnnpack_conv"] for p in ("fp32", "int8-dynamic"))
    raw = [r for r in res["latency"]["raw"] if r["spec"]["kind"] == "tflite" and r["spec"].get("role") != "roofline"]
    assert raw and all(len(r["runs_s"]) == 2 and len(r["warmup_s"]) == 1 for r in raw)  # quick: 2 timed, 1 warm-up
    ceiling_runs = [r for r in res["latency"]["raw"] if r["spec"].get("role") == "roofline"]
    assert ceiling_runs and all(len(r["runs_s"]) == ROOFLINE_RUNS for r in ceiling_runs)
    assert len({r["pid"] for r in res["latency"]["raw"]}) == len(res["latency"]["raw"])  # one process each
    assert any("benchmark_model" in c["shell"] and "--num_threads=2" in c["shell"] for c in res["android"])

    pipe = res["pipeline"]["rows"]
    assert {(r["mode"], r["tiles"]) for r in pipe} == {("baseline", "auto"), ("two-step", "on")}
    assert next(r for r in pipe if r["mode"] == "two-step")["tiles_run"] >= 1
    for r in pipe:
        assert "error" not in r, r.get("error")
        assert r["unmasked_identical"] and r["model_runs"] >= 1
        assert {"decode", "model", "encode"} <= set(r["stage_seconds"])
        assert 0 <= r["non_model_share"] < 1 and r["peak_rss_mib"] > 0

    q = res["quality"]["rows"]
    methods = {r["method"] for r in q}
    assert methods == {"baseline fp32", "shrink fp32", "baseline int8-dynamic", "opencv-telea", "opencv-ns"}
    assert {r["kind"] for r in q} == {"strokes", "blob", "rect"}
    assert all("error" not in r and np.isfinite(r["band_psnr"]) for r in q)
    with open(out / "quality.csv") as f:
        assert len(list(csv.DictReader(f))) == len(q)

    md = (out / "report.md").read_text()
    for heading in ("## Headline", "## Model latency and memory", "### XNNPACK on vs off", "## Android",
                    "## Pipeline cost", "## Quality"):
        assert heading in md
    text = readme.read_text()
    assert "stale" not in text and "## Benchmarks" in text and "| tflite | int8-dynamic |" in text
    assert "wrote" in capsys.readouterr().out


def test_bench_bad_arguments_fail_cleanly(tiny_export, tmp_path, capsys):
    from gmcnn_mobile.cli import main

    root, ckpt, arts, photos = tiny_export
    assert main(["bench", "--artifacts", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no export manifest" in capsys.readouterr().err
    rc, _, err = run_cli("bench", "--artifacts", arts, "--photos", photos, "--threads", "0,x")
    assert rc == 2 and "argument --threads: must be at least 1" in err
    assert main(["bench", "--artifacts", str(arts), "--photos", str(tmp_path / "none")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
