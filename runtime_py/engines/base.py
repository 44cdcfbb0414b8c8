"""The engine interface: one fixed-shape inpainting model behind a Polygraphy-style runner.

Life cycle: ``activate()`` checks an exported artifact against its manifest entry
(sha256 and size, :func:`runtime_py.manifest.check_artifact`; skipped only with
``verify=False``) and opens the model (lazily, on first use); ``infer(feed)`` checks the
feed against the declared inputs, calls ``infer_impl`` and refuses outputs holding NaN or
Inf; ``deactivate()`` releases it. Each engine knows its fixed input shape, layout (NHWC / NCHW) and I/O
signature (``tensor`` or ``image``) and hides them behind :meth:`Engine.inpaint`, the only
call the pipeline makes:

    pred = engine.inpaint(image, hole)
      image: (rows, cols, 3) uint8 RGB at the engine's shape
      hole:  (rows, cols) bool, True = hole
      pred:  (rows, cols, 3) float32 RGB in [0, 255]; only hole pixels are meaningful
             (tensor engines return the raw generator output there, image engines the
             model's own composite, which equals the prediction inside the hole).

Signatures: :mod:`runtime_py.contract` (encoding and decoding are its :func:`~runtime_py.contract.encode`
and :func:`~runtime_py.contract.decode`; docs/MANIFEST.md describes the same).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..contract import decode, encode, layout_of
from ..errors import UserError

Shape = Tuple[int, int]


@dataclass(frozen=True)
class TensorSpec:
    """A declared input or output: name, full shape (batch included), numpy dtype name,
    role (image | mask | output) and quantization (scale, zero_point) or None."""

    name: str
    shape: Tuple[int, ...]
    dtype: str
    role: str
    quantization: Optional[Tuple[float, int]] = None


def role_of(name: str, index: int) -> str:
    n = name.lower()
    if "mask" in n:
        return "mask"
    if "image" in n or "img" in n or "input" in n:
        return "image"
    return "image" if index == 0 else "mask"


class Engine:
    """Base class. Subclasses set ``name`` and implement ``activate_impl`` (which fills ``_inputs`` and
    ``_outputs``, or overrides ``input_specs`` / ``output_specs``), ``infer_impl`` and ``deactivate_impl``."""

    name = "engine"
    path: str = ""  # the model file, where there is one
    artifact = None  # its runtime_py.manifest.Artifact entry, where it came from a manifest
    verify: bool = True  # check the file against ``artifact`` before opening it

    def __init__(self, shape: Shape, io: str = "tensor"):
        if io not in ("tensor", "image"):
            raise ValueError(f"io must be 'tensor' or 'image', got {io!r}")
        self.shape: Shape = (int(shape[0]), int(shape[1]))
        self.io = io
        self.is_active = False
        self.inference_times: List[float] = []  # seconds, one per infer()

    # ------------------------------------------------------------------ life cycle
    def activate(self) -> "Engine":
        if not self.is_active:
            if self.artifact is not None and self.verify:
                from ..manifest import check_artifact

                check_artifact(self.path, self.artifact)
            self.activate_impl()
            self.is_active = True
            self._check_declared_shape()
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()

    def activate_impl(self) -> None:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        pass

    # --------------------------------------------------------------- declarations
    _inputs: Sequence[TensorSpec] = ()  # what activate_impl declares, in the model's positional order
    _outputs: Sequence[TensorSpec] = ()

    def input_specs(self) -> Sequence[TensorSpec]:
        return self._inputs

    def output_specs(self) -> Sequence[TensorSpec]:
        return self._outputs

    @property
    def layout(self) -> str:
        return layout_of(self.spec_of_role("image").shape)

    def describe(self) -> str:
        return f"{self.name} {self.io} {self.shape[0]}x{self.shape[1]}"

    def spec_of_role(self, role: str) -> TensorSpec:
        self.activate()
        for s in self.input_specs():
            if s.role == role:
                return s
        raise UserError(f"{self.describe()}: no {role} input among {[s.name for s in self.input_specs()]}")

    def _check_declared_shape(self) -> None:
        spec = self.spec_of_role("image").shape
        hw = tuple(spec[1:3]) if layout_of(spec) == "NHWC" else tuple(spec[2:4])
        if tuple(int(v) for v in hw) != self.shape:
            raise UserError(f"{self.describe()}: the model's image input is {hw[0]}x{hw[1]}, "
                            f"not the {self.shape[0]}x{self.shape[1]} the manifest says")

    # -------------------------------------------------------------------- running
    def infer(self, feed: Dict[str, np.ndarray], check: bool = True) -> Dict[str, np.ndarray]:
        """Check ``feed`` against the declared inputs (names, shapes, dtypes), run, time it, refuse NaN/Inf
        outputs. ``check=False`` (a benchmark's timed runs, once a checked run passed) runs and times only."""
        self.activate()
        if check:
            self._check_feed(feed)
        t0 = time.perf_counter()
        out = self.infer_impl(feed)
        self.inference_times.append(time.perf_counter() - t0)
        if check:
            self._check_finite(out)
        return out

    def _check_feed(self, feed: Dict[str, np.ndarray]) -> None:
        specs = {s.name: s for s in self.input_specs()}
        if set(feed) != set(specs):
            raise UserError(f"{self.describe()}: feed names {sorted(feed)} != model inputs {sorted(specs)}")
        for name, arr in feed.items():
            s = specs[name]
            if tuple(arr.shape) != tuple(s.shape):
                raise UserError(f"{self.describe()}: input {name!r} has shape {tuple(arr.shape)}, expected {s.shape}")
            if arr.dtype != np.dtype(s.dtype):
                raise UserError(f"{self.describe()}: input {name!r} has dtype {arr.dtype}, expected {s.dtype}")

    def _check_finite(self, out: Dict[str, np.ndarray]) -> None:
        """A model that computes NaN or Inf (a damaged file, overflowing weights) must not yield an image."""
        for name, arr in out.items():
            arr = np.asarray(arr)
            if arr.dtype.kind not in "fc":
                continue
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if bad:
                source = self.path or self.describe()
                raise UserError(f"{self.name} engine: {source}: output {name!r} has {bad} NaN/Inf value(s) "
                                f"of {arr.size}; the model file is damaged or its arithmetic overflows")

    def infer_impl(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        raise NotImplementedError

    # ---------------------------------------------------------------- the pipeline's call
    def inpaint(self, image: np.ndarray, hole: np.ndarray) -> np.ndarray:
        """See the module docstring: (rows,cols,3) uint8 RGB + (rows,cols) bool -> (rows,cols,3) float32 [0,255]."""
        if image.dtype != np.uint8:
            raise ValueError(f"{self.describe()}: inpaint wants uint8 RGB, got {image.dtype}")
        out = self.infer(self.make_feed(image, hole))  # infer checks the shapes against the model's inputs
        return self.decode_output(out)

    def make_feed(self, image: np.ndarray, hole: np.ndarray) -> Dict[str, np.ndarray]:
        self.activate()  # the input specs are read from the model when it is activated
        feed = {}
        for s in self.input_specs():
            x = encode(s.role, self.io, image, hole)
            if layout_of(s.shape) == "NCHW":
                x = x.transpose(2, 0, 1)
            x = x[None]
            feed[s.name] = _to_dtype(np.ascontiguousarray(x), s)
        return feed

    def decode_output(self, out: Dict[str, np.ndarray]) -> np.ndarray:
        spec = self.output_specs()[0]
        y = np.asarray(out[spec.name])
        if spec.quantization:
            scale, zero = spec.quantization
            y = (y.astype(np.float32) - zero) * scale
        y = y[0]
        if y.shape[-1] != 3 and y.shape[0] == 3:  # CHW -> HWC
            y = y.transpose(1, 2, 0)
        return decode(y, self.io)


def _to_dtype(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Cast to the declared dtype, quantizing with (scale, zero_point) for integer inputs."""
    dt = np.dtype(spec.dtype)
    if x.dtype == dt:
        return x
    if spec.quantization and np.issubdtype(dt, np.integer) and x.dtype.kind == "f":
        scale, zero = spec.quantization
        info = np.iinfo(dt)
        return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dt)
    return x.astype(dt)
