"""ONNX Runtime engine for a fixed-shape ``.onnx`` export (CPU execution provider).

Inputs are matched to roles by name (``mask`` in the name -> mask, else image), or by
the manifest's TensorInfo roles when a manifest artifact is given (then the file is
checked against the entry's sha256 and size first, unless ``verify=False``).
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np

from ..errors import MissingDependencyError, UserError
from .base import Engine, TensorSpec, role_of

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8",
              "tensor(int8)": "int8"}


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    def __init__(self, path: os.PathLike, shape=None, io: str = "tensor", threads: Optional[int] = None,
                 roles: Optional[Dict[str, str]] = None, artifact=None, verify: bool = True):
        self.path = str(path)
        self.threads = threads
        self.artifact = artifact
        self.verify = verify
        if artifact is not None:
            shape, io = (artifact.height, artifact.width), artifact.io
            roles = {t.name: t.role for t in artifact.inputs if t.role}
        self.roles = roles or {}
        if shape is None:
            shape = _shape_from_file(self.path)
        super().__init__(shape, io=io)

    def activate_impl(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("onnxruntime", "runtime", "the onnxruntime engine") from None
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(self.path, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise UserError(f"{self.path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
        self._inputs = [self._spec_of(a, i) for i, a in enumerate(self.session.get_inputs())]
        self._outputs = [TensorSpec(a.name, tuple(a.shape), _ORT_TYPES.get(a.type, "float32"), "output")
                         for a in self.session.get_outputs()]

    def _spec_of(self, arg, index: int) -> TensorSpec:
        if any(not isinstance(d, int) for d in arg.shape):
            raise UserError(f"{self.path}: input {arg.name!r} has a dynamic shape {arg.shape}; export a fixed shape")
        role = self.roles.get(arg.name) or role_of(arg.name, index)
        return TensorSpec(arg.name, tuple(arg.shape), _ORT_TYPES.get(arg.type, "float32"), role)

    def deactivate_impl(self) -> None:
        self.session = None

    def infer_impl(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        names = [o.name for o in self._outputs]
        return dict(zip(names, self.session.run(names, feed)))

    def describe(self) -> str:
        return f"onnxruntime {self.shape[0]}x{self.shape[1]} ({os.path.basename(self.path)})"


def _shape_from_file(path: str):
    """(rows, cols) of the image input, read with onnxruntime (no onnx package needed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("onnxruntime", "runtime", "the onnxruntime engine") from None
    if not os.path.isfile(path):
        raise UserError(f"{path}: ONNX file not found")
    try:
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise UserError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
    for i, a in enumerate(sess.get_inputs()):
        if role_of(a.name, i) == "image":
            s = a.shape
            if not all(isinstance(d, int) for d in s):
                raise UserError(f"{path}: input {a.name!r} has a dynamic shape {s}; export a fixed shape")
            return (s[1], s[2]) if s[-1] == 3 else (s[2], s[3])
    raise UserError(f"{path}: no image input")
