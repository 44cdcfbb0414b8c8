"""Inpainting quality on real photos with recorded-seed masks: PSNR/SSIM over the hole and a band around it.

A case is (photo, mask kind, size class, seed); the mask is
``runtime_py.masks.make_mask(kind, H, W, seed, size)`` at the photo's full
resolution, so any case can be regenerated from its row in the CSV. Every method
sees the same image and mask and returns a full-resolution (H, W, 3) uint8 RGB
result; scores come from ``runtime_py.metrics.region_scores`` against the
original photo (hole, ``band`` px each side of the hole boundary, whole image).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np

KINDS = ("strokes", "blob", "rect")
SIZES = ("small", "medium", "large")
SEED_BASE = 7000
BAND_PX = 8
SCORE_KEYS = ("hole_psnr", "hole_ssim", "band_psnr", "band_ssim", "psnr", "ssim")


@dataclass(frozen=True)
class Case:
    photo: str  # path
    kind: str
    size: str
    seed: int


def make_cases(photos: Sequence[str], kinds: Sequence[str] = KINDS, sizes: Sequence[str] = SIZES,
               per_cell: int = 1) -> List[Case]:
    """``per_cell`` cases for every kind x size; photos are taken in turn so cells see different photos.

    A case's photo and seed depend only on its cell (kind, size, j) -- not on which other cells
    are asked for -- so runs restricted to some kinds or sizes score the very same cases:
    cell index i = (KINDS.index(kind) * len(SIZES) + SIZES.index(size)) * per_cell + j,
    seed = SEED_BASE + i, photo = photos[i % len(photos)]."""
    if not photos:
        return []
    cases = []
    for kind, size, j in itertools.product(kinds, sizes, range(per_cell)):
        i = (KINDS.index(kind) * len(SIZES) + SIZES.index(size)) * per_cell + j
        cases.append(Case(str(photos[i % len(photos)]), kind, size, SEED_BASE + i))
    return cases


Method = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class MethodSpec:
    """A named method and the table group it belongs to (mode / precision / classical)."""

    name: str
    group: str
    fn: Method
    mode: str = ""
    precision: str = ""


def evaluate(cases: Iterable[Case], methods: Sequence[MethodSpec], load_image: Callable[[str], np.ndarray],
             progress: Optional[Callable[[str], None]] = None, band: int = BAND_PX,
             should_stop: Optional[Callable[[], bool]] = None) -> List[dict]:
    """Every method on every case; one row per (case, method) with scores and seconds.

    A method that raises gets a row with ``error`` instead of scores. ``should_stop`` is asked
    before each case; when it says True the remaining cases are left out."""
    from runtime_py.masks import make_mask
    from runtime_py.metrics import region_scores

    rows = []
    for case in cases:
        if should_stop is not None and should_stop():
            break
        image = load_image(case.photo)
        mask = make_mask(case.kind, image.shape[0], image.shape[1], seed=case.seed, size=case.size)
        for m in methods:
            if progress:
                progress(f"{m.name} on {case.kind}/{case.size} #{case.seed}")
            row = {"photo": case.photo.rsplit("/", 1)[-1], "rows": image.shape[0], "cols": image.shape[1],
                   "kind": case.kind, "size": case.size, "seed": case.seed, "hole_fraction": float(mask.mean()),
                   "method": m.name, "group": m.group, "mode": m.mode, "precision": m.precision}
            t0 = time.perf_counter()
            try:
                result = m.fn(image, mask)
            except Exception as exc:  # reported per row; the other methods still run
                row.update(error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - t0)
                rows.append(row)
                continue
            row["seconds"] = time.perf_counter() - t0
            if result.shape != image.shape or result.dtype != np.uint8:
                row["error"] = f"result {result.shape} {result.dtype}, expected {image.shape} uint8"
            else:
                row["unmasked_identical"] = bool(np.array_equal(result[mask == 0], image[mask == 0]))
                row.update({k: float(v) for k, v in region_scores(image, result, mask, band=band).items()})
            rows.append(row)
    return rows


def _mean(values: List[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summarize(rows: Sequence[dict], by: Sequence[str] = ("method", "kind", "size")) -> List[dict]:
    """Mean of every score over the rows sharing the ``by`` keys (rows with errors left out, counted)."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k, "") for k in by), []).append(r)
    out = []
    for key, members in groups.items():
        ok = [r for r in members if "error" not in r]
        entry = dict(zip(by, key))
        entry["n"] = len(ok)
        entry["errors"] = len(members) - len(ok)
        for k in SCORE_KEYS + ("seconds",):
            entry[k] = _mean([r[k] for r in ok if k in r])
        first = members[0]
        for k in ("group", "mode", "precision"):
            if k not in entry:
                entry[k] = first.get(k, "")
        out.append(entry)
    return out


def resize_method(fn: Method, max_pixels: int) -> Method:
    """Run ``fn`` on a copy shrunk to at most ``max_pixels`` (INTER_AREA image, nearest mask re-binarized),
    upscale its result bicubically and composite it into the hole at full resolution."""
    import cv2

    def run(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        if h * w <= max_pixels:
            return fn(image, mask)
        s = np.sqrt(max_pixels / (h * w))
        size = (max(1, int(w * s)), max(1, int(h * s)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        small_mask = (cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_AREA) > 0).astype(np.uint8)
        if not small_mask.any():
            small_mask = (cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_LINEAR) > 0).astype(np.uint8)
        up = cv2.resize(fn(small, small_mask), (w, h), interpolation=cv2.INTER_CUBIC)
        out = image.copy()
        out[mask > 0] = up[mask > 0]
        return out

    return run
