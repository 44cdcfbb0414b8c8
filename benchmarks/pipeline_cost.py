"""End-to-end cost of the reference pipeline on real photos, one configuration per process.

Each configuration (photo x mode x high-res pass tiled or not) runs in a fresh
worker process, so its peak RSS is its own. Stages: ``decode`` (file -> pixels,
EXIF applied, the RGB working copy), ``open`` (engine creation, reported apart from the end-to-end
latency), then the pipeline's own stage clock (``resize``, ``morphology`` = the
erosions, ``model``, ``composite`` = stitching, ``orientation``), then ``encode``
(JPEG, quality 95, in memory). The non-model share is end-to-end minus model time.
"""
from __future__ import annotations

import time
from typing import Dict, List

from runtime_py.memory import peak_rss_bytes, rss_bytes

#: The mask every pipeline-cost run uses: an object-like blob of medium size, recorded seed.
PIPELINE_MASK = {"kind": "blob", "size": "medium", "seed": 20261125}

#: (mode, tiles) configurations: every mode with the runtime's default tiling, plus the
#: two-step high-res pass forced whole (off) and forced tiled (on).
CONFIGS = [
    ("baseline", "auto"),
    ("shrink", "auto"),
    ("two-step", "off"),
    ("two-step", "on"),
    ("two-step+shrink", "off"),
]


def plan_pipeline(photos, artifacts_dir, threads: int, precision: str = "fp32", configs=CONFIGS) -> List[dict]:
    """Worker specs for every photo x configuration."""
    specs = []
    for photo in photos:
        for mode, tiles in configs:
            specs.append({
                "kind": "pipeline", "label": f"pipeline {photo.path.stem} {mode} tiles={tiles}",
                "photo": str(photo.path), "photo_mp": round(photo.megapixels, 2),
                "upscaled_from": photo.upscaled_from, "mode": mode, "tiles": tiles,
                "artifacts": str(artifacts_dir), "precision": precision, "threads": threads,
                "mask": dict(PIPELINE_MASK),
            })
    return specs


def engines_needed(engines, mode: str, tiles: str) -> List[tuple]:
    """Shapes the run will use: pass 1 always; two-step's whole-image pass 2 at twice the rows and
    columns unless it is forced into tiles (engines not needed stay closed and cost no memory)."""
    h, w = engines.base_shape
    shapes = [(h, w)]
    if mode.startswith("two-step") and tiles != "on" and engines.has((2 * h, 2 * w)):
        shapes.append((2 * h, 2 * w))
    return shapes


def measure_pipeline(spec: dict) -> dict:
    """Worker side: decode, run the pipeline once, encode; stage times and memory."""
    import numpy as np

    from runtime_py.engines import open_engines
    from runtime_py.imageio import compose_output, encode, read_image
    from runtime_py.masks import make_mask
    from runtime_py.pipeline import Pipeline, PipelineConfig

    rss_start = rss_bytes()
    stages: Dict[str, float] = {}
    t0 = time.perf_counter()
    src = read_image(spec["photo"])
    rgb = src.rgb8()  # the pipeline's working copy is part of decoding (it was left out of the clock before)
    stages["decode"] = time.perf_counter() - t0
    m = spec["mask"]
    hole = make_mask(m["kind"], rgb.shape[0], rgb.shape[1], seed=int(m["seed"]), size=m["size"]).astype(bool)

    t0 = time.perf_counter()
    engines = open_engines("tflite", artifacts=spec["artifacts"], threads=int(spec["threads"]),
                           precision=spec.get("precision", "fp32"))
    for shape in engines_needed(engines, spec["mode"], spec["tiles"]):
        engines.get(shape)  # open now so the timed run is not charged for it
    open_s = time.perf_counter() - t0
    rss_ready = rss_bytes()
    try:
        config = PipelineConfig(mode=spec["mode"], tiles=spec["tiles"])
        t0 = time.perf_counter()
        result = Pipeline(engines, config).run(rgb, hole)
        run_s = time.perf_counter() - t0
    finally:
        engines.close()
    stats = result.stats
    for name, seconds in stats.stage_seconds.items():
        if name != "total":
            stages[name] = float(seconds)
    stages["other"] = max(0.0, run_s - sum(v for k, v in stats.stage_seconds.items() if k != "total"))
    t0 = time.perf_counter()
    data = encode(compose_output(src, result.image, hole), ".jpg")
    stages["encode"] = time.perf_counter() - t0
    end_to_end = stages["decode"] + run_s + stages["encode"]
    model = float(stats.stage_seconds.get("model", 0.0))
    return {
        "rows": int(rgb.shape[0]), "cols": int(rgb.shape[1]), "hole_fraction": float(hole.mean()),
        "open_s": open_s, "end_to_end_s": end_to_end, "model_s": model,
        "non_model_s": end_to_end - model, "non_model_share": (end_to_end - model) / end_to_end,
        "stage_seconds": stages, "model_runs": len(stats.runs),
        "runs": [{"label": r.label, "shape": list(r.shape), "seconds": r.seconds} for r in stats.runs],
        "tiles_run": stats.tiles_run, "tiles_skipped": stats.tiles_skipped,
        "crop_window": stats.window, "encoded_bytes": len(data),
        "rss_start": rss_start, "rss_ready": rss_ready, "peak_rss": peak_rss_bytes(),
        "peak_added_over_ready": peak_rss_bytes() - rss_ready,
        "output_changed_pixels": int((result.image != rgb).any(axis=2).sum()),
        "engines": engines.describe() if hasattr(engines, "describe") else "",
        "warnings": list(stats.warnings), "unmasked_identical": bool(np.array_equal(result.image[~hole], rgb[~hole])),
    }
