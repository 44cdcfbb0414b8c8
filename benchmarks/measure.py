"""Measure exported TFLite files against this machine's own convolution speed.

    python -m benchmarks.measure DIR [DIR ...] [--threads 2] [--runs 5] [--extra FILE.tflite:GMAC ...] [--json OUT]

For every ``tensor`` artifact in each export folder (and any ``--extra`` file) one process
per measurement (``benchmarks.worker`` through ``benchmarks.spawn``, as ``bench`` runs it: load, first
inference, warm-up, timed runs, peak RSS), in the same run:

* latency (median of the timed runs) and peak RSS, so int8 and fp32 compare under the
  same conditions;
* whole-model GMAC/s = the checkpoint's convolution MACs at that shape / median latency;
* a microbenchmark: one 7x7 128->128 convolution at quarter resolution of the first
  artifact's shape (the size of GMCNN's widest layers), fp32 and int8 TFLite files made
  here with the TFLite converter, measured the same way -- the speed a convolution-bound
  model can reach here;
* ops left outside XNNPACK for each file.

Prints a Markdown table; ``--json`` writes the raw results too. docs/EXPORT.md quotes it.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

MICRO_KERNEL = 7
MICRO_CHANNELS = 128


def build_conv_microbench(out_dir: Path, rows: int, cols: int, channels: int = MICRO_CHANNELS,
                          kernel: int = MICRO_KERNEL) -> Dict[str, Tuple[Path, float]]:
    """fp32 and int8 single-conv TFLite files (benchmarks.roofline): {precision: (path, GMAC per inference)}."""
    from .roofline import ConvShape, build_conv_files

    shape = ConvShape(kernel, channels, channels, rows, cols)
    return {p: (path, shape.gmac) for p, path in build_conv_files(shape, out_dir).items()}


def measure_file(path: Path, threads: int, runs: int, warmup: int = 1) -> dict:
    """One benchmarks.worker process on one file."""
    from .spawn import run_in_subprocess

    return run_in_subprocess({"kind": "tflite", "label": path.name, "path": str(path), "threads": threads,
                              "warmup": warmup, "runs": runs})


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.measure", description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="*", type=Path, help="export folders (manifest.json)")
    ap.add_argument("--extra", nargs="*", default=[], help="more .tflite files, each as FILE:GMAC")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from runtime_py.manifest import load_manifest

    items = []  # (label, path, gmac)
    shape = None
    for d in args.dirs:
        m = load_manifest(d)
        for a in m.artifacts:
            if a.format == "tflite" and a.io == "tensor" and a.precision in args.precisions.split(","):
                items.append((f"{m.checkpoint['meta']['variant']} {a.file}", d / a.file, float(a.build["gmacs"])))
                shape = shape or tuple(a.shape)
    for spec in args.extra:
        f, gmac = spec.rsplit(":", 1)
        items.append((f"extra {Path(f).name}", Path(f), float(gmac)))
    rows, cols = shape or (512, 680)
    with tempfile.TemporaryDirectory() as tmp:
        micro = build_conv_microbench(Path(tmp), rows // 4, cols // 4)
        for precision, (path, gmac) in micro.items():
            items.insert(0, (f"microbench {path.name}", path, gmac))
        results = []
        for label, path, gmac in items:
            r = measure_file(path, args.threads, args.runs)
            med = r.get("stats", {}).get("median_s") if r.get("ok") else None
            best = r.get("stats", {}).get("min_s") if r.get("ok") else None
            row = {"label": label, "file": str(path), "gmac": gmac, "ok": r.get("ok"), "median_s": med, "min_s": best,
                   "gmac_per_s": (gmac / med) if med else None, "best_gmac_per_s": (gmac / best) if best else None, "peak_rss_mb": r.get("peak_rss", 0) / 2 ** 20,
                   "added_over_idle_mb": r.get("peak_added_over_idle", 0) / 2 ** 20,
                   "delegation": r.get("delegation"), "load_avg": [r.get("load_avg_before"), r.get("load_avg_after")],
                   "error": r.get("error")}
            results.append(row)
            print(f"measured {label}: {med if med else r.get('error')}", file=sys.stderr, flush=True)
    print("| file | GMAC | median s | min s | GMAC/s (median) | GMAC/s (best) | peak RSS MiB | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if not r["median_s"]:
            print(f"| {r['label']} | {r['gmac']:.1f} | failed: {r['error']} | | | | | |")
            continue
        load = "/".join(f"{v:.1f}" for v in r["load_avg"] if v is not None)
        print(f"| {r['label']} | {r['gmac']:.1f} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['gmac_per_s']:.1f} | "
              f"{r['best_gmac_per_s']:.1f} | {r['peak_rss_mb']:.0f} | {load} |")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "runs": args.runs, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
