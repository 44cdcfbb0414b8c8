"""Draws the worked example of docs/PIPELINE.md from a ``--trace`` directory.

    python docs/pipeline/figure.py TRACE_DIR OUT.jpg

Panels: the input with its hole (red) and context window (yellow); pass 1's input and its
shrinking masks; the pass-1 composite; pass 2's stitched input with the ring (red) and the
tile grid (green = ran, grey = skipped); the pass-2 composite; before / after around the hole.
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402


def load(trace: Path):
    index = json.loads((trace / "index.json").read_text())
    arrays = {s["name"]: np.load(trace / s["npy"]) for s in index["stages"]}
    return index, arrays


def tint(img, mask, colour=(255, 0, 0), alpha=0.55):
    out = img.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.array(colour, np.float32)
    return out.astype(np.uint8)


def main(trace: Path, out: Path) -> None:
    index, a = load(trace)
    summary = index["summary"]
    p1 = next(p for p in summary["passes"] if p["pass"] == 1)
    p2 = next((p for p in summary["passes"] if p["pass"] == 2 and "shape" in p), None)
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.6))
    ax = axes.ravel()

    ax[0].imshow(tint(a["input"], a["mask"]))
    if summary.get("window"):
        t, l, b, r = summary["window"]
        ax[0].add_patch(Rectangle((l, t), r - l, b - t, fill=False, ec="yellow", lw=2))
    ax[0].set_title(f"input {a['input'].shape[1]}x{a['input'].shape[0]}, hole (red), crop window (yellow)")

    steps = sorted(n for n in a if n.startswith("pass1") and n.endswith("_model_mask"))
    shade = a["pass1_image"].copy()
    colours = [(255, 0, 0), (255, 160, 0), (255, 255, 0), (0, 255, 0)]
    for i, n in enumerate(steps):
        shade = tint(shade, a[n], colours[i % len(colours)], 0.6)
    s1 = p1["shape"]
    ax[1].imshow(shade)
    ax[1].set_title(f"pass 1 input {s1[0]}x{s1[1]}: {len(steps)} mask(s)" + (" (shrinking)" if len(steps) > 1 else ""))

    last1 = [n for n in a if n.startswith("pass1") and n.endswith("_composite")][-1]
    ax[2].imshow(a[last1])
    ax[2].set_title(f"pass 1 composite after {p1['runs']} run(s)")

    if p2 is not None:
        ax[3].imshow(tint(a["pass2_stitched"], a["pass2_ring"]))
        if p2.get("tiled"):
            for tile in p2["tile_grid"]:  # cores (they partition the pass); tiles overlap beyond them
                t0, l0, b0, r0 = tile["core"]
                ax[3].add_patch(Rectangle((l0, t0), r0 - l0, b0 - t0, fill=False, ec="lime" if tile["ran"] else "0.6",
                                          lw=1.5, ls="-" if tile["ran"] else "--"))
        tiles = f", tile cores: {p2['runs']} of {p2['tiles']} ran" if p2.get("tiled") else ", whole"
        ax[3].set_title(f"pass 2 {p2['shape'][0]}x{p2['shape'][1]} stitched, ring (red){tiles}", fontsize=10)
        last2 = "pass2_tiles_blended" if "pass2_tiles_blended" in a else [n for n in a if n.startswith("pass2") and n.endswith("_composite")][-1]
        ax[4].imshow(a[last2])
        ax[4].set_title("pass 2 composite")
    else:
        ax[3].axis("off")
        ax[4].axis("off")

    hole = a["mask"]
    rows, cols = np.flatnonzero(hole.any(1)), np.flatnonzero(hole.any(0))
    pad = 40
    t, b = max(rows[0] - pad, 0), min(rows[-1] + pad, hole.shape[0])
    l, r = max(cols[0] - pad, 0), min(cols[-1] + pad, hole.shape[1])
    pair = np.concatenate([a["input"][t:b, l:r], np.full((b - t, 12, 3), 255, np.uint8), a["output"][t:b, l:r]], 1)
    ax[5].imshow(pair)
    ax[5].set_title("before | after (around the hole, full resolution)")
    for x in ax:
        x.set_xticks([])
        x.set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=90, pil_kwargs={"quality": 85})


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
