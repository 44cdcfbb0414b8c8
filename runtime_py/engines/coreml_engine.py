"""Core ML engine for ``.mlpackage`` artifacts.

On macOS it runs real Core ML through ``coremltools`` (imported lazily). Elsewhere
Core ML cannot predict; a reference executor (a Python re-implementation of the
Core ML program) can be plugged in with :func:`register_reference_executor`, and is
used when present. Without one, activating the engine raises a UserError saying so.

Tensor I/O: inputs NCHW float32 (``image`` (1,3,H,W) [-1,1], ``mask`` (1,1,H,W));
image I/O: Core ML images (RGB image, grey mask 255 = hole) -> RGB image.
"""
from __future__ import annotations

import os
import platform
from typing import Callable, Dict, Optional

import numpy as np

from ..contract import layout_for, signature_infos
from ..errors import UserError
from .base import Engine, TensorSpec, role_of

#: factory(path) -> object with ``predict(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]``
_reference_executor: Optional[Callable] = None


def register_reference_executor(factory: Optional[Callable]) -> None:
    """Plug in (or, with None, remove) the off-macOS Core ML executor."""
    global _reference_executor
    _reference_executor = factory


def _default_reference_executor() -> Callable:
    """The NumPy reference executor for ML programs (runtime_py.mil_executor); loading needs coremltools."""
    from ..mil_executor import load_mlpackage

    return load_mlpackage


class CoreMLEngine(Engine):
    name = "coreml"

    def __init__(self, path: os.PathLike, artifact=None, shape=None, io: str = "tensor", verify: bool = True,
                 reference: Optional[bool] = None, compute_units: str = "ALL", executor_mode: Optional[str] = None):
        """``reference``: None runs real Core ML on macOS and the reference executor elsewhere; True the
        reference executor everywhere (to compare it with Core ML); False real Core ML only (macOS), on
        ``compute_units`` (a ``coremltools.ComputeUnit`` name: ALL, CPU_ONLY, CPU_AND_GPU, CPU_AND_NE).
        ``executor_mode``: the NumPy reference executor's path, ``fast`` or ``exact``
        (runtime_py.mil_executor; None: $GMCNN_MIL_EXECUTOR, else fast); ignored by a registered executor."""
        self.compute_units = compute_units
        self.executor_mode = executor_mode
        self.path = str(path)
        self.artifact = artifact
        self.verify = verify
        self.reference = (platform.system() != "Darwin") if reference is None else bool(reference)
        if artifact is not None:
            shape, io = (artifact.height, artifact.width), artifact.io
        if shape is None:
            raise UserError(f"{self.path}: the Core ML engine needs the artifact's manifest entry (use --artifacts DIR)")
        super().__init__(shape, io=io)

    def activate_impl(self) -> None:
        if not os.path.exists(self.path):
            raise UserError(f"{self.path}: Core ML package not found")
        if not self.reference:
            if platform.system() != "Darwin":
                raise UserError(f"{self.path}: Core ML predict runs only on macOS (use the reference executor)")
            from ..mil_executor import import_coremltools

            ct = import_coremltools("the coreml engine")
            self.model = ct.models.MLModel(self.path, compute_units=getattr(ct.ComputeUnit, self.compute_units))
            self._predict = self._predict_coreml
        else:
            if _reference_executor is not None:
                self.model = _reference_executor(self.path)
            else:
                self.model = _default_reference_executor()(self.path, mode=self.executor_mode)
            self._predict = self.model.predict
        # Core ML images are fed as arrays: (1,H,W,3) RGB and (1,H,W,1) mask, uint8, as the manifest lists them
        if self.artifact is not None:
            inputs, outputs = self.artifact.inputs, self.artifact.outputs
        else:
            inputs, outputs = signature_infos(self.io, self.shape, layout_for("coreml", self.io))
        self._inputs = [TensorSpec(t.name, tuple(t.shape), t.dtype, t.role or role_of(t.name, i))
                        for i, t in enumerate(inputs)]
        self._outputs = [TensorSpec(t.name, tuple(t.shape), t.dtype, "output") for t in outputs]

    def _predict_coreml(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if self.io == "image":
            from PIL import Image

            roles = {s.name: s.role for s in self._inputs}
            pil = {k: Image.fromarray(v[0] if v.shape[-1] == 3 else v[0, :, :, 0],
                                      "RGB" if roles[k] == "image" else "L") for k, v in feed.items()}
            out = self.model.predict(pil)
            return {k: np.asarray(v)[None] for k, v in out.items()}
        return {k: np.asarray(v) for k, v in self.model.predict(feed).items()}

    def deactivate_impl(self) -> None:
        self.model = None

    def infer_impl(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return self._predict(feed)

    def describe(self) -> str:
        return f"coreml {self.shape[0]}x{self.shape[1]} ({os.path.basename(self.path)})"
