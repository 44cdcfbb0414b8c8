"""Is a generator well-conditioned? Dead layers and the largest convolution output, measured cheaply.

Two numbers, both from forward passes over real samples:

* **dead layers**: a layer followed by ELU is *dead* when more than :data:`DEAD_SHARE` of its outputs sit at
  ELU's floor, i.e. within :data:`FLOOR_TOLERANCE` of -1. There ELU's slope (``y + 1``) is under 1 % of
  its linear part's, so almost no gradient reaches the layer and it cannot recover by itself.
* **peak**: the largest absolute convolution output (after ELU for the ``tf`` variant, where the export
  hooks it too; before it for ``torch``). int8 gives each activation tensor one scale, so a layer that
  reaches 1e4 leaves its typical values a handful of levels (``export.activations`` shows the full table).

Unlike ``export.activations`` (which keeps every output to compute quantiles) the statistics here are
running reductions, so a 1024x1360 pass needs only the memory of one forward pass, on a CPU or a GPU.
The trainer logs both at every validation; ``python -m models.conditioning`` measures any checkpoint.

Samples are (N,H,W,3) uint8 RGB images and (N,H,W) masks (nonzero = hole); ``save_samples`` /
``load_samples`` keep them in one ``.npz`` so that samples prepared by the export's own code (the
held-out parity photos at 1024x1360) can be measured here and on a GPU machine alike.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from runtime_py.errors import UserError

FLOOR_TOLERANCE = 0.01
DEAD_SHARE = 0.95
PEAK_LIMIT = 100.0


def activated_convolutions(gen) -> List[Tuple[str, object, bool, bool]]:
    """(name, module, followed by ELU, hook sees the output after ELU) for every convolution, in order."""
    import torch.nn as nn

    from .gmcnn import TFSameConv

    out = []
    for name, module in gen.named_modules():
        if isinstance(module, TFSameConv):
            out.append((name, module, module.spec.activation, module.spec.activation))
        elif isinstance(module, nn.Conv2d):
            # torch variant: ELU follows every convolution except the last decoding layer, outside the module
            out.append((name, module, not name.endswith("decoding_layers.1"), False))
    return out


class ActivationMonitor:
    """Running per-convolution statistics while attached (``with ActivationMonitor(gen) as mon: gen(x, m)``).

    Reductions stay on the tensors' device until :meth:`rows` reads them, so attaching it to a training
    or validation pass on a GPU adds no synchronisation.
    """

    def __init__(self, gen):
        self._convs = activated_convolutions(gen)
        self._hooks = []
        self._stats: Dict[str, dict] = {}

    def __enter__(self) -> "ActivationMonitor":
        import torch

        floor_pre = math.log(FLOOR_TOLERANCE)  # ELU(x) <= -1 + tol  <=>  x <= log(tol)
        for name, module, activated, post in self._convs:
            def hook(mod, inputs, output, name=name, activated=activated, post=post):
                y = output.detach()
                s = self._stats.get(name)
                lo, hi, peak = y.amin(), y.amax(), y.abs().amax()
                if activated:
                    floor = (y <= -1.0 + FLOOR_TOLERANCE) if post else (y <= floor_pre)
                    at_floor = floor.sum(dtype=torch.float64)
                else:
                    at_floor = torch.zeros((), dtype=torch.float64, device=y.device)
                if s is None:
                    self._stats[name] = {"min": lo, "max": hi, "peak": peak, "at_floor": at_floor,
                                         "count": y.numel(), "activated": activated}
                else:
                    s["min"] = torch.minimum(s["min"], lo)
                    s["max"] = torch.maximum(s["max"], hi)
                    s["peak"] = torch.maximum(s["peak"], peak)
                    s["at_floor"] = s["at_floor"] + at_floor
                    s["count"] += y.numel()
            self._hooks.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def rows(self) -> List[dict]:
        """One dict per convolution seen: layer, min, max, peak (max |output|), floor_share (None when no
        ELU follows), activated."""
        rows = []
        for name, _, _, _ in self._convs:
            s = self._stats.get(name)
            if s is None:
                continue
            rows.append({"layer": name, "min": float(s["min"]), "max": float(s["max"]), "peak": float(s["peak"]),
                         "floor_share": float(s["at_floor"]) / s["count"] if s["activated"] else None,
                         "activated": s["activated"]})
        return rows


def summarize(rows: Sequence[dict], dead_share: float = DEAD_SHARE) -> dict:
    """peak, peak_layer, dead_layers (names), worst_floor_share and its layer."""
    if not rows:
        raise ValueError("no convolution outputs were recorded")
    top = max(rows, key=lambda r: r["peak"])
    acts = [r for r in rows if r["floor_share"] is not None]
    worst = max(acts, key=lambda r: r["floor_share"]) if acts else None
    return {"peak": top["peak"], "peak_layer": top["layer"],
            "dead_layers": [r["layer"] for r in acts if r["floor_share"] > dead_share],
            "worst_floor_share": worst["floor_share"] if worst else 0.0,
            "worst_floor_layer": worst["layer"] if worst else ""}


def well_conditioned(summary: dict, peak_limit: float = PEAK_LIMIT) -> bool:
    return not summary["dead_layers"] and summary["peak"] < peak_limit


def measure(gen, images: np.ndarray, masks: np.ndarray, device=None, batch: int = 1) -> List[dict]:
    """Per-convolution rows (see :meth:`ActivationMonitor.rows`) over the samples; gen stays in its mode
    but runs without gradients. images (N,H,W,3) uint8 RGB, masks (N,H,W) nonzero = hole."""
    import torch

    from .train_data import masks_tensor, to_tensor

    device = device or next(gen.parameters()).device
    with torch.no_grad(), ActivationMonitor(gen) as mon:
        for i in range(0, len(images), batch):
            x = to_tensor(list(images[i:i + batch])).to(device)
            m = masks_tensor(list(masks[i:i + batch])).to(device)
            gen(x, m)
    return mon.rows()


def save_samples(path: Path, images: np.ndarray, masks: np.ndarray, names: Sequence[str]) -> None:
    """images (N,H,W,3) uint8 RGB, masks (N,H,W[,1]) nonzero = hole -> one compressed .npz."""
    from runtime_py.imageio import write_bytes_atomic
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, images=np.asarray(images, np.uint8),
                        masks=(np.asarray(masks).reshape(np.shape(images)[:3]) > 0).astype(np.uint8),
                        names=np.asarray(list(names)))
    write_bytes_atomic(Path(path), buf.getvalue())


def load_samples(path: Path) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    try:
        with np.load(Path(path)) as z:
            images, masks, names = z["images"], z["masks"], [str(n) for n in z["names"]]
    except (OSError, KeyError, ValueError) as exc:
        raise UserError(f"{path}: not a samples file written by models.conditioning.save_samples ({exc})") from None
    if images.ndim != 4 or images.shape[-1] != 3 or masks.shape != images.shape[:3]:
        raise UserError(f"{path}: images {images.shape} and masks {masks.shape} do not match")
    return images, masks, names


def format_table(rows: Sequence[dict], summary: dict) -> str:
    lines = [f"{'layer':<34} {'min':>9} {'max':>10} {'at ELU floor':>12}"]
    for r in rows:
        floor = "-" if r["floor_share"] is None else f"{r['floor_share']:.1%}"
        flag = "  <- dead" if r["layer"] in summary["dead_layers"] else ""
        lines.append(f"{r['layer']:<34} {r['min']:9.3f} {r['max']:10.3f} {floor:>12}{flag}")
    lines.append(f"peak |output| {summary['peak']:.1f} ({summary['peak_layer']}; limit {PEAK_LIMIT:g}); "
                 f"dead layers (> {DEAD_SHARE:.0%} at the floor): {len(summary['dead_layers'])}"
                 + (f" ({', '.join(summary['dead_layers'])})" if summary["dead_layers"] else "")
                 + f"; most at the floor: {summary['worst_floor_layer']} {summary['worst_floor_share']:.1%}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from runtime_py.cli import HelpFormatter, shape

    p = argparse.ArgumentParser(prog="python -m models.conditioning", formatter_class=HelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint (default: the shipped default model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", type=Path, help=".npz of samples (save_samples), e.g. the export's held-out "
                                                   "photos prepared at 1024x1360")
    src.add_argument("--photos", type=Path, help="photo folder: each photo's centred view at --shape with "
                                                  "--masks-per-photo masks, as the trainer validates")
    p.add_argument("--names", nargs="+", default=None, metavar="NAME",
                   help="photos of --photos to use (default: all; --validation: the validation photos)")
    p.add_argument("--validation", action="store_true",
                   help="use the 10 validation photos of models.dataset.VALIDATION (e.g. in a packed folder)")
    p.add_argument("--shape", type=shape, default="512x680", metavar="ROWSxCOLS", help="model shape for --photos")
    p.add_argument("--masks-per-photo", type=int, default=2, help="masks per photo for --photos")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="also write the rows and summary here")
    args = p.parse_args(argv)
    try:
        import torch

        from . import load_generator
        from .train_data import list_photos, load_photo, validation_set

        torch.set_num_threads(args.threads)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is available to torch")
        if args.samples:
            images, masks, names = load_samples(args.samples)
        else:
            shape = args.shape
            paths = list_photos(args.photos)
            if args.validation:
                from .dataset import VALIDATION

                args.names = list(VALIDATION)
            if args.names:
                missing = sorted(set(args.names) - {q.name for q in paths})
                if missing:
                    raise UserError(f"not in {args.photos}: {', '.join(missing)}")
                paths = [q for q in paths if q.name in set(args.names)]
            photos = [load_photo(q, max(shape)) for q in paths]
            images, masks = validation_set(photos, shape, args.masks_per_photo, seed=0)
            names = [q.name for q in paths for _ in range(args.masks_per_photo)]
        gen = load_generator(args.checkpoint).to(args.device)
        rows = measure(gen, images, masks, torch.device(args.device))
        summary = summarize(rows)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows, summary))
    print(f"samples: {len(images)} at {images.shape[1]}x{images.shape[2]} ({', '.join(sorted(set(names)))})")
    if args.json:
        from runtime_py.imageio import write_bytes_atomic

        write_bytes_atomic(args.json, json.dumps({"summary": summary, "layers": rows,
                                                  "samples": names, "shape": list(images.shape[1:3])},
                                                 indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
