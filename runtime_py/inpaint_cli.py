"""``gmcnn-mobile inpaint`` and ``gmcnn-mobile demo``: the reference pipeline from the command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Tuple

from .cli import HelpFormatter, int_at_least, shape, threshold
from .errors import UserError

DEMO_DIR = Path(__file__).resolve().parent / "demo"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    from .engines import ENGINE_KINDS
    from .imageio import DEFAULT_MASK_THRESHOLD
    from .pipeline import MODES, TRISTATE

    p.add_argument("--mode", choices=MODES, default="two-step" if p.prog.endswith("demo") else "baseline",
                   help="pipeline mode (docs/PIPELINE.md)")
    p.add_argument("--engine", choices=ENGINE_KINDS, default="torch", help="inference engine")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--artifacts", type=Path, default=None,
                     help="export directory with manifest.json, or one .onnx/.tflite file (non-torch engines)")
    src.add_argument("--checkpoint", type=Path, default=None,
                     help="checkpoint for the torch engine (default: the shipped model, or $GMCNN_CHECKPOINT)")
    p.add_argument("--tiles", choices=TRISTATE, default="auto",
                   help="run the 2x pass as model-shape tiles (auto: when no 2x model is available)")
    p.add_argument("--crop", choices=TRISTATE, default="auto",
                   help="context crop around the mask (auto: when the window is smaller than the image)")
    p.add_argument("--trace", type=Path, default=None, metavar="DIR",
                   help="write every stage as PNG + .npy with index.json here")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="inference threads (unset: torch's and onnxruntime's own default, every core for tflite)")
    p.add_argument("--mask-threshold", type=threshold, default=DEFAULT_MASK_THRESHOLD,
                   help="mask pixels with 8-bit intensity >= T are holes")
    p.add_argument("--dilate", type=int, default=0, metavar="PX", help="grow the mask by PX pixels (ellipse)")
    p.add_argument("--model-shape", type=shape, default=None, metavar="ROWSxCOLS",
                   help="pass-1 model shape (default: 512x680 for torch, the smallest exported shape otherwise)")
    p.add_argument("--precision", default="auto", help="artifact precision to use (auto: fp32, else fp16, ...)")
    p.add_argument("--io", choices=["tensor", "image"], default="tensor", help="artifact I/O signature to use")
    p.add_argument("--no-xnnpack", action="store_true", help="tflite: run the builtin kernels without XNNPACK")
    p.add_argument("--transient-indirection", action="store_true",
                   help="tflite: XNNPACK builds its indirection buffers per run instead of keeping them (LiteRT's C "
                        "API): the same output in less memory (the default model at 1024x1360: 2.45 GiB less); "
                        "off by default, like the app's LiteRT")
    add_skip_check_flag(p)
    p.add_argument("--summary-json", type=Path, default=None, help="also write the run summary as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def add_skip_check_flag(p: argparse.ArgumentParser) -> None:
    """The one switch that lets a command run artifact files that differ from their manifest entry."""
    from .manifest import SKIP_CHECK_FLAG

    p.add_argument(SKIP_CHECK_FLAG, dest="allow_modified_artifacts", action="store_true",
                   help="run artifact files even if their sha256 or size differs from the manifest (for artifacts "
                        "edited on purpose); by default such a file is refused")


def register(sub) -> None:
    p = sub.add_parser("inpaint", help="fill the masked pixels of a photo (reference pipeline)",
                       formatter_class=HelpFormatter,
                       description="Fill the holes of IMAGE given by MASK (any image; bright = hole) and write OUT. "
                                   "Pixels outside the mask are copied unchanged.")
    p.add_argument("image", type=Path, help="photo (JPEG/PNG/WebP/TIFF/BMP; the EXIF orientation of JPEG, PNG, WebP "
                                            "and TIFF is applied; grey, RGBA, 16-bit ok)")
    p.add_argument("mask", type=Path, help="mask image of the same size; intensity >= --mask-threshold = hole")
    p.add_argument("-o", "--output", type=Path, required=True, help="result file (never one of the inputs)")
    _add_pipeline_args(p)
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser("demo", help="inpaint the shipped demo photo with the default model (make demo)",
                       formatter_class=HelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path("out"), help="where demo_result.jpg and the side-by-side go")
    _add_pipeline_args(p)
    p.set_defaults(func=cmd_demo)


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _progress(quiet: bool):
    if quiet:
        return None

    def show(i, run):
        print(f"  model run {i}: {run.label} at {run.shape[0]}x{run.shape[1]} ... {run.seconds * 1000:.0f} ms",
              file=sys.stderr, flush=True)

    return show


def run_inpaint(image_path: Path, mask_path: Path, out_path: Path, args) -> dict:
    """Everything ``inpaint`` does; returns the summary dict. Raises UserError on bad input."""
    from .engines import open_engines
    from .imageio import (check_output_dir, check_output_file, check_output_path, compose_output, read_image,
                          read_mask, write_image)
    from .pipeline import Pipeline, PipelineConfig
    from .trace import Trace

    t0 = time.perf_counter()
    # every output is checked before any work, so a bad one never leaves the others half written
    ext = check_output_path(out_path)
    check_output_file(out_path, "output")
    for src in (image_path, mask_path):
        if _same_file(out_path, src):
            raise UserError(f"{out_path}: the output would overwrite the input {src}; choose another path")
    if args.summary_json is not None:
        check_output_file(args.summary_json, "--summary-json file")
        for other in (image_path, mask_path, out_path):
            if _same_file(args.summary_json, other):
                raise UserError(f"{args.summary_json}: --summary-json would overwrite {other}; choose another path")
    if args.trace is not None:
        if _same_file(args.trace, out_path):
            raise UserError("--trace must be a directory other than the output file")
        check_output_dir(args.trace, "--trace folder")
    config = PipelineConfig(mode=args.mode, tiles=args.tiles, crop=args.crop)  # checked here, before any work

    src = read_image(image_path)
    hole = read_mask(mask_path, threshold=args.mask_threshold, dilate_px=args.dilate)
    t_read = time.perf_counter() - t0

    engines = open_engines(args.engine, artifacts=args.artifacts, checkpoint=args.checkpoint, threads=args.threads,
                           model_shape=args.model_shape, precision=args.precision, io=args.io,
                           xnnpack=not args.no_xnnpack, verify=not args.allow_modified_artifacts,
                           transient_indirection=args.transient_indirection)
    t1 = time.perf_counter()
    try:
        base = engines.get(engines.base_shape)  # open now: a missing backend fails before any work
        t_open = time.perf_counter() - t1
        if not args.quiet:
            print(f"{image_path}: {src.describe()}, {int(hole.sum())} hole px; engine {base.describe()}",
                  file=sys.stderr, flush=True)
        trace = Trace(str(args.trace) if args.trace else None)
        result = Pipeline(engines, config, trace=trace, progress=_progress(args.quiet)).run(src.rgb8(), hole)
    finally:
        engines.close()
    for w in result.stats.warnings:
        print(f"gmcnn-mobile: warning: {w}", file=sys.stderr)

    t2 = time.perf_counter()
    write_image(out_path, compose_output(src, result.image, hole))
    t_write = time.perf_counter() - t2

    stats = result.stats
    stages = {"read": t_read, "open engine": t_open, **stats.stage_seconds, "write": t_write}
    stages.pop("total", None)
    stages["total"] = time.perf_counter() - t0
    summary = {
        "image": str(image_path), "mask": str(mask_path), "output": str(out_path), "format": ext,
        "size": [src.width, src.height], "input": src.describe(), "hole_pixels": int(hole.sum()),
        "engine": engines.describe(), "model_shape": list(engines.base_shape), "mode": args.mode,
        "model_runs": len(stats.runs), "tiles_run": stats.tiles_run, "tiles_skipped": stats.tiles_skipped,
        "rotated": stats.rotated, "crop_window": stats.window, "passes": stats.passes,
        "runs": [{"label": r.label, "shape": list(r.shape), "seconds": round(r.seconds, 4)} for r in stats.runs],
        "stage_seconds": {k: round(v, 4) for k, v in stages.items()}, "warnings": stats.warnings,
    }
    if args.summary_json:
        from .imageio import write_bytes_atomic

        write_bytes_atomic(args.summary_json, json.dumps(summary, indent=2).encode())
    return summary


def _describe_pass(p: dict) -> str:
    if "skipped" in p:
        return f"pass {p['pass']} skipped: {p['skipped']}"
    where = f"pass {p['pass']} at {p['shape'][0]}x{p['shape'][1]}"
    if p.get("tiled"):
        return f"{where}: {p['runs']} of {p['tiles']} tiles"
    return f"{where}: {p['runs']} run{'s' if p['runs'] != 1 else ''}"


def print_summary(s: dict) -> None:
    win = "off" if s["crop_window"] is None else "rows {0}:{2} cols {1}:{3}".format(*s["crop_window"])
    print(f"wrote {s['output']}  ({s['input']})")
    print(f"  engine       {s['engine']}, pass-1 shape {s['model_shape'][0]}x{s['model_shape'][1]}")
    print(f"  mode         {s['mode']}; rotated {'yes' if s['rotated'] else 'no'}; crop {win}")
    print(f"  model runs   {s['model_runs']}  ({'; '.join(_describe_pass(p) for p in s['passes']) or 'no pass ran'})")
    print(f"  tiles        {s['tiles_run']} run, {s['tiles_skipped']} skipped")
    times = "  ".join(f"{k} {v:.2f}s" for k, v in s["stage_seconds"].items())
    print(f"  time         {times}")


def cmd_inpaint(args) -> int:
    summary = run_inpaint(args.image, args.mask, args.output, args)
    print_summary(summary)
    return 0


# ---------------------------------------------------------------------------- demo

def demo_files() -> Tuple[Path, Path]:
    """(photo, mask) shipped in runtime_py/demo/: the mask is the image file with 'mask' in its name."""
    if not DEMO_DIR.is_dir():
        raise UserError(f"the demo photo is not shipped yet: {DEMO_DIR} does not exist")
    files = sorted(p for p in DEMO_DIR.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    masks = [p for p in files if "mask" in p.stem.lower()]
    photos = [p for p in files if "mask" not in p.stem.lower() and "result" not in p.stem.lower()]
    if len(masks) != 1 or len(photos) != 1:
        raise UserError(f"{DEMO_DIR} should hold one photo and one '*mask*' image; found "
                        f"{[p.name for p in files] or 'nothing'}")
    return photos[0], masks[0]


def side_by_side(before, hole, after, height: int = 480):
    """(h, 3w, 3) uint8 RGB: before | mask shown in red over the photo | after, each scaled to ``height`` rows."""
    import numpy as np

    from .geometry import resize_image, resize_mask

    h, w = before.shape[:2]
    size = (height, max(1, round(w * height / h)))
    b, a, m = resize_image(before, size), resize_image(after, size), resize_mask(hole, size)
    overlay = b.copy()
    overlay[m] = (0.4 * overlay[m] + 0.6 * np.array([255, 0, 0])).astype(np.uint8)
    gap = np.full((height, 8, 3), 255, np.uint8)
    return np.concatenate([b, gap, overlay, gap, a], axis=1)


def cmd_demo(args) -> int:
    import cv2

    from .imageio import read_image, read_mask, write_rgb

    from .imageio import output_dir

    photo, mask = demo_files()
    out = args.out_dir / "demo_result.jpg"
    with output_dir(args.out_dir, "--out-dir folder"):  # a refused run leaves no new empty folder
        summary = run_inpaint(photo, mask, out, args)
    print_summary(summary)
    before = read_image(photo).rgb8()
    hole = read_mask(mask, threshold=args.mask_threshold, dilate_px=args.dilate)
    after = cv2.cvtColor(cv2.imread(str(out), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    sbs = args.out_dir / "demo_side_by_side.jpg"
    write_rgb(sbs, side_by_side(before, hole, after))
    print(f"demo: result {out.resolve()}")
    print(f"demo: before | mask | after  {sbs.resolve()}")
    return 0
