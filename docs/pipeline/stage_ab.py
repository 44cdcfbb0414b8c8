"""The 12 MP baseline pipeline's stages, an older runtime_py against this checkout's, in ONE process.

The two take turns (old, new, new, old, ...) on one opened TFLite engine, so a busy machine slows
both alike: compare ratios, not absolute seconds. Each run counts its stages as
``benchmarks/pipeline_cost.measure_pipeline`` does -- decode (read_image + rgb8), the pipeline's own
stage clock, other (the run minus its stages), encode (compose_output + JPEG q95 in memory) -- plus,
inside ``resize``, the seconds of each resize function; and checks that both give the same bytes.

    mkdir -p scratch/old && git archive COMMIT runtime_py | tar -x -C scratch/old \\
        && mv scratch/old/runtime_py scratch/old/runtime_py_old
    PYTHONPATH=.:scratch/old python docs/pipeline/stage_ab.py ARTIFACTS PHOTO --runs 4 --out scratch/ab.json

ARTIFACTS: a folder with the 512x680 fp32 TFLite file and its manifest; PHOTO: a 12 MP photo
(``benchmarks.photos.ensure_large_photo`` makes one: Wood.jpg upscaled to 4000x3008).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import time

import numpy as np

from benchmarks.pipeline_cost import PIPELINE_MASK
from runtime_py.engines import open_engines
from runtime_py.masks import make_mask

STAGES = ["decode", "resize", "composite", "other", "encode"]
RESIZES = ["resize_image", "resize_mask", "resize_image_part"]


def timed_package(package: str):
    """(pipeline module, imageio module, seconds per resize function) of ``package``, its pipeline's
    resize functions wrapped in a clock."""
    pipeline = importlib.import_module(package + ".pipeline")
    imageio = importlib.import_module(package + ".imageio")
    seconds = {}
    for name in RESIZES:
        def clocked(*a, _f=getattr(pipeline, name), _name=name, **k):
            t0 = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                seconds[_name] = seconds.get(_name, 0.0) + time.perf_counter() - t0
        setattr(pipeline, name, clocked)
    return pipeline, imageio, seconds


def one_run(pipeline, imageio, seconds, engines, photo):
    seconds.clear()
    st = {}
    t0 = time.perf_counter()
    src = imageio.read_image(photo)
    rgb = src.rgb8()
    st["decode"] = time.perf_counter() - t0
    hole = make_mask(PIPELINE_MASK["kind"], rgb.shape[0], rgb.shape[1], seed=PIPELINE_MASK["seed"],
                     size=PIPELINE_MASK["size"]).astype(bool)
    t0 = time.perf_counter()
    res = pipeline.Pipeline(engines, pipeline.PipelineConfig(mode="baseline", tiles="auto")).run(rgb, hole)
    run_s = time.perf_counter() - t0
    clock = {k: v for k, v in res.stats.stage_seconds.items() if k != "total"}
    st.update(clock)
    st["other"] = max(0.0, run_s - sum(clock.values()))
    t0 = time.perf_counter()
    data = imageio.encode(imageio.compose_output(src, res.image, hole), ".jpg")
    st["encode"] = time.perf_counter() - t0
    e2e = st["decode"] + run_s + st["encode"]
    return {"end_to_end_s": e2e, "model_s": st["model"], "non_model_s": e2e - st["model"],
            "non_model_share": (e2e - st["model"]) / e2e, "stage_seconds": st, "resize_seconds": dict(seconds),
            "window": res.stats.window, "load1": os.getloadavg()[0], "digest": [hash(res.image.tobytes()), hash(data)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifacts")
    ap.add_argument("photo")
    ap.add_argument("--runs", type=int, default=4, help="runs of each side")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sides = {"old": timed_package("runtime_py_old"), "new": timed_package("runtime_py")}
    engines = open_engines("tflite", artifacts=args.artifacts, threads=args.threads, precision="fp32")
    engines.get(engines.base_shape)
    order = (["old", "new", "new", "old"] * args.runs)[: 2 * args.runs]
    rows = []
    for tag in order:
        r = one_run(*sides[tag], engines, args.photo)
        r["side"] = tag
        rows.append(r)
        print(tag, f"e2e {r['end_to_end_s']:.3f} s, model {r['model_s']:.3f} s, non-model {r['non_model_s']:.3f} s "
              f"({100 * r['non_model_share']:.2f} %), load {r['load1']:.1f}",
              {k: round(v, 3) for k, v in r["stage_seconds"].items()}, {k: round(v, 3) for k, v in r["resize_seconds"].items()},
              flush=True)
    same = len({tuple(r["digest"]) for r in rows}) == 1
    with open(args.out, "w") as f:
        json.dump({"runs": rows, "same_bytes": same}, f, indent=1)
    print("every run gave the same image and JPEG bytes:", same)
    for tag in ("old", "new"):
        rs = [r for r in rows if r["side"] == tag]
        med = {k: float(np.median([r["stage_seconds"].get(k, 0.0) for r in rs])) for k in STAGES}
        sub = {k: float(np.median([r["resize_seconds"].get(k, 0.0) for r in rs])) for k in RESIZES}
        print(tag, "medians:", {k: round(v, 3) for k, v in med.items()}, {k: round(v, 3) for k, v in sub.items()},
              f"non-model {np.median([r['non_model_s'] for r in rs]):.3f} s, model {np.median([r['model_s'] for r in rs]):.2f} s,"
              f" share {100 * np.median([r['non_model_share'] for r in rs]):.2f} %")


if __name__ == "__main__":
    main()
