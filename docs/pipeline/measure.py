"""Runs ``gmcnn-mobile inpaint`` on one photo in every mode, one subprocess per run, and
records model runs, tiles, time per stage and the peak resident memory of each process.

    python docs/pipeline/measure.py IMAGE MASK CHECKPOINT OUT_DIR [--threads N] [--crop auto|off]

Writes OUT_DIR/measurements.json and prints a Markdown table (docs/PIPELINE.md, "Measurements").
Peak memory is ``ru_maxrss`` of the child from ``os.wait4``: the whole process (Python, torch,
the decoded photo), so differences between rows are what the modes add.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RUNS = [
    ("baseline", "auto"),
    ("shrink", "auto"),
    ("two-step", "off"),  # pass 2 as one 1024x1360 run
    ("two-step", "on"),  # pass 2 as 512x680 tiles
    ("two-step+shrink", "off"),
    ("two-step+shrink", "on"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("image")
    ap.add_argument("mask")
    ap.add_argument("checkpoint")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--crop", default="off")
    ap.add_argument("--only", default=None, help="comma-separated mode_tiles tags to run, e.g. two-step_on")
    a = ap.parse_args()
    a.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode, tiles in RUNS:
        if a.only and f"{mode}_{tiles}" not in a.only.split(","):
            continue
        tag = f"{mode}_{'tiled' if tiles == 'on' else 'whole'}"
        summary = a.out_dir / f"{tag}.json"
        cmd = [sys.executable, "-m", "gmcnn_mobile", "inpaint", a.image, a.mask, "-o", str(a.out_dir / f"{tag}.jpg"),
               "--checkpoint", a.checkpoint, "--mode", mode, "--tiles", tiles, "--crop", a.crop,
               "--threads", str(a.threads), "--summary-json", str(summary), "--quiet"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if status != 0:
            raise SystemExit(f"{tag}: exit status {status}")
        s = json.loads(summary.read_text())
        row = {"mode": mode, "tiles": tiles, "model_runs": s["model_runs"], "tiles_run": s["tiles_run"],
               "tiles_skipped": s["tiles_skipped"], "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
               "wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "stage_seconds": s["stage_seconds"], "runs": s["runs"],
               "crop_window": s["crop_window"], "load_avg_1min": os.getloadavg()[0]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (a.out_dir / "measurements.json").write_text(json.dumps(rows, indent=2))
    print("\n| mode | pass 2 | model runs | tiles run/skipped | model s | resize s | total s | process CPU s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        st = r["stage_seconds"]
        p2 = "-" if not r["mode"].startswith("two-step") else ("tiles" if r["tiles"] == "on" else "whole")
        print(f"| {r['mode']} | {p2} | {r['model_runs']} | {r['tiles_run']}/{r['tiles_skipped']} | "
              f"{st.get('model', 0):.1f} | {st.get('resize', 0):.2f} | {st['total']:.1f} | {r['cpu_s']:.0f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
