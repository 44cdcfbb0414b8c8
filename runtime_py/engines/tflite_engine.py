"""TFLite engine on the LiteRT interpreter (``ai_edge_litert``), XNNPACK on by default.

The artifact's manifest entry (runtime_py.manifest.Artifact) is checked against the
file before it is opened (``verify=False`` skips that) and names each input and its role; interpreter tensors are matched to it by name (exact, else the manifest
name inside the interpreter's name, e.g. ``serving_default_image:0``), never by index.
Without a manifest entry, roles come from the tensor names (``mask`` -> mask). A model can also be
given as bytes (``model_content``: the export's calibration runs a graph it has just rewritten, whose
outputs are every range probe; :func:`export.tflite_calibration.measure_statistics`);
:meth:`TFLiteEngine.delegation` reports which ops XNNPACK did not take.
``transient_indirection=True`` runs the file through LiteRT's C API instead of its Python interpreter
(:mod:`runtime_py.engines.litert_capi`: the same XNNPACK, asked to build its indirection buffers per run rather
than keep them: 627 MiB less at 512x680 and 2.45 GiB less at 1024x1360 for the default model; the same output
bytes; docs/EXPORT.md "Transient indirection buffers"). The export's gates and int8 calibration use it.
With it, ``record_builtin_ops=True`` has LiteRT's profiler watch the first inference: :attr:`TFLiteEngine.builtin_ops`
then says which ops LiteRT ran outside XNNPACK in it (the export's op inventory takes it from the gate's run).
NHWC 'tensor' signature: image (1,H,W,3) float32 [-1,1] RGB, mask (1,H,W,1) float32
{0,1} -> (1,H,W,3) float32 [-1,1]. 'image' signature: uint8 RGB image, uint8 mask
255 = hole -> uint8 RGB composite. Quantized int8 I/O uses each tensor's own
(scale, zero_point).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np

from ..errors import MissingDependencyError, UserError, native_stderr
from .base import Engine, TensorSpec, role_of

#: What LiteRT prints on descriptor 2 whenever it creates its default delegate: not a line for the user
#: (it would be the second line of an error); LiteRT's real errors and warnings still pass.
XNNPACK_NOTICE = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."


def match_name(wanted: str, candidates: List[str]) -> Optional[str]:
    """The candidate equal to ``wanted``, else the only one containing it, else None."""
    if wanted in candidates:
        return wanted
    hits = [c for c in candidates if wanted in c]
    return hits[0] if len(hits) == 1 else None


class TFLiteEngine(Engine):
    name = "tflite"

    def __init__(self, path: Optional[os.PathLike] = None, shape=None, io: str = "tensor",
                 threads: Optional[int] = None, xnnpack: bool = True, artifact=None, verify: bool = True,
                 model_content: Optional[bytes] = None, transient_indirection: bool = False,
                 record_builtin_ops: bool = False):
        if (path is None) == (model_content is None):
            raise ValueError("give the model as a path or as model_content, not both")
        if transient_indirection and not xnnpack:
            raise ValueError("transient indirection buffers are an XNNPACK option: not with xnnpack=False")
        if record_builtin_ops and not transient_indirection:
            raise ValueError("record_builtin_ops reads LiteRT's C API profiler: it needs transient_indirection=True")
        self.transient_indirection = transient_indirection
        self.record_builtin_ops = record_builtin_ops
        #: op type -> count of the nodes LiteRT ran on its built-in kernels, outside XNNPACK, in the first inference
        #: of the engine's last activation ({}: XNNPACK ran them all); kept after deactivation. None until then, and
        #: without ``record_builtin_ops`` (:meth:`delegation` asks the interpreter instead)
        self.builtin_ops: Optional[Dict[str, int]] = None
        self.interpreter = None
        self.compiled = None
        self.path = str(path) if path is not None else ""
        self.model_content = model_content
        self.threads = threads
        self.xnnpack = xnnpack
        self.artifact = artifact
        self.verify = verify
        if artifact is not None:
            shape, io = (artifact.height, artifact.width), artifact.io
        super().__init__(shape or (0, 0), io=io)
        self._shape_from_model = shape is None

    def activate_impl(self) -> None:
        if self.model_content is None and not os.path.isfile(self.path):
            raise UserError(f"{self.path}: TFLite file not found")
        self.builtin_ops = None
        if self.transient_indirection:
            self._activate_compiled()
        else:
            self._activate_interpreter()
        if self._shape_from_model:
            s = next(s for s in self._inputs if s.role == "image").shape
            self.shape = (int(s[1]), int(s[2])) if s[-1] == 3 else (int(s[2]), int(s[3]))

    def _activate_interpreter(self) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter, OpResolverType
        except ImportError:
            raise MissingDependencyError("ai_edge_litert", "runtime", "the tflite engine") from None
        resolver = OpResolverType.AUTO if self.xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        source = {"model_path": self.path} if self.model_content is None else {"model_content": self.model_content}
        try:
            with native_stderr(keep=lambda line: not line.startswith(XNNPACK_NOTICE)):
                self.interpreter = Interpreter(**source, num_threads=self.num_threads,
                                               experimental_op_resolver_type=resolver)
                self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"{self.path or 'TFLite model'}: LiteRT cannot load it ({str(exc).splitlines()[0]})") from None
        details = self.interpreter.get_input_details()
        self._index = {d["name"]: d["index"] for d in details}
        self._inputs = [self._spec(d, self._role(d["name"], i, details)) for i, d in enumerate(details)]
        outs = self.interpreter.get_output_details()
        self._out_index = {d["name"]: d["index"] for d in outs}
        self._outputs = [self._spec(d, "output") for d in outs]

    def _activate_compiled(self) -> None:
        from .litert_capi import CompiledModel, is_notice

        said: List[str] = []  # LiteRT's own lines, held back: on failure the first error is the message's reason
        try:
            with native_stderr(keep=lambda line: not is_notice(line) and bool(said.append(line))):
                self.compiled = CompiledModel(self.path or None, self.model_content, threads=self.num_threads,
                                              transient_indirection=True, record_builtin_ops=self.record_builtin_ops)
        except UserError as exc:
            errors = [line.strip()[len("ERROR: "):] for line in said if line.startswith("ERROR: ")]
            if not errors:
                raise
            raise UserError(f"{self.path or 'TFLite model'}: LiteRT cannot load it ({errors[0]})") from None
        if said:
            os.write(2, "".join(said).encode())
        details = [{"name": name, "shape": shape, "dtype": dtype, "quantization": quant or (0.0, 0)}
                   for name, shape, dtype, quant in self.compiled.inputs]
        self._inputs = [self._spec(d, self._role(d["name"], i, details)) for i, d in enumerate(details)]
        self._outputs = [self._spec({"name": name, "shape": shape, "dtype": dtype, "quantization": quant or (0.0, 0)},
                                    "output") for name, shape, dtype, quant in self.compiled.outputs]

    @property
    def num_threads(self) -> int:
        """LiteRT defaults to 1 thread; unless told otherwise use every core (as the app does)."""
        return int(self.threads or os.cpu_count() or 1)

    def _role(self, name: str, index: int, details) -> str:
        if self.artifact is not None:
            names = [d["name"] for d in details]
            for t in self.artifact.inputs:
                if match_name(t.name, names) == name:
                    return t.role or role_of(t.name, index)
            raise UserError(f"{self.path}: interpreter input {name!r} matches no input of the manifest "
                            f"({[t.name for t in self.artifact.inputs]})")
        return role_of(name, index)

    @staticmethod
    def _spec(d, role: str) -> TensorSpec:
        scale, zero = d.get("quantization", (0.0, 0))
        quant = (float(scale), int(zero)) if scale else None
        return TensorSpec(d["name"], tuple(int(v) for v in d["shape"]), np.dtype(d["dtype"]).name, role, quant)

    def deactivate_impl(self) -> None:
        self.interpreter = None
        if self.compiled is not None:
            from .litert_capi import is_notice

            with native_stderr(keep=lambda line: not is_notice(line)):  # its environment says goodbye on INFO lines
                self.compiled.close()
            self.compiled = None

    def infer_impl(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if self.compiled is not None:
            outputs = self.compiled.run(feed)
            if self.compiled.builtin_ops is not None:
                self.builtin_ops = self.compiled.builtin_ops
            return outputs
        for name, arr in feed.items():
            self.interpreter.set_tensor(self._index[name], arr)
        self.interpreter.invoke()
        return {s.name: self.interpreter.get_tensor(self._out_index[s.name]) for s in self._outputs}

    def delegation(self) -> Dict[str, object]:
        """How the graph was split: ``nodes``, XNNPACK ``partitions``, ``nodes_outside`` them and
        ``ops_outside`` (op type -> count of nodes the built-in kernels run; {} = all in XNNPACK),
        ``op_counts`` (:func:`runtime_py.engines.delegation.delegation_summary`)."""
        from .delegation import delegation_summary

        if self.transient_indirection:  # the C API tells op details only of a profiled run: ask the interpreter
            plain = TFLiteEngine(self.path or None, io=self.io, threads=self.threads, model_content=self.model_content)
            with plain:
                return plain.delegation()
        self.activate()
        return delegation_summary(self.interpreter._get_ops_details())

    def describe(self) -> str:
        xnn = "xnnpack" if self.xnnpack else "no xnnpack"
        if self.transient_indirection:
            xnn += ", transient indirection"
        name = os.path.basename(self.path) if self.path else "model in memory"
        return f"tflite {self.shape[0]}x{self.shape[1]} ({name}, {xnn}, {self.num_threads} threads)"
