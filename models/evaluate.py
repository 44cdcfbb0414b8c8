"""Does a checkpoint beat OpenCV's Telea? Hole quality through the runtime's own pipeline, per mask kind.

For each photo (found by its flat name, :mod:`models.dataset`) the photo is decoded as the runtime
decodes it (EXIF orientation applied), centre-cropped to the aspect of the evaluation size (H, W) and
resized to it (INTER_AREA when shrinking). Each mask kind x size class of ``runtime_py.masks.make_mask``
(the kinds and size classes the benchmark's quality table uses), with a seed recorded per case, is
filled by

* ``model``: the runtime's :class:`runtime_py.pipeline.Pipeline` in ``mode`` (default ``baseline``)
  over the torch engine at model shape (H, W): exactly what ``gmcnn-mobile inpaint`` does;
* ``telea``: ``cv2.inpaint(..., 5, cv2.INPAINT_TELEA)``;

and scored with ``runtime_py.metrics`` over the hole (PSNR, SSIM) against the original pixels.
Images are (H, W, 3) uint8 RGB throughout; masks (H, W) uint8, 1 = hole.

The verdict follows issue 14's bar: the model wins when its mean hole PSNR *and* SSIM over all cases
beat Telea's, and at least two of the three mask kinds beat Telea on both on their own.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from runtime_py.contract import mask_pixels
from runtime_py.errors import UserError
from runtime_py.masks import KINDS, SIZE_CLASSES

TELEA_RADIUS = 5
SEED_BASE = 14000
METHODS = ("model", "telea")
QUALITIES = ("hole_psnr", "hole_ssim")


@dataclass(frozen=True)
class Case:
    photo: str
    kind: str
    size_class: str
    seed: int


def fit_photo(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop ``rgb`` to the aspect of (height, width) and resize to it; (height, width, 3) uint8."""
    import cv2

    h, w = rgb.shape[:2]
    target = width / height
    if w / h > target:
        cw = int(round(h * target))
        x0 = (w - cw) // 2
        rgb = rgb[:, x0:x0 + cw]
    else:
        ch = int(round(w / target))
        y0 = (h - ch) // 2
        rgb = rgb[y0:y0 + ch]
    interp = cv2.INTER_AREA if rgb.shape[0] > height else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(rgb, (width, height), interpolation=interp))


def read_rgb(path: Path) -> np.ndarray:
    """(H,W,3) uint8 RGB as the runtime decodes it (EXIF orientation applied)."""
    from runtime_py.imageio import read_image

    return read_image(Path(path)).rgb8()


