"""Error-compensating rounding of convolution weights to int8 (GPTQ: Frantar et al., ICLR 2023; the optimal brain
compression update of Frantar and Alistarh, NeurIPS 2022).

Rounding each weight to the nearest int8 level makes each weight's error as small as it can be, not the layer's
output error. Rounding the weights of one output channel one input position after another, and moving each
rounding error onto the positions not rounded yet in proportion to how the inputs at those positions correlate
(the inverse of ``H = E[x x^T]`` over the layer's input patches), leaves a much smaller output error for the same
int8 grid. Simulated on the shipped model at 512x680 (docs/EXPORT.md, "Error-compensating weight rounding"): every
convolution's weights int8, activations float, biases corrected as int8-dynamic files are, hole PSNR on the held-out
samples 38.85 dB with nearest rounding, 53.00 dB with this. The TFLite files gained less (0.6 dB for int8-dynamic,
whose error is then its inputs' rounding at run time; int8 lost 0.3-0.6 dB), so it is an export option
(``--weight-rounding gptq``), not the default (docs/TOLERANCES.md).

The grid is the one the converters use, so a file can hold the result as it is: symmetric per output channel,
``scale = max |w| / 127``, levels -127..127, and each channel keeps a weight at +-127 so that its scale (what the
converters derive from the largest weight) stays the same. :func:`export.tflite_graph.set_conv_levels` writes the
levels into a converted file in place of the converter's own.

``H`` is estimated on crops of each convolution's input, not the whole input: two windows of ``WINDOW`` x
``WINDOW`` output positions per calibration sample, one around a hole pixel (the parity gate scores the hole) and
one anywhere (a full 7x7x128 layer's patches are 6,272 values each; its whole input at 512x680 would be 1,000 times
more than the estimate needs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

# output positions per side of each crop; two crops per calibration sample
WINDOW = 32
# added to H's diagonal, as a fraction of its mean: keeps H invertible where the crops did not see every pattern
DAMPING = 0.01
METHOD = "gptq"

Levels = Dict[str, Tuple[np.ndarray, np.ndarray]]  # conv name -> (int8 levels (O, I, kh, kw), float32 scale (O,))


def channel_scales(weight: np.ndarray) -> np.ndarray:
    """The converters' per-output-channel int8 scale of a filter (O, ...): ``max |w| / 127`` in float32
    (a channel of zeros gets a tiny positive scale: its levels are all 0 either way)."""
    w = np.asarray(weight, np.float32).reshape(weight.shape[0], -1)
    return np.maximum(np.abs(w).max(axis=1), np.float32(1e-12)) / np.float32(127.0)


def nearest_levels(weight: np.ndarray) -> np.ndarray:
    """Round to nearest on :func:`channel_scales`' grid: int8 levels of the shape of ``weight``."""
    scale = channel_scales(weight).reshape(-1, *([1] * (weight.ndim - 1)))
    return np.clip(np.round(np.asarray(weight, np.float32) / scale), -127, 127).astype(np.int8)


def compensated_levels_of(weight: np.ndarray, hessian: np.ndarray, damping: float = DAMPING) -> np.ndarray:
    """GPTQ rounding of one filter.

    weight: (O, I, kh, kw) float32 (PyTorch layout); hessian: (d, d), ``d = I * kh * kw`` in that order (as
    ``torch.nn.functional.unfold`` lays out a patch), the mean of ``x x^T`` over the layer's input patches.
    Returns int8 levels (O, I, kh, kw) on :func:`channel_scales`' grid, every channel with a level at +-127
    where its nearest rounding has one (so the converters' scale is unchanged).
    """
    import torch

    shape = weight.shape
    out_ch = shape[0]
    w = torch.as_tensor(np.asarray(weight, np.float32).reshape(out_ch, -1), dtype=torch.float64).clone()
    scale = torch.as_tensor(channel_scales(weight), dtype=torch.float64)
    h = torch.as_tensor(hessian, dtype=torch.float64).clone()
    if h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"a {tuple(h.shape)} hessian for a filter of {w.shape[1]} inputs per output channel")
    diag = torch.diagonal(h)
    seen = diag > 0
    # inputs the crops never saw: rounded to nearest with nothing to correlate them with
    diag[~seen] = diag[seen].mean() if bool(seen.any()) else 1.0
    order = torch.argsort(torch.diagonal(h), descending=True)  # most energetic inputs first ("act order")
    w, h = w[:, order], h[order][:, order]
    h += damping * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    # one d x d float64 matrix is 315 MB for a 7x7x128 layer: each is dropped as soon as the next one exists
    lower = torch.linalg.cholesky(h)
    del h
    inverse = torch.cholesky_inverse(lower)
    del lower
    upper = torch.linalg.cholesky(inverse, upper=True)
    del inverse
    levels = torch.zeros_like(w)
    block = 128
    for start in range(0, w.shape[1], block):
        end = min(start + block, w.shape[1])
        errors = torch.zeros(out_ch, end - start, dtype=w.dtype)
        for i in range(start, end):
            q = torch.clamp(torch.round(w[:, i] / scale), -127, 127)
            levels[:, i] = q
            err = (w[:, i] - q * scale) / upper[i, i]
            w[:, i + 1:end] -= err[:, None] * upper[i, i + 1:end][None, :]
            errors[:, i - start] = err
        w[:, end:] -= errors @ upper[start:end, end:]
    levels = levels[:, torch.argsort(order)].numpy()
    nearest = nearest_levels(weight).reshape(out_ch, -1)
    # keep the scale: where compensation moved every level of a channel off +-127, put its largest weight back there
    short = (np.abs(levels).max(axis=1) < 127) & (np.abs(nearest).max(axis=1) == 127)
    for o in np.flatnonzero(short):
        j = int(np.abs(nearest[o]).argmax())
        levels[o, j] = nearest[o, j]
    return levels.reshape(shape).astype(np.int8)


