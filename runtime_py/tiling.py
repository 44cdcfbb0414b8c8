"""Overlapping fixed-shape tiles for a pass larger than the engine (docs/PIPELINE.md, "Tiling").

Geometry along one axis of length P with tile length t and minimum overlap o:
  n = 1 if P <= t else ceil((P - o) / (t - o)); start_i = floor(i * (P - t) / (n - 1) + 0.5).
Core of tile i (the pixels it owns): from the middle of its overlap with tile i-1
(floor((start_i + end_{i-1}) / 2), or 0) to the middle of its overlap with tile i+1
(or P). Cores partition the pass. A tile runs only if its 2-D core holds a hole pixel.
Feather: on each side that overlaps a neighbour the weight ramps linearly over that
overlap, w(d) = (d + 0.5) / overlap for d < overlap (d = distance in px from the tile
edge), else 1; 2-D weight = w_rows * w_cols. The blended prediction is
sum(w * composite_tile) / sum(w) over the tiles that ran.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Tuple

import numpy as np

Shape = Tuple[int, int]


def axis_starts(length: int, tile: int, overlap: int) -> List[int]:
    if tile > length:
        raise ValueError(f"tile {tile} is longer than the pass {length}")
    if length == tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, {tile})")
    n = max(2, math.ceil((length - overlap) / (tile - overlap)))
    return [int(math.floor(i * (length - tile) / (n - 1) + 0.5)) for i in range(n)]


def axis_cores(starts: List[int], tile: int, length: int) -> List[Tuple[int, int]]:
    cores = []
    for i, s in enumerate(starts):
        lo = 0 if i == 0 else (s + starts[i - 1] + tile) // 2
        hi = length if i == len(starts) - 1 else (starts[i + 1] + s + tile) // 2
        cores.append((lo, hi))
    return cores


def axis_weights(starts: List[int], tile: int) -> List[np.ndarray]:
    ws = []
    d = np.arange(tile, dtype=np.float32)
    for i, s in enumerate(starts):
        w = np.ones(tile, np.float32)
        if i > 0:
            ov = starts[i - 1] + tile - s
            if ov > 0:
                w = np.minimum(w, (d + 0.5) / ov)
        if i < len(starts) - 1:
            ov = s + tile - starts[i + 1]
            if ov > 0:
                w = np.minimum(w, (tile - 1 - d + 0.5) / ov)
        ws.append(w)
    return ws


@dataclass
class Tile:
    row: int
    col: int
    top: int
    left: int
    core: Tuple[int, int, int, int]  # top, left, bottom, right in pass pixels
    weight: np.ndarray = field(repr=False)  # (th, tw) float32
    has_hole: bool = False


def plan_tiles(hole: np.ndarray, tile_shape: Shape, overlap: int) -> List[Tile]:
    P_r, P_c = hole.shape
    t_r, t_c = tile_shape
    rs, cs = axis_starts(P_r, t_r, overlap), axis_starts(P_c, t_c, overlap)
    rcore, ccore = axis_cores(rs, t_r, P_r), axis_cores(cs, t_c, P_c)
    rw, cw = axis_weights(rs, t_r), axis_weights(cs, t_c)
    tiles = []
    for i, r in enumerate(rs):
        for j, c in enumerate(cs):
            core = (rcore[i][0], ccore[j][0], rcore[i][1], ccore[j][1])
            has = bool(hole[core[0]:core[2], core[1]:core[3]].any())
            tiles.append(Tile(i, j, r, c, core, np.outer(rw[i], cw[j]).astype(np.float32), has))
    return tiles


def run_tiled(image: np.ndarray, hole: np.ndarray, tile_shape: Shape, overlap: int,
              run_tile: Callable[[Tile, np.ndarray, np.ndarray], np.ndarray]):
    """Blend per-tile composites over a pass.

    image: (P_r,P_c,3) uint8 RGB (the pass input, known context everywhere outside ``hole``);
    hole: (P_r,P_c) bool; run_tile(tile, image_tile, hole_tile) -> (t_r,t_c,3) uint8 composite.
    Returns (composite (P_r,P_c,3) uint8, tiles) with composite = image outside the hole.
    """
    from .geometry import round_to_u8

    tiles = plan_tiles(hole, tile_shape, overlap)
    t_r, t_c = tile_shape
    acc = np.zeros(image.shape, np.float32)
    wsum = np.zeros(hole.shape, np.float32)
    for t in tiles:
        if not t.has_hole:
            continue
        sl = (slice(t.top, t.top + t_r), slice(t.left, t.left + t_c))
        comp = run_tile(t, image[sl], hole[sl])
        acc[sl] += comp.astype(np.float32) * t.weight[:, :, None]
        wsum[sl] += t.weight
    out = image.copy()
    covered = hole & (wsum > 0)
    blended = acc[covered] / wsum[covered][:, None]
    out[covered] = round_to_u8(blended)
    return out, tiles