def model_fill(gen, rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The generator's output composited into the hole, without the pipeline; rgb (H,W,3) uint8,
    mask (H,W) nonzero = hole, H and W usable by the generator (:func:`models.gmcnn.check_shape`)."""
    import torch

    from .train_data import composite, masks_tensor, to_tensor, to_uint8

    with torch.no_grad():
        out = to_uint8(gen(to_tensor([rgb]), masks_tensor([mask])))[0]
    return composite(out, rgb, mask)


def telea(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import cv2

    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    out = cv2.inpaint(bgr, mask_pixels(mask > 0), TELEA_RADIUS, cv2.INPAINT_TELEA)
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)


def make_cases(photos: Sequence[str], kinds: Sequence[str], size_classes: Sequence[str]) -> List[Case]:
    """Every photo x kind x size class. A case's seed depends on its photo's name and its cell only
    (SEED_BASE + 10 * (crc32(name) mod 100,000) + cell index over all kinds and classes), so any subset of
    photos, kinds or classes scores exactly the cases a full run scores."""
    import zlib

    cases = []
    for photo in photos:
        base = SEED_BASE + 10 * (zlib.crc32(photo.encode()) % 100_000)
        for kind in kinds:
            for sc in size_classes:
                cell = KINDS.index(kind) * len(SIZE_CLASSES) + list(SIZE_CLASSES).index(sc)
                cases.append(Case(photo, kind, sc, base + cell))
    return cases


def resolve_photos(data: Path, names: Sequence[str]) -> Dict[str, Path]:
    from .dataset import find_sources

    sources = find_sources(Path(data))
    missing = [n for n in names if n not in sources]
    if missing:
        raise UserError(f"not found in {data}: {', '.join(missing)}")
    return {n: sources[n] for n in names}


def evaluate(checkpoint: Optional[Path], data: Path, names: Sequence[str], size: Tuple[int, int],
             kinds: Sequence[str] = KINDS, size_classes: Sequence[str] = tuple(SIZE_CLASSES), mode: str = "baseline",
             threads: int = 2, progress: bool = True) -> Dict[str, object]:
    """Score the pipeline and Telea on every case; returns {"cases": [...], "summary": {...}, "verdict": {...}}."""
    from tqdm import tqdm

    from runtime_py.engines import open_engines
    from runtime_py.masks import make_mask
    from runtime_py.metrics import psnr, ssim
    from runtime_py.pipeline import Pipeline, PipelineConfig

    from .gmcnn import check_shape

    bad = sorted(set(kinds) - set(KINDS)) + sorted(set(size_classes) - set(SIZE_CLASSES))
    if bad:
        raise UserError(f"unknown mask kind or size class: {', '.join(bad)}")
    paths = resolve_photos(data, names)
    h, w = size
    engines = open_engines("torch", checkpoint=checkpoint, threads=threads, model_shape=(h, w))
    try:
        engine = engines.get((h, w))
        try:
            check_shape(engine.generator.meta.variant, h, w)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        pipeline = Pipeline(engines, PipelineConfig(mode=mode))
        images = {n: fit_photo(read_rgb(p), h, w) for n, p in paths.items()}
        rows = []
        for case in tqdm(make_cases(list(names), kinds, size_classes), desc="evaluate", disable=not progress):
            img = images[case.photo]
            mask = make_mask(case.kind, h, w, seed=case.seed, size=case.size_class)
            hole = mask > 0
            row = {"photo": case.photo, "kind": case.kind, "size_class": case.size_class, "seed": case.seed,
                   "hole_fraction": round(float(hole.mean()), 4)}
            for method, result in (("model", pipeline.run(img, hole).image), ("telea", telea(img, mask))):
                row[f"{method}_hole_psnr"] = float(psnr(img, result, hole))
                row[f"{method}_hole_ssim"] = float(ssim(img, result, hole))
            rows.append(row)
    finally:
        engines.close()
    summary = summarize(rows)
    return {"checkpoint": str(checkpoint) if checkpoint else "default", "size": f"{h}x{w}", "mode": mode,
            "photos": list(names), "cases": rows, "summary": summary, "verdict": verdict(summary)}


def summarize(rows: List[dict]) -> Dict[str, Dict[str, float]]:
    """Mean hole PSNR/SSIM of each method per mask kind (in KINDS order) and over all rows ("all")."""
    groups: Dict[str, List[dict]] = {k: [r for r in rows if r["kind"] == k] for k in KINDS}
    groups = {k: v for k, v in groups.items() if v}
    groups["all"] = rows
    out = {}
    for key, rs in groups.items():
        out[key] = {f"{m}_{q}": float(np.mean([r[f"{m}_{q}"] for r in rs])) for m in METHODS for q in QUALITIES}
        out[key]["cases"] = len(rs)
        out[key]["model_wins_psnr"] = int(sum(r["model_hole_psnr"] > r["telea_hole_psnr"] for r in rs))
    return out


def verdict(summary: Dict[str, Dict[str, float]]) -> Dict[str, object]:
    """Issue 14's bar: mean hole PSNR and SSIM above Telea's, and on at least two kinds (all, if fewer
    than three were scored) both on their own."""
    def beats(s) -> bool:
        return bool(s["model_hole_psnr"] > s["telea_hole_psnr"] and s["model_hole_ssim"] > s["telea_hole_ssim"])

    kinds = [k for k in summary if k != "all"]
    won = [k for k in kinds if beats(summary[k])]
    needed = min(2, len(kinds))
    overall = summary["all"]
    return {"psnr": bool(overall["model_hole_psnr"] > overall["telea_hole_psnr"]),
            "ssim": bool(overall["model_hole_ssim"] > overall["telea_hole_ssim"]),
            "kinds_won": won, "kinds_needed": needed,
            "model_wins": beats(overall) and len(won) >= needed}


def markdown_table(summary: Dict[str, Dict[str, float]]) -> str:
    lines = ["| masks | cases | model hole-PSNR (dB) | Telea hole-PSNR (dB) | model hole-SSIM | Telea hole-SSIM "
             "| cases model > Telea (PSNR) |",
             "|---|---|---|---|---|---|---|"]
    for key, s in summary.items():
        lines.append(f"| {key} | {s['cases']} | {s['model_hole_psnr']:.2f} | {s['telea_hole_psnr']:.2f} | "
                     f"{s['model_hole_ssim']:.3f} | {s['telea_hole_ssim']:.3f} | {s['model_wins_psnr']} |")
    return "\n".join(lines)


def verdict_line(v: Dict[str, object]) -> str:
    kinds = ", ".join(v["kinds_won"]) or "none"
    return (f"model beats Telea: {'YES' if v['model_wins'] else 'NO'} (mean hole PSNR {'above' if v['psnr'] else 'below'}, "
            f"SSIM {'above' if v['ssim'] else 'below'}; kinds won on both: {kinds}, {v['kinds_needed']} needed)")


def cmd_evaluate(args) -> int:
    from .dataset import HELD_OUT, VALIDATION

    from runtime_py.imageio import check_output_file, make_output_dir, write_bytes_atomic

    if args.out:
        check_output_file(args.out, "--out file", parents=True)  # before the minutes of scoring, not after
    names = args.names if args.names is not None else list(HELD_OUT) + list(VALIDATION)
    result = evaluate(args.checkpoint, args.data, names, args.size, args.kinds, args.size_classes,
                      mode=args.mode, threads=args.threads)
    if args.out:
        make_output_dir(Path(args.out).parent, "folder of the --out file")
        write_bytes_atomic(Path(args.out), json.dumps(result, indent=2).encode())
    print(f"{result['checkpoint']}, {result['mode']} pipeline at {result['size']}, {len(result['photos'])} photos, "
          f"{len(result['cases'])} cases")
    print(markdown_table(result["summary"]))
    print(verdict_line(result["verdict"]))
    return 0