def _hole_centre(mask: np.ndarray, rng: np.random.Generator) -> Tuple[float, float]:
    """A random hole pixel of a (H, W[, 1]) mask as fractions of the rows and columns (the image's centre when
    the mask has no hole)."""
    rows, cols = np.nonzero(mask.reshape(mask.shape[:2]) > 0)
    if not len(rows):
        return 0.5, 0.5
    j = int(rng.integers(len(rows)))
    return (rows[j] + 0.5) / mask.shape[0], (cols[j] + 0.5) / mask.shape[1]


def input_hessians(generator, samples, window: int = WINDOW, seed: int = 0,
                   progress: Optional[Callable[[str], None]] = None) -> Iterator[Tuple[str, np.ndarray]]:
    """``E[x x^T]`` over the input patches of every convolution of ``generator``, yielded as (name, (d, d)
    float64 in :func:`compensated_levels_of`'s layout) in network order, estimated on two crops per sample
    (:class:`export.samples.Samples`): one around a random hole pixel, one anywhere, ``window`` output positions a
    side, with the zero padding the convolution adds itself. One float forward per sample keeps only the crops;
    each hessian is built from them when it is asked for, and the crops it came from are dropped then, so a
    caller that uses one before asking for the next holds one at a time (all of them at 512x680: 3.6 GB)."""
    import torch
    import torch.nn.functional as F

    from .activations import _network_batch

    convs = {name: mod for name, mod in generator.named_modules() if isinstance(mod, torch.nn.Conv2d)}
    crops: Dict[str, List[object]] = {name: [] for name in convs}
    rng = np.random.default_rng(seed)
    centre = [(0.5, 0.5)]

    def keep(name, mod):
        def hook(_mod, inputs):
            x = inputs[0]
            pad_h, pad_w = mod.padding if isinstance(mod.padding, tuple) else (0, 0)
            x = F.pad(x, (pad_w, pad_w, pad_h, pad_h)) if pad_h or pad_w else x
            span_h = mod.stride[0] * (window - 1) + mod.dilation[0] * (mod.kernel_size[0] - 1) + 1
            span_w = mod.stride[1] * (window - 1) + mod.dilation[1] * (mod.kernel_size[1] - 1) + 1
            rows, cols = x.shape[-2], x.shape[-1]
            for where in ("hole", "anywhere"):
                if rows <= span_h or cols <= span_w:
                    crops[name].append(x.detach().clone())
                    continue
                if where == "hole":
                    r = int(round(centre[0][0] * rows)) - span_h // 2
                    c = int(round(centre[0][1] * cols)) - span_w // 2
                else:
                    r, c = int(rng.integers(rows - span_h + 1)), int(rng.integers(cols - span_w + 1))
                r, c = min(max(r, 0), rows - span_h), min(max(c, 0), cols - span_w)
                crops[name].append(x[..., r:r + span_h, c:c + span_w].detach().clone())
        return hook

    hooks = [mod.register_forward_pre_hook(keep(name, mod)) for name, mod in convs.items()]
    try:
        x, m = _network_batch(samples.images, samples.masks)
        with torch.no_grad():
            for i in range(x.shape[0]):
                centre[0] = _hole_centre(samples.masks[i], rng)
                generator(x[i:i + 1], m[i:i + 1])
                if progress:
                    progress(f"weight rounding: input crops of sample {i + 1}/{x.shape[0]}")
    finally:
        for h in hooks:
            h.remove()
    for name, mod in convs.items():
        total, count = None, 0
        for crop in crops.pop(name):
            cols = F.unfold(crop, mod.kernel_size, dilation=mod.dilation, stride=mod.stride)[0]  # (d, positions)
            part = (cols @ cols.T).double()
            total = part if total is None else total + part
            count += cols.shape[1]
        yield name, (total / max(count, 1)).numpy()
        del total


def compensated_levels(generator, samples, cache: Optional[Path] = None,
                       progress: Optional[Callable[[str], None]] = None) -> Levels:
    """:func:`compensated_levels_of` for every convolution of ``generator``, from :func:`input_hessians` of
    ``samples``; kept in ``cache`` (.npz) when given: the export computes them once per shape and run, for every
    file that stores int8 weights."""
    if cache is not None and Path(cache).is_file():
        with np.load(cache) as z:
            names = sorted({k.rsplit("/", 1)[0] for k in z.files})
            return {n: (z[f"{n}/levels"], z[f"{n}/scale"]) for n in names}
    import torch

    convs = {name: mod for name, mod in generator.named_modules() if isinstance(mod, torch.nn.Conv2d)}
    out: Levels = {}
    for k, (name, hessian) in enumerate(input_hessians(generator, samples, progress=progress)):
        weight = convs[name].weight.detach().cpu().numpy()
        out[name] = (compensated_levels_of(weight, hessian), channel_scales(weight))
        del hessian
        if progress:
            progress(f"weight rounding: {k + 1}/{len(convs)} convolutions")
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(cache).with_suffix(".partial.npz")
        np.savez(tmp, **{f"{n}/{part}": v for n, (lv, sc) in out.items() for part, v in (("levels", lv), ("scale", sc))})
        tmp.replace(cache)
    return out


def levels_cache(work_root: Path, shape) -> Path:
    """Where an export keeps the compensated levels of one shape (its work folder, shared by the run's files)."""
    return Path(work_root) / f"weight_levels_{shape[0]}x{shape[1]}.npz"
