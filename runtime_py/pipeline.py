"""The high-resolution inpainting pipeline the app runs, over any engine (docs/PIPELINE.md is its spec).

    result = Pipeline(engines, PipelineConfig(mode="two-step")).run(image, hole)
      image: (H,W,3) uint8 RGB at full resolution, any size
      hole:  (H,W) bool, True = pixel to fill
      result.image: (H,W,3) uint8 RGB; pixels where ``hole`` is False are the input's, bit for bit.

Order of operations: empty-mask shortcut -> portrait rotation -> context crop ->
pass 1 at the model shape S1 (baseline, or shrinking mask) -> [two-step: pass 2 at
S2 = 2 x S1 on the ring "mask minus its erosion", whole or tiled] -> upscale to the
working size -> composite into the original -> paste the crop back -> rotate back.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .errors import UserError
from .geometry import (Window, context_window, copy_where, erode, mask_bbox, needs_rotation, resample_target,
                       resize_image, resize_image_part, resize_mask, rotate_in, rotate_out, rotated_back, round_to_u8,
                       scaled_radius)
from .tiling import run_tiled
from .trace import Trace

Shape = Tuple[int, int]
MODES = ("baseline", "shrink", "two-step", "two-step+shrink")
TRISTATE = ("auto", "off", "on")

#: Reference sizes the pixel parameters are quoted at; other model shapes scale them by rows.
S1_REFERENCE_ROWS = 512
S2_REFERENCE_ROWS = 1024


@dataclass(frozen=True)
class PipelineConfig:
    """Every knob of the pipeline. Pixel sizes are quoted at the reference shapes
    (512x680 for pass 1, 1024x1360 for pass 2) and scaled by the model's row count.
    Checked once, when made (:meth:`validate`); frozen, so it stays valid."""

    mode: str = "baseline"
    tiles: str = "auto"  # pass 2: auto = whole if an S2 engine exists, else tiles; on = always tiles; off = never
    crop: str = "auto"  # auto = crop when the context window is smaller than the image
    shrink_radius: float = 8.0  # px at 512 rows: ellipse (2r+1)^2 eroded per shrink step
    shrink_max_steps: int = 4  # most model runs of a shrinking-mask pass
    ring_radius: float = 16.0  # px at 1024 rows: two-step ring = mask minus its erosion by this ellipse
    tile_overlap: float = 64.0  # px at 1024 rows: minimum overlap between neighbouring tiles
    crop_margin_frac: float = 0.5  # context margin around the mask bbox, as a fraction of its larger side
    crop_min_margin: int = 32  # ... and at least this many full-resolution px

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        for name in ("tiles", "crop"):
            if getattr(self, name) not in TRISTATE:
                raise UserError(f"--{name} must be auto, off or on, not {getattr(self, name)!r}")
        if self.shrink_max_steps < 1:
            raise UserError("shrink_max_steps must be at least 1")

    @property
    def shrink(self) -> bool:
        return self.mode in ("shrink", "two-step+shrink")

    @property
    def two_step(self) -> bool:
        return self.mode.startswith("two-step")


@dataclass
class ModelRun:
    label: str
    shape: Shape
    seconds: float


@dataclass
class PipelineStats:
    runs: List[ModelRun] = field(default_factory=list)
    tiles_run: int = 0
    tiles_skipped: int = 0
    stage_seconds: Dict[str, float] = field(default_factory=dict)
    rotated: bool = False
    window: Optional[List[int]] = None  # [top, left, bottom, right] in (rotated) full-res pixels, None = no crop
    passes: List[dict] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model_runs"] = len(self.runs)
        return d


@dataclass
class PipelineResult:
    image: np.ndarray  # (H,W,3) uint8 RGB
    stats: PipelineStats


def shrink_masks(hole: np.ndarray, radius: int, max_steps: int) -> List[np.ndarray]:
    """M_0 = hole, M_k = erode(M_{k-1}, radius); keeps the non-empty ones, at most ``max_steps``,
    stopping early when an erosion leaves the mask unchanged."""
    masks = [hole]
    while len(masks) < max_steps:
        nxt = erode(masks[-1], radius)
        if not nxt.any() or np.array_equal(nxt, masks[-1]):
            break
        masks.append(nxt)
    return masks if hole.any() else []


def ring_mask(hole: np.ndarray, radius: int) -> np.ndarray:
    """Two-step pass-2 mask: hole AND NOT erode(hole, radius). Regions thinner than the
    kernel vanish under the erosion and so stay whole."""
    return hole & ~erode(hole, radius)


class Pipeline:
    """One configured pipeline over an :class:`runtime_py.engines.EngineSet`."""

    def __init__(self, engines, config: Optional[PipelineConfig] = None, trace: Optional[Trace] = None,
                 progress: Optional[Callable[[int, ModelRun], None]] = None):
        self.engines = engines
        self.config = config or PipelineConfig()
        self.trace = trace or Trace(None)
        self.progress = progress

    # ------------------------------------------------------------------ helpers
    @contextmanager
    def _stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stats.stage_seconds[name] = self.stats.stage_seconds.get(name, 0.0) + time.perf_counter() - t0

    def _model(self, engine, image: np.ndarray, hole: np.ndarray, label: str) -> np.ndarray:
        """One model run; returns the composite (uint8): prediction inside ``hole``, ``image`` elsewhere."""
        t0 = time.perf_counter()
        pred = engine.inpaint(image, hole)
        dt = time.perf_counter() - t0
        self.stats.stage_seconds["model"] = self.stats.stage_seconds.get("model", 0.0) + dt
        run = ModelRun(label, tuple(engine.shape), dt)
        self.stats.runs.append(run)
        if self.progress:
            self.progress(len(self.stats.runs), run)
        slug = label.replace(" ", "_").replace("/", "of").replace(",", "")
        self.trace.add(f"{slug}_model_mask", hole, f"model input mask of {label}")
        self.trace.add(f"{slug}_prediction", pred, f"model output of {label}, float RGB [0,255]")
        with self._stage("composite"):
            comp = np.where(hole[:, :, None], round_to_u8(pred), image)
        self.trace.add(f"{slug}_composite", comp, "prediction inside the mask, model input elsewhere")
        return comp

    # ------------------------------------------------------------------- passes
    def _pass1(self, work: np.ndarray, hole: np.ndarray) -> np.ndarray:
        s1 = self.engines.base_shape
        with self._stage("resize"):
            img1 = resize_image(work, s1)
            hole1 = resize_mask(hole, s1)
        self.trace.add("pass1_image", img1, f"working image resized to {s1[0]}x{s1[1]}")
        self.trace.add("pass1_mask", hole1, "working mask resized, coverage > 0 = hole")
        engine = self.engines.get(s1)
        if self.config.shrink:
            radius = scaled_radius(self.config.shrink_radius, s1[0], S1_REFERENCE_ROWS)
            with self._stage("morphology"):
                masks = shrink_masks(hole1, radius, self.config.shrink_max_steps)
            self.stats.passes.append({"pass": 1, "shape": list(s1), "shrink_radius": radius, "runs": len(masks)})
        else:
            masks = [hole1]
            self.stats.passes.append({"pass": 1, "shape": list(s1), "runs": 1})
        x = img1
        for k, m in enumerate(masks):
            label = f"pass1 step {k + 1}/{len(masks)}" if len(masks) > 1 else "pass1"
            x = self._model(engine, x, m, label)
        return x

    @property
    def _pass2_shape(self) -> Tuple[int, int]:
        s1 = self.engines.base_shape
        return (2 * s1[0], 2 * s1[1])

    def _pass2(self, work: np.ndarray, hole: np.ndarray, step1: np.ndarray) -> np.ndarray:
        s1, s2 = self.engines.base_shape, self._pass2_shape
        with self._stage("resize"):
            img2 = resize_image(work, s2)
            hole2 = resize_mask(hole, s2)
            up1 = resize_image(step1, s2)
        stitched = np.where(hole2[:, :, None], up1, img2)
        radius = scaled_radius(self.config.ring_radius, s2[0], S2_REFERENCE_ROWS)
        with self._stage("morphology"):
            ring = ring_mask(hole2, radius)
        self.trace.add("pass2_image", img2, f"working image resized to {s2[0]}x{s2[1]}")
        self.trace.add("pass2_mask", hole2, "working mask resized to pass 2")
        self.trace.add("pass2_step1_upscaled", up1, "pass-1 composite upscaled to pass 2")
        self.trace.add("pass2_stitched", stitched, "upscaled pass 1 inside the mask, downscaled original elsewhere")
        self.trace.add("pass2_ring", ring, f"mask minus its erosion (ellipse radius {radius})")
        info = {"pass": 2, "shape": list(s2), "ring_radius": radius}
        self.stats.passes.append(info)
        if not ring.any():
            info["runs"] = 0
            return stitched
        tiles = self.config.tiles
        if tiles == "off" or (tiles == "auto" and self.engines.has(s2)):
            info.update(tiled=False, runs=1)
            return self._model(self.engines.get(s2), stitched, ring, "pass2")
        overlap = scaled_radius(self.config.tile_overlap, s2[0], S2_REFERENCE_ROWS)
        engine = self.engines.get(s1)

        def run_tile(tile, img_t, hole_t):
            return self._model(engine, img_t, hole_t, f"pass2 tile r{tile.row}c{tile.col}")

        out, plan = run_tiled(stitched, ring, s1, overlap, run_tile)
        ran = sum(t.has_hole for t in plan)
        self.stats.tiles_run += ran
        self.stats.tiles_skipped += len(plan) - ran
        info.update(tiled=True, tile_shape=list(s1), overlap=overlap, tiles=len(plan), runs=ran,
                    tile_grid=[{"top": t.top, "left": t.left, "core": list(t.core), "ran": t.has_hole} for t in plan])
        self.trace.add("pass2_tiles_blended", out, f"{ran} of {len(plan)} tiles ran, feathered blend")
        return out

    # --------------------------------------------------------------------- run
    def run(self, image: np.ndarray, hole: np.ndarray) -> PipelineResult:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H,W,3) uint8 RGB, got {image.shape} {image.dtype}")
        if hole.shape != image.shape[:2]:  # the one check of the mask's size (the engines check model inputs)
            raise UserError(f"the mask is {hole.shape[1]}x{hole.shape[0]} but the image is "
                            f"{image.shape[1]}x{image.shape[0]} (after EXIF orientation); they must be the same size")
        hole = hole.astype(bool)
        self.stats = PipelineStats()
        t_start = time.perf_counter()
        self.trace.add("input", image, "full-resolution RGB input")
        self.trace.add("mask", hole, "binarized (and dilated) hole mask")
        if not hole.any():
            self.stats.warnings.append("the mask is empty: the image is returned unchanged, no model was run")
            self.trace.finish(self.stats.to_dict())
            return PipelineResult(image.copy(), self.stats)
        if hole.all():
            self.stats.warnings.append("the mask covers the whole image: the model has no context and invents everything")

        s1 = self.engines.base_shape
        work, work_hole = image, hole
        if needs_rotation(image.shape, s1):
            self.stats.rotated = True
            with self._stage("orientation"):
                work, work_hole = rotate_in(image), rotate_in(hole)
            self.trace.add("rotated", work, "portrait rotated 90 degrees clockwise to landscape")
        full, full_hole = work, work_hole

        window = self._window(full_hole)
        if window is not None:
            self.stats.window = window.as_list()
            work, work_hole = full[window.slices], full_hole[window.slices]
            self.trace.add("crop_image", work, f"context window {window.as_list()}")
            self.trace.add("crop_mask", work_hole, "mask inside the context window")

        # The last resize's float32 target (126 MB for a 12 MP crop) is written here, before the model
        # runs: first touches of fresh memory right after a model run took 40-250 ms on the measured
        # machine, 25-30 ms mostly before one. A TFLite engine's memory stays while the run lasts, so
        # the target would lie next to it anyway: the peak RSS of a 12 MP baseline run is the same
        # (1,716 MiB both ways; docs/PIPELINE.md); an engine that frees memory after each run (torch)
        # can peak higher by up to the target's size.
        fits = work.shape[0] <= s1[0] and work.shape[1] <= s1[1]
        last_from = self._pass2_shape if self.config.two_step and not fits else s1
        with self._stage("resize"):
            target = resample_target(last_from, work.shape[:2])
        top = self._pass1(work, work_hole)
        if self.config.two_step:
            if fits:
                self.stats.passes.append({"pass": 2, "skipped": "pass 1 already ran at full resolution"})
            else:
                top = self._pass2(work, work_hole, top)

        # Only hole pixels leave this stage, so only the hole's bounding box is rounded and written:
        # result = where(hole, rotate_out(paste(window, where(work_hole, up, work))), image), computed
        # on the box (docs/PIPELINE.md "Back to full resolution").
        box = mask_bbox(work_hole)
        with self._stage("resize"):
            up_box = resize_image_part(top, work.shape[:2], box, target)
            del target
        if self.trace.enabled:
            self.trace.add("upscaled", resize_image(top, work.shape[:2]),
                           f"last composite resized to {work.shape[0]}x{work.shape[1]}")
        with self._stage("composite"):
            hole_box = work_hole[box.slices]
            at = box if window is None else Window(window.top + box.top, window.left + box.left,
                                                   window.top + box.bottom, window.left + box.right)
            if self.stats.rotated:  # back to the input's orientation: the box, its pixels and its mask
                up_box, hole_box = rotate_out(up_box), rotate_out(hole_box)
                at = rotated_back(at, image.shape[0])
            result = image.copy()
            copy_where(result[at.slices], up_box, hole_box)
        self.trace.add("output", result, "final: input outside the mask, pipeline result inside")
        if self.trace.enabled:
            self.stats.stage_seconds["trace"] = self.trace.seconds
        self.stats.stage_seconds["total"] = time.perf_counter() - t_start
        self.trace.finish(self.stats.to_dict())
        return PipelineResult(np.ascontiguousarray(result), self.stats)

    def _window(self, hole: np.ndarray) -> Optional[Window]:
        if self.config.crop == "off":
            return None
        w = context_window(hole, self.engines.base_shape, self.config.crop_margin_frac, self.config.crop_min_margin)
        smaller = w.shape[0] < hole.shape[0] or w.shape[1] < hole.shape[1]
        # "on" keeps the window even when it is the whole image (a no-op crop, still reported)
        return w if (smaller or self.config.crop == "on") else None
