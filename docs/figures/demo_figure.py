"""Before / mask / after figure of the bundled demo photo (docs/demo_before_after.jpg).

    python docs/figures/demo_figure.py [--checkpoint PATH] [--out docs/demo_before_after.jpg]

The photo (H, W, 3 RGB uint8) is downscaled so its long side is 680 px (sides
rounded to multiples of 4), the generator fills the downscaled hole, the fill is
upscaled (bicubic) and only hole pixels of the full-size photo are replaced.
OpenCV Telea on the same full-size photo and mask is shown beside it.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Tuple

import cv2
import numpy as np

DEMO_DIR = Path(__file__).resolve().parents[2] / "runtime_py" / "demo"
DEMO_PHOTO = DEMO_DIR / "kite.jpg"
DEMO_MASK = DEMO_DIR / "kite_mask.png"
WORK_LONG_SIDE = 680


def work_size(h: int, w: int, long_side: int = WORK_LONG_SIDE) -> Tuple[int, int]:
    s = long_side / max(h, w)
    return max(4, int(round(h * s / 4)) * 4), max(4, int(round(w * s / 4)) * 4)


def inpaint_downscaled(gen, rgb: np.ndarray, mask: np.ndarray, long_side: int = WORK_LONG_SIDE) -> np.ndarray:
    """Fill ``mask`` (H,W; nonzero = hole) in ``rgb`` (H,W,3 uint8) at reduced size; returns (H,W,3) uint8."""
    from models.evaluate import model_fill

    h, w = rgb.shape[:2]
    wh, ww = work_size(h, w, long_side)
    small = cv2.resize(rgb, (ww, wh), interpolation=cv2.INTER_AREA)
    small_mask = (cv2.resize((mask > 0).astype(np.uint8) * 255, (ww, wh), interpolation=cv2.INTER_AREA) > 0)
    filled = model_fill(gen, small, small_mask.astype(np.uint8))
    up = cv2.resize(filled, (w, h), interpolation=cv2.INTER_CUBIC)
    hole = (mask > 0)[..., None]
    return np.where(hole, up, rgb)


def _label(img: np.ndarray, text: str) -> np.ndarray:
    out = img.copy()
    cv2.rectangle(out, (0, 0), (8 + 11 * len(text), 26), (0, 0, 0), -1)
    cv2.putText(out, text, (5, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def figure(rgb: np.ndarray, mask: np.ndarray, model_out: np.ndarray, telea_out: np.ndarray,
           panel_w: int = 400) -> np.ndarray:
    """Two rows: whole photos (before, mask, model, Telea), then a zoom on the hole; (H, 4*panel_w, 3) RGB."""
    h, w = rgb.shape[:2]
    overlay = rgb.copy()
    hole = mask > 0
    overlay[hole] = (0.45 * overlay[hole] + 0.55 * np.array([255, 0, 0])).astype(np.uint8)
    panels = [("before", rgb), ("mask (hand-drawn)", overlay), ("after: default model", model_out),
              ("after: OpenCV Telea", telea_out)]
    ph = int(round(h * panel_w / w))
    top = [_label(cv2.resize(p, (panel_w, ph), interpolation=cv2.INTER_AREA), t) for t, p in panels]
    ys, xs = np.nonzero(hole)
    cy, cx = int(ys.mean()), int(xs.mean())
    zh, zw = ph, panel_w
    # the smallest crop of the panel's aspect that holds the hole with a margin
    need_h = max(int(np.ptp(ys)) + 60, int((np.ptp(xs) + 60) * zh / zw))
    ch = min(h, need_h)
    cw = min(w, int(round(ch * zw / zh)))
    y0 = int(np.clip(cy - ch // 2, 0, h - ch))
    x0 = int(np.clip(cx - cw // 2, 0, w - cw))
    bottom = [_label(cv2.resize(p[y0:y0 + ch, x0:x0 + cw], (zw, zh), interpolation=cv2.INTER_CUBIC), t + " (zoom)")
              for t, p in panels]
    return np.vstack([np.hstack(top), np.hstack(bottom)])


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="generator (default: the shipped model)")
    ap.add_argument("--photo", type=Path, default=DEMO_PHOTO)
    ap.add_argument("--mask", type=Path, default=DEMO_MASK, help="PNG, 255 = hole")
    ap.add_argument("--out", type=Path, default=Path("docs/demo_before_after.jpg"))
    ap.add_argument("--model-result", type=Path, default=None,
                    help="use this already inpainted photo (e.g. from 'gmcnn-mobile demo') as the model panel "
                         "instead of the built-in downscale-fill-upscale baseline")
    ap.add_argument("--quality", type=int, default=85, help="JPEG quality of the figure")
    args = ap.parse_args(argv)

    import torch

    from models import load_generator
    from models.evaluate import read_rgb, telea

    torch.set_num_threads(2)
    rgb = read_rgb(args.photo)
    mask = cv2.imread(str(args.mask), cv2.IMREAD_GRAYSCALE)
    if mask is None or mask.shape != rgb.shape[:2]:
        raise SystemExit(f"{args.mask}: missing or not the photo's size")
    if args.model_result is not None:
        model_out = read_rgb(args.model_result)
        if model_out.shape != rgb.shape:
            raise SystemExit(f"{args.model_result}: not the photo's size")
    else:
        model_out = inpaint_downscaled(load_generator(args.checkpoint), rgb, mask)
    telea_out = telea(rgb, mask)
    fig = figure(rgb, mask, model_out, telea_out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.stem + ".part" + args.out.suffix)
    cv2.imwrite(str(tmp), cv2.cvtColor(fig, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, args.quality])
    tmp.replace(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
