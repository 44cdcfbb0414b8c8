"""Where the default model breaks: a held-out export sample at 1024x1360 whose hole is larger than
any the model saw in its 256x256 training crops (docs/default_model_1024_divergence.jpg).

    python docs/figures/divergence_figure.py [--checkpoint PATH] [--sample 2] [--out docs/default_model_1024_divergence.jpg]

The sample is the export parity gate's own (``export.samples.load_samples`` on the bundled held-out
photos, 2 masks per photo, seed 2), prepared as the runtime feeds the model. Prints the range of the
network's last convolution inside and outside the hole (its output is clipped to [-1, 1] after it).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

SHAPE = (1024, 1360)
MARGIN = 80


def _label(bgr: np.ndarray, text: str) -> np.ndarray:
    out = np.ascontiguousarray(bgr)
    cv2.rectangle(out, (0, 0), (len(text) * 11 + 8, 24), (0, 0, 0), -1)
    cv2.putText(out, text, (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def main(argv=None) -> int:
    import torch

    import models
    from export.samples import HOLDOUT_DIR, load_samples
    from runtime_py.contract import denormalize

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="generator (default: the shipped model)")
    p.add_argument("--sample", type=int, default=2, help="index of the held-out sample (0-3)")
    p.add_argument("--out", type=Path, default=Path("docs/default_model_1024_divergence.jpg"))
    args = p.parse_args(argv)

    torch.set_num_threads(2)
    samples = load_samples(HOLDOUT_DIR, SHAPE, 2, seed=2)
    gen = models.load_generator(args.checkpoint)
    i = args.sample
    image = torch.from_numpy(samples.tensor_image()).permute(0, 3, 1, 2)[i:i + 1]
    mask = torch.from_numpy(samples.tensor_mask()).permute(0, 3, 1, 2)[i:i + 1]
    last = {}
    convs = [m for m in gen.modules() if isinstance(m, torch.nn.Conv2d)]
    hook = convs[-1].register_forward_hook(lambda mod, inp, out: last.__setitem__("out", out.detach()))
    try:
        with torch.no_grad():
            raw = gen(image, mask)
    finally:
        hook.remove()
    hole = mask[0, 0].numpy() > 0.5
    pre = last["out"][0].numpy()
    print(f"sample {i}: hole {hole.mean():.1%} of the image; last convolution in the hole "
          f"{pre[:, hole].min():.1f}..{pre[:, hole].max():.1f}, outside {pre[:, ~hole].min():.1f}..{pre[:, ~hole].max():.1f}")

    composite = denormalize((image[0] * (1 - mask[0]) + raw[0] * mask[0]).clamp(-1, 1).permute(1, 2, 0).numpy())
    original = samples.images[i].astype(np.float32)
    shown = original.copy()
    shown[hole] = shown[hole] * 0.4 + np.array([255.0, 0.0, 0.0]) * 0.6
    ys, xs = np.nonzero(hole)
    y0, y1 = max(0, ys.min() - MARGIN), min(SHAPE[0], ys.max() + MARGIN)
    x0, x1 = max(0, xs.min() - MARGIN), min(SHAPE[1], xs.max() + MARGIN)

    def panel(rgb, text):
        return _label(np.round(rgb[y0:y1, x0:x1]).astype(np.uint8)[..., ::-1], text)

    figure = np.concatenate([panel(original, f"held-out photo at {SHAPE[0]}x{SHAPE[1]}"),
                             panel(shown, f"hole: {hole.mean():.1%} of the image"),
                             panel(composite, "default model (PyTorch fp32)")], 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(args.out), figure, [cv2.IMWRITE_JPEG_QUALITY, 85]):
        raise SystemExit(f"could not write {args.out}")
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
