"""The parity gate: every artifact against PyTorch fp32 at the same shape, on held-out photos.

Metrics (per artifact, over the held-out samples; see docs/TOLERANCES.md):

* ``max_abs`` / ``mean_abs``: absolute error of the artifact's output in [-1, 1] units
  against the PyTorch fp32 generator. ``tensor`` signature: raw outputs. ``image``
  signature: uint8 composites against the PyTorch composite rounded the same way
  (half to even), divided by 127.5 -- so one 8-bit level is 0.00784.
* ``hole_psnr_db``: 8-bit PSNR between the artifact's and PyTorch's composites over the
  hole pixels, worst sample. ``composite_psnr_db``: the same over the whole composite.
  Identical 8-bit results are reported as :data:`PSNR_IDENTICAL` dB.
* ``details.known_pixels_changed`` (``image`` signature): known pixels whose output differs
  from the input (compositing happens inside the graph and must keep them).
* ``details.reference_peak_activation``: the largest |value| any convolution of the PyTorch
  reference outputs on the samples; the fp32 ``tensor`` limit grows with it (float32
  rounding is relative to the values a network carries, not to its output's range).

A tolerance row (:mod:`runtime_py.tolerances`, which holds every table) decides pass or fail per
precision and signature.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from runtime_py.contract import PIXEL_SCALE, composite, denormalize, mask_tensor, round_pixels
from runtime_py.tolerances import FP32_ULP, ONE_LEVEL  # noqa: F401 (re-exported: the gate's units)
from runtime_py.tolerances import PARITY as TOLERANCES

PSNR_IDENTICAL = 100.0


def tolerance_for(precision: str, io: str, overrides: Optional[Dict] = None,
                  backend_table: Optional[Dict] = None) -> Dict[str, float]:
    """The tolerance row of (precision, io).

    ``overrides`` (the caller's) and then ``backend_table`` (a backend's ``PARITY_TOLERANCES``, e.g.
    :data:`runtime_py.tolerances.COREML_PARITY`) map precision or (precision, io) to a row; otherwise
    the TFLite table :data:`runtime_py.tolerances.PARITY` decides.
    """
    for table in (overrides or {}, backend_table or {}):
        for key in ((precision, io), precision):
            if key in table:
                return dict(table[key])
    # precisions of other formats (Core ML w8, palettized) start from the int8 row
    return dict(TOLERANCES.get((precision, io), TOLERANCES[("int8", io)]))


def run_samples(engine, samples, keep_going: Optional[Callable[[int, np.ndarray], bool]] = None) -> np.ndarray:
    """An artifact's raw outputs on ``samples``, one sample per run, through its (runtime_py) engine:
    (N, H, W, C) channels last -- float32 in [-1, 1] for ``tensor`` files, uint8 pixels for ``image`` files.
    The engine feeds each sample as the contract encodes it (:meth:`runtime_py.engines.base.Engine.make_feed`).
    ``keep_going(j, output (1, H, W, C))``, called after the j-th sample: False stops there (the outputs so far
    are returned, fewer than N), so that one engine serves a gate that stops at a failing sample."""
    from runtime_py.contract import hole_of, layout_of, to_nhwc

    outputs = []
    with engine:
        spec = engine.output_specs()[0]
        for j, (image, mask) in enumerate(zip(samples.images, samples.masks)):
            y = engine.infer(engine.make_feed(image, hole_of(mask[..., 0])))[spec.name]
            outputs.append(to_nhwc(y) if layout_of(spec.shape) == "NCHW" else y)
            if keep_going is not None and not keep_going(j, outputs[-1]):
                break
    return np.concatenate(outputs)


def reference_outputs(generator, samples, batch: int = 1) -> np.ndarray:
    """PyTorch fp32 raw outputs (N, H, W, 3) float32 in [-1, 1] for ``samples``."""
    import torch

    image = torch.from_numpy(samples.tensor_image()).permute(0, 3, 1, 2)
    mask = torch.from_numpy(samples.tensor_mask()).permute(0, 3, 1, 2)
    outs = []
    with torch.no_grad():
        for i in range(0, image.shape[0], batch):
            outs.append(generator(image[i : i + batch], mask[i : i + batch]).permute(0, 2, 3, 1).numpy())
    return np.concatenate(outs).astype(np.float32)


def reference_outputs_and_peak(generator, samples, batch: int = 1) -> Tuple[np.ndarray, float]:
    """:func:`reference_outputs`, and the largest |value| any ``nn.Conv2d`` of ``generator`` outputs on them."""
    import torch

    from .activations import tensor_extremes

    peak = [0.0]

    def track(module, inputs, output):
        lo, hi = tensor_extremes(output.detach())  # the outputs are channels-last: not abs().max() (0.7 s each)
        peak[0] = max(peak[0], -lo, hi)

    hooks = [m.register_forward_hook(track) for m in generator.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        outputs = reference_outputs(generator, samples, batch)
    finally:
        for h in hooks:
            h.remove()
    return outputs, peak[0]


def max_abs_limit(tolerance: Dict[str, float], peak_activation: Optional[float]) -> Optional[float]:
    """The max-abs limit in force: ``max_abs``, raised to ``max_abs_per_peak_activation * peak`` when larger."""
    if "max_abs" not in tolerance:
        return None
    limit = tolerance["max_abs"]
    if "max_abs_per_peak_activation" in tolerance and peak_activation is not None:
        limit = max(limit, tolerance["max_abs_per_peak_activation"] * peak_activation)
    return limit


def to_pixels(x: np.ndarray) -> np.ndarray:
    """[-1, 1] float -> uint8 pixels, rounding half to even (as TFLite ROUND does)."""
    return round_pixels(denormalize(x.astype(np.float32)))


def composite_pixels(raw: np.ndarray, samples) -> np.ndarray:
    """uint8 composite of a raw [-1, 1] prediction: prediction in the hole, input elsewhere,
    computed as the ``image`` graph does (0..255 scale, then rounded)."""
    pixels = samples.images.astype(np.float32)
    return round_pixels(composite(pixels, mask_tensor(samples.masks), denormalize(raw.astype(np.float32))))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """8-bit PSNR (runtime_py.metrics), capped at PSNR_IDENTICAL so identical results stay JSON numbers."""
    from runtime_py.metrics import psnr as _psnr

    return min(PSNR_IDENTICAL, _psnr(a, b)) if a.size else PSNR_IDENTICAL


def hole_psnrs(reference: np.ndarray, output: np.ndarray, samples, io: str) -> List[float]:
    """:func:`compare`'s hole PSNR of each sample (dB, unrounded), from the hole's pixels alone: the same values
    (the composite is elementwise), at a fraction of the whole comparison's cost (the composite, the PSNR of the
    whole image and the error of every value: about 0.25-0.9 s a sample at 1024x1360 here). What the gate checks of
    each sample as it comes, to stop at the first that fails (a hole PSNR under the limit fails the whole gate)."""
    hole = samples.tensor_mask()[..., 0] > 0.5  # (N, H, W)
    weights = mask_tensor(samples.masks)
    values = []
    for i in range(len(samples)):
        h = hole[i]
        pixels = samples.images[i][h].astype(np.float32)
        ref = round_pixels(composite(pixels, weights[i][h], denormalize(reference[i][h].astype(np.float32))))
        if io == "tensor":
            art = round_pixels(composite(pixels, weights[i][h], denormalize(output[i][h].astype(np.float32))))
        else:
            art = output[i][h].astype(np.uint8)
        values.append(psnr(ref, art))
    return values


def compare(reference: np.ndarray, output: np.ndarray, samples, io: str,
            peak_activation: Optional[float] = None) -> Dict[str, object]:
    """Parity metrics of one artifact's outputs against the PyTorch reference (``peak_activation``:
    from :func:`reference_outputs_and_peak`, recorded for :func:`judge`)."""
    hole = samples.tensor_mask()[..., 0] > 0.5  # (N, H, W)
    ref_comp = composite_pixels(reference, samples)
    details: Dict[str, object] = {}
    if peak_activation is not None:
        details["reference_peak_activation"] = round(float(peak_activation), 3)
    if io == "tensor":
        out = output.astype(np.float32)
        err = np.abs(out - reference)
        art_comp = composite_pixels(out, samples)
    else:
        art_comp = output.astype(np.uint8)
        err = np.abs(art_comp.astype(np.float32) - ref_comp.astype(np.float32)) / PIXEL_SCALE
        known = ~hole
        changed = np.any(art_comp != samples.images, axis=-1) & known
        details["known_pixels_changed"] = int(changed.sum())
    hole_psnrs = [psnr(ref_comp[i][hole[i]], art_comp[i][hole[i]]) for i in range(len(samples))]
    comp_psnrs = [psnr(ref_comp[i], art_comp[i]) for i in range(len(samples))]
    details["hole_psnr_db_per_sample"] = [round(v, 3) for v in hole_psnrs]
    details["max_abs_8bit_levels"] = int(np.max(np.abs(ref_comp.astype(np.int16) - art_comp.astype(np.int16))))
    return {
        "max_abs": float(err.max()),
        "mean_abs": float(err.mean()),
        "hole_psnr_db": round(float(min(hole_psnrs)), 3),
        "composite_psnr_db": round(float(min(comp_psnrs)), 3),
        "details": details,
    }


def judge(metrics: Dict[str, object], tolerance: Dict[str, float]) -> Tuple[bool, str]:
    """(passed, reason): the reason names each violated limit and by how much."""
    problems = []
    details = metrics.get("details", {})
    limit = max_abs_limit(tolerance, details.get("reference_peak_activation"))
    if limit is not None and metrics["max_abs"] > limit:
        scaled = "" if limit == tolerance["max_abs"] else (
            f" (= {tolerance['max_abs_per_peak_activation']:.3g} x peak activation "
            f"{details['reference_peak_activation']:.4g})")
        problems.append(f"max abs error {metrics['max_abs']:.3g} > {limit:.3g}{scaled} "
                        f"(by {metrics['max_abs'] - limit:.3g})")
    if "min_hole_psnr_db" in tolerance and metrics["hole_psnr_db"] < tolerance["min_hole_psnr_db"]:
        value, least = metrics["hole_psnr_db"], tolerance["min_hole_psnr_db"]
        # two decimals unless they would read equal ("38.00 dB < 38.00 dB"): the gate keeps three
        digits = 2 if round(value, 2) < round(least, 2) else 3
        problems.append(f"hole PSNR {value:.{digits}f} dB < {least:.{digits}f} dB "
                        f"(short by {least - value:.{digits}f} dB)")
    changed = details.get("known_pixels_changed")
    if "max_known_pixels_changed" in tolerance and changed is not None and changed > tolerance["max_known_pixels_changed"]:
        problems.append(f"{changed} known pixels changed (allowed {int(tolerance['max_known_pixels_changed'])})")
    return (not problems), "; ".join(problems)
