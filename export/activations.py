"""Why int8 fails for a model: the value range of every convolution output on real photos.

Full-integer TFLite gives each activation tensor one int8 scale, ``(max - min) / 255``.
When a layer's outputs reach large values while most of them sit in a narrow band (GMCNN's
ELU layers: many values at the -1 floor, a few at +100), one int8 step is wider than that
band and the layer's typical values collapse onto a few levels. The parity gate then
reports a low hole PSNR for ``int8`` and ``int8-dynamic`` files (dynamic-range kernels
quantize activations per tensor at run time, so they suffer the same way).

``python -m export.activations [--checkpoint CKPT] [--shape 512x680]`` prints, per
convolution (output after its ELU for the ``tf`` variant, before it for ``torch``): min,
max, the int8 step of that range, the share of values at the floor (the range's minimum,
ELU's -1, which int8 holds exactly), and over the values above the floor their median and
the number of int8 levels spanning their middle half (``levels_iqr``; below ~4 those
values are mostly rounding noise in int8). ``--sensitivity`` adds, per layer, the model output's hole PSNR
when only that layer's input is rounded to int8, which ranks the layers that cost the most.
Samples: the export's held-out photos and masks, prepared as the runtime feeds the model.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from runtime_py.errors import UserError

# Quantiles from a fixed-size subsample: exact min/max, and medians/quartiles to ~0.1 %.
SUBSAMPLE = 200_000


def _network_batch(images: np.ndarray, masks: np.ndarray):
    """uint8 (N,H,W,3) RGB and (N,H,W[,1]) masks -> ((N,3,H,W) float32 in [-1,1], (N,1,H,W) float32, 1 = hole)."""
    import torch

    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    m = torch.from_numpy((masks.reshape(masks.shape[:3]) > 0).astype(np.float32))[:, None]
    return x, m


def conv_output_stats(generator, images: np.ndarray, masks: np.ndarray, seed: int = 0) -> List[Dict[str, float]]:
    """Per-convolution statistics over a batch, in network order.

    images: (N, H, W, 3) uint8 RGB; masks: (N, H, W) or (N, H, W, 1), nonzero = hole.
    Returns one dict per ``nn.Conv2d`` module: layer, min, max, int8_step, at_floor (share of
    values within half a step of min), and over the values above the floor median, p25, p75 and
    levels_iqr ((p75 - p25) / int8_step).
    """
    import torch

    gen = generator.eval()
    gathered: Dict[str, List[torch.Tensor]] = {}
    hooks = []
    for name, module in gen.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            def keep(mod, inputs, output, name=name):
                gathered.setdefault(name, []).append(output.detach().flatten())
            hooks.append(module.register_forward_hook(keep))
    try:
        x, m = _network_batch(images, masks)
        with torch.no_grad():
            for i in range(x.shape[0]):
                gen(x[i:i + 1], m[i:i + 1])
    finally:
        for h in hooks:
            h.remove()
    rng = np.random.default_rng(seed)
    rows = []
    for name, parts in gathered.items():
        values = torch.cat(parts).numpy()
        lo, hi = float(values.min()), float(values.max())
        sub = values if values.size <= SUBSAMPLE else values[rng.integers(0, values.size, SUBSAMPLE)]
        step = max(hi - lo, 1e-12) / 255.0
        # values at the floor (ELU's -1) are exact in int8 (the range's minimum); the loss is in the rest
        above = sub[sub > lo + step / 2]
        at_floor = 1.0 - above.size / sub.size
        p25, p50, p75 = (float(v) for v in np.quantile(above if above.size else sub, [0.25, 0.5, 0.75]))
        rows.append({"layer": name, "min": lo, "max": hi, "int8_step": step, "at_floor": at_floor, "median": p50,
                     "p25": p25, "p75": p75, "levels_iqr": (p75 - p25) / step})
    return rows


def _fake_int8(t):
    """Per-tensor asymmetric int8 rounding of ``t`` over its own min..max (what a calibrated scale does)."""
    lo, hi = float(t.min()), float(t.max())
    step = max(hi - lo, 1e-12) / 255.0
    return ((t - lo) / step).round() * step + lo


def _hole_psnr(a, b, hole) -> float:
    """8-bit PSNR between two (1,3,H,W) [-1,1] outputs over the hole pixels (hole: (1,1,H,W) bool)."""
    pa = ((a.clamp(-1, 1) + 1) * 127.5).round()
    pb = ((b.clamp(-1, 1) + 1) * 127.5).round()
    mse = float(((pa - pb) ** 2)[hole.expand_as(pa)].mean())
    return 100.0 if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def int8_sensitivity(generator, images: np.ndarray, masks: np.ndarray) -> Dict[str, float]:
    """Hole PSNR (dB, worst sample) of the output when only that convolution's input is rounded to
    int8 (per-tensor, its own range: what full-integer and dynamic-range kernels both do), the rest
    float32; key ``"all"``: every convolution's input rounded;
    ``"weights"``: every weight rounded to symmetric per-output-channel int8 (what the converter
    does), activations float; ``"weights+all"``: both.

    A simulation of full-integer quantization's activation rounding (weights stay float), so it
    ranks the layers that cost the most; the real file's number is the parity gate's.
    """
    import torch

    gen = generator.eval()
    convs = [(n, m) for n, m in gen.named_modules() if isinstance(m, torch.nn.Conv2d)]
    x, m = _network_batch(images, masks)
    with torch.no_grad():
        refs = [gen(x[i:i + 1], m[i:i + 1]) for i in range(x.shape[0])]

    def worst_with(selected) -> float:
        hooks = [mod.register_forward_pre_hook(lambda mod, inp: (_fake_int8(inp[0]),)) for _, mod in selected]
        try:
            with torch.no_grad():
                return min(_hole_psnr(gen(x[i:i + 1], m[i:i + 1]), refs[i], m[i:i + 1] > 0)
                           for i in range(x.shape[0]))
        finally:
            for h in hooks:
                h.remove()

    result = {name: worst_with([(name, mod)]) for name, mod in convs}
    result["all"] = worst_with(convs)
    saved = {name: mod.weight.detach().clone() for name, mod in convs}
    try:
        with torch.no_grad():
            for _, mod in convs:
                w = mod.weight
                scale = w.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12) / 127.0
                w.copy_((w / scale).round().clamp(-127, 127) * scale)
        result["weights"] = worst_with([])
        result["weights+all"] = worst_with(convs)
    finally:
        with torch.no_grad():
            for name, mod in convs:
                mod.weight.copy_(saved[name])
    return result


def format_table(rows: Sequence[Dict[str, float]], flag_below: float = 4.0) -> str:
    sens = any("input_int8_hole_psnr_db" in r for r in rows)
    lines = [f"{'layer':<34} {'min':>8} {'max':>9} {'int8 step':>9} {'at floor':>8} {'median':>8} {'levels_iqr':>10}"
             + (f" {'input int8 dB':>13}" if sens else "")]
    for r in rows:
        flag = "  <- int8 flattens it" if r["levels_iqr"] < flag_below else ""
        extra = f" {r['input_int8_hole_psnr_db']:13.1f}" if sens else ""
        lines.append(f"{r['layer']:<34} {r['min']:8.3f} {r['max']:9.3f} {r['int8_step']:9.4f} {r['at_floor']:8.1%} "
                     f"{r['median']:8.3f} {r['levels_iqr']:10.1f}{extra}{flag}")
    worst = min(rows, key=lambda r: r["levels_iqr"]) if rows else None
    if worst is not None:
        n_flat = sum(r["levels_iqr"] < flag_below for r in rows)
        lines.append(f"{n_flat} of {len(rows)} layers have fewer than {flag_below:g} int8 levels across their middle "
                     f"half; worst {worst['layer']} ({worst['levels_iqr']:.1f}), largest output "
                     f"{max(r['max'] for r in rows):.1f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from runtime_py.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="python -m export.activations", formatter_class=HelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint (default: the shipped default model)")
    p.add_argument("--shape", default="512x680", help="ROWSxCOLS the samples are prepared at")
    p.add_argument("--photos", type=Path, default=None,
                   help="photo folder (default: the export's held-out photos, export/photos/holdout)")
    p.add_argument("--masks-per-photo", type=int, default=2, help="seeded masks per photo")
    p.add_argument("--sensitivity", action="store_true",
                   help="also run the model once per convolution with only its input rounded to int8 and report "
                        "the hole PSNR against float32 (one inference per layer: slow at full size)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = p.parse_args(argv)
    try:
        import torch

        from models import load_generator

        from .api import parse_shape
        from .samples import HOLDOUT_DIR, load_samples

        torch.set_num_threads(2)
        shape: Tuple[int, int] = parse_shape(args.shape)
        gen = load_generator(args.checkpoint)
        samples = load_samples(args.photos or HOLDOUT_DIR, shape, args.masks_per_photo, seed=2)
        rows = conv_output_stats(gen, samples.images, samples.masks)
        if args.sensitivity:
            sens = int8_sensitivity(gen, samples.images, samples.masks)
            for r in rows:
                r["input_int8_hole_psnr_db"] = sens[r["layer"]]
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        whole = {k: sens[k] for k in ("all", "weights", "weights+all")} if args.sensitivity else None
        print(json.dumps({"layers": rows, "whole_model_hole_psnr_db": whole}, indent=1))
    else:
        print(format_table(rows))
        if args.sensitivity:
            worst = sorted(rows, key=lambda r: r["input_int8_hole_psnr_db"])[:5]
            print("most sensitive (only that layer's input in int8): "
                  + ", ".join(f"{r['layer']} {r['input_int8_hole_psnr_db']:.1f} dB" for r in worst))
            print(f"hole PSNR against float32 (worst sample): every convolution input in int8 {sens['all']:.1f} dB; "
                  f"every weight in int8 (per channel) {sens['weights']:.1f} dB; both {sens['weights+all']:.1f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
