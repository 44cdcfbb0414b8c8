"""Hole-quality evaluation of a checkpoint against OpenCV's Telea inpainting on the same photos and masks.

For each photo and each size (H, W) the photo is centre-cropped to the aspect
ratio and resized (INTER_AREA); each seeded mask (``runtime_py.masks.make_mask``,
kind x size class, seed = index) is filled by

* ``model``: the generator's output composited into the hole (known pixels kept);
* ``telea``: ``cv2.inpaint(..., 5, cv2.INPAINT_TELEA)``;

and scored with ``runtime_py.metrics`` over the hole (PSNR, SSIM) against the
original pixels. Images are (H, W, 3) uint8 RGB throughout; masks (H, W) uint8, 1 = hole.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from runtime_py.errors import UserError

TELEA_RADIUS = 5


@dataclass(frozen=True)
class Case:
    photo: str
    size: Tuple[int, int]
    kind: str
    size_class: str
    seed: int


def fit_photo(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop ``rgb`` to the aspect of (height, width) and resize to it; (height, width, 3) uint8."""
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
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f"{path}: not a readable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def telea(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    out = cv2.inpaint(bgr, (mask > 0).astype(np.uint8) * 255, TELEA_RADIUS, cv2.INPAINT_TELEA)
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)


def model_fill(gen, rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Generator output composited into the hole; rgb (H,W,3) uint8, mask (H,W) 1 = hole."""
    import torch

    from .train import composite, to_tensor, to_uint8

    with torch.no_grad():
        x = to_tensor([rgb])
        m = torch.from_numpy((mask > 0).astype(np.float32))[None, None]
        out = to_uint8(gen(x, m))[0]
    return composite(out, rgb, mask)


def make_cases(photos: Sequence[str], sizes: Sequence[Tuple[int, int]], kinds: Sequence[str],
               size_classes: Sequence[str]) -> List[Case]:
    cases = []
    for photo in photos:
        for size in sizes:
            seed = 0
            for kind in kinds:
                for sc in size_classes:
                    cases.append(Case(photo, tuple(size), kind, sc, seed))
                    seed += 1
    return cases


def evaluate(checkpoint: Optional[Path], photo_dir: Path, photos: Sequence[str], sizes: Sequence[Tuple[int, int]],
             kinds: Sequence[str], size_classes: Sequence[str], threads: int = 2,
             progress: bool = True) -> Dict[str, object]:
    """Score the model and Telea on every case; returns {"cases": [...], "summary": {...}}."""
    import torch
    from tqdm import tqdm

    from runtime_py.masks import make_mask
    from runtime_py.metrics import psnr, ssim

    from . import load_generator
    from .gmcnn import check_shape

    torch.set_num_threads(threads)
    gen = load_generator(checkpoint)
    for h, w in sizes:
        try:
            check_shape(gen.meta.variant, h, w)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    originals = {}
    for name in photos:
        p = photo_dir / name
        if not p.is_file():
            raise UserError(f"{p}: no such photo")
        originals[name] = read_rgb(p)
    rows = []
    for case in tqdm(make_cases(photos, sizes, kinds, size_classes), desc="evaluate", disable=not progress):
        h, w = case.size
        img = fit_photo(originals[case.photo], h, w)
        mask = make_mask(case.kind, h, w, seed=case.seed, size=case.size_class)
        hole = mask > 0
        row = {"photo": case.photo, "size": f"{h}x{w}", "kind": case.kind, "size_class": case.size_class,
               "seed": case.seed, "hole_fraction": round(float(hole.mean()), 4)}
        for method, result in (("model", model_fill(gen, img, mask)), ("telea", telea(img, mask))):
            row[f"{method}_hole_psnr"] = psnr(img, result, hole)
            row[f"{method}_hole_ssim"] = ssim(img, result, hole)
        rows.append(row)
    return {"checkpoint": str(checkpoint) if checkpoint else "default", "photos": list(photos),
            "cases": rows, "summary": summarize(rows)}


def summarize(rows: List[dict]) -> Dict[str, Dict[str, float]]:
    """Mean hole PSNR/SSIM per size (and over all) for each method."""
    groups: Dict[str, List[dict]] = {}
    for r in rows:
        groups.setdefault(r["size"], []).append(r)
    groups["all"] = rows
    out = {}
    for key, rs in groups.items():
        out[key] = {f"{m}_{q}": float(np.mean([r[f"{m}_{q}"] for r in rs]))
                    for m in ("model", "telea") for q in ("hole_psnr", "hole_ssim")}
        out[key]["cases"] = len(rs)
    return out


def markdown_table(summary: Dict[str, Dict[str, float]]) -> str:
    lines = ["| size | cases | model hole-PSNR (dB) | Telea hole-PSNR (dB) | model hole-SSIM | Telea hole-SSIM |",
             "|---|---|---|---|---|---|"]
    for key, s in summary.items():
        lines.append(f"| {key} | {s['cases']} | {s['model_hole_psnr']:.2f} | {s['telea_hole_psnr']:.2f} | "
                     f"{s['model_hole_ssim']:.3f} | {s['telea_hole_ssim']:.3f} |")
    return "\n".join(lines)


def parse_size(text: str) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"size {text!r}: expected HxW, e.g. 512x680") from None
    return h, w


def cmd_evaluate(args) -> int:
    from runtime_py.imageio import check_output_file, make_output_dir, write_bytes_atomic

    if args.out:
        check_output_file(args.out, "--out file", parents=True)  # before the minutes of scoring, not after
    result = evaluate(args.checkpoint, args.photos, args.names, [parse_size(s) for s in args.sizes], args.kinds,
                      args.size_classes, threads=args.threads)
    table = markdown_table(result["summary"])
    if args.out:
        make_output_dir(Path(args.out).parent, "folder of the --out file")
        write_bytes_atomic(args.out, json.dumps(result, indent=2).encode())
    print(table)
    return 0
