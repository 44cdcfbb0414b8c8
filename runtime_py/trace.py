"""Stage trace: every intermediate image/mask of a pipeline run, for debugging and for checking a port.

``Trace(dir)`` writes each stage as it happens: ``NN_name.png`` (what a person looks
at: masks as 0/255, images as RGB) and ``NN_name.npy`` (the exact array: uint8 RGB
(H,W,3), bool masks (H,W), float32 predictions in [0,255]), and at the end
``index.json`` listing ``{index, name, png, npy, shape, dtype, min, max, note}``
in order. Stage names are unique within a run. ``Trace(None)`` records nothing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from .contract import mask_pixels


class Trace:
    def __init__(self, directory: Optional[str] = None):
        self.dir = Path(directory) if directory else None
        self.entries = []
        self.seconds = 0.0  # time spent writing, reported as the pipeline's "trace" stage
        if self.dir is not None:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                from .errors import UserError

                raise UserError(f"{self.dir}: cannot create the trace directory ({exc.strerror})") from None

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def add(self, name: str, array: np.ndarray, note: str = "") -> None:
        if self.dir is None:
            return
        if any(e["name"] == name for e in self.entries):
            raise ValueError(f"trace stage name {name!r} used twice; stage names must be unique")
        import time

        t0 = time.perf_counter()
        self._write(name, array, note)
        self.seconds += time.perf_counter() - t0

    def _write(self, name: str, array: np.ndarray, note: str) -> None:
        from .geometry import round_to_u8
        from .imageio import write_rgb

        i = len(self.entries)
        stem = f"{i:02d}_{name}"
        a = np.asarray(array)
        np.save(self.dir / f"{stem}.npy", a)
        if a.dtype == bool:
            view = mask_pixels(a)
        elif a.dtype == np.uint8:
            view = a
        else:
            view = round_to_u8(a)
        write_rgb(self.dir / f"{stem}.png", np.ascontiguousarray(view))
        self.entries.append({
            "index": i, "name": name, "png": f"{stem}.png", "npy": f"{stem}.npy",
            "shape": list(a.shape), "dtype": str(a.dtype),
            "min": float(a.min()) if a.size else 0.0, "max": float(a.max()) if a.size else 0.0,
            "note": note,
        })

    def finish(self, summary: Optional[dict] = None) -> None:
        if self.dir is None:
            return
        body = {"stages": self.entries, "summary": summary or {}}
        (self.dir / "index.json").write_text(json.dumps(body, indent=2))
