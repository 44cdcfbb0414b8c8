"""Inference engines behind the pipeline, and :func:`open_engines` which picks them from CLI-style options.

Importing this package imports numpy only; each engine imports its own runtime
(torch, onnxruntime, ai_edge_litert, coremltools) when it is activated.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from ..errors import UserError
from .base import Engine, TensorSpec

Shape = Tuple[int, int]
ENGINE_KINDS = ("torch", "onnxruntime", "tflite", "coreml")
DEFAULT_MODEL_SHAPE: Shape = (512, 680)
_SUFFIX = {"onnxruntime": ".onnx", "tflite": ".tflite", "coreml": ".mlpackage"}
_MANIFEST_FORMAT = {"onnxruntime": "onnx", "tflite": "tflite", "coreml": "coreml"}
PRECISION_PREFERENCE = ("fp32", "fp16", "int8-dynamic", "w8", "int8", "palettized", "w8a8", "int16x8")


class EngineSet:
    """The engines a pipeline run may use, one per fixed shape, opened on first use.

    ``base_shape`` is the model shape of the first pass (512x680 for the shipped
    models); ``shapes`` lists the shapes available (None: any shape, as with torch).
    """

    def __init__(self, kind: str, base_shape: Shape, factory: Callable[[Shape], Engine],
                 shapes: Optional[List[Shape]] = None, source: str = ""):
        self.kind = kind
        self.base_shape = (int(base_shape[0]), int(base_shape[1]))
        self.factory = factory
        self.shapes = None if shapes is None else [tuple(s) for s in shapes]
        self.source = source
        self._open: Dict[Shape, Engine] = {}

    def has(self, shape: Shape) -> bool:
        return self.shapes is None or tuple(shape) in self.shapes

    def get(self, shape: Shape) -> Engine:
        shape = (int(shape[0]), int(shape[1]))
        if not self.has(shape):
            have = ", ".join(f"{h}x{w}" for h, w in self.shapes)
            raise UserError(f"no {self.kind} model at {shape[0]}x{shape[1]} (available: {have}); use --tiles on")
        if shape not in self._open:
            self._open[shape] = self.factory(shape).activate()
        return self._open[shape]

    def close(self) -> None:
        for e in self._open.values():
            e.deactivate()
        self._open.clear()

    def inference_times(self) -> List[float]:
        return [t for e in self._open.values() for t in e.inference_times]

    def describe(self) -> str:
        shapes = "any shape" if self.shapes is None else ", ".join(f"{h}x{w}" for h, w in self.shapes)
        return f"{self.kind} ({self.source}; {shapes})"


def _torch_set(checkpoint, threads, model_shape) -> EngineSet:
    from .torch_engine import TorchEngine

    shared = {}

    def factory(shape):
        eng = TorchEngine(shape, checkpoint=checkpoint, threads=threads, generator=shared.get("gen"))
        eng.activate()
        shared["gen"] = eng.generator
        return eng

    src = str(checkpoint) if checkpoint else "default checkpoint"
    return EngineSet("torch", model_shape or DEFAULT_MODEL_SHAPE, factory, None, src)


def _pick_precision(candidates: List[str], precision: str) -> Optional[str]:
    if precision != "auto":
        return precision if precision in candidates else None
    for p in PRECISION_PREFERENCE:
        if p in candidates:
            return p
    return candidates[0] if candidates else None


def engine_for_artifact(directory: os.PathLike, art, threads: Optional[int] = None, xnnpack: bool = True,
                        verify: bool = True, transient_indirection: bool = False) -> Engine:
    """The (not yet activated) engine for one manifest artifact of ``directory``; activating it
    first checks the file against ``art`` (sha256 and size) unless ``verify`` is False.
    ``transient_indirection``: TFLite only (:class:`~runtime_py.engines.tflite_engine.TFLiteEngine`)."""
    file = str(Path(directory) / art.file)
    if art.format == "tflite":
        from .tflite_engine import TFLiteEngine

        return TFLiteEngine(file, threads=threads, xnnpack=xnnpack, artifact=art, verify=verify,
                            transient_indirection=transient_indirection)
    if art.format == "coreml":
        from .coreml_engine import CoreMLEngine

        return CoreMLEngine(file, artifact=art, verify=verify)
    if art.format == "onnx":
        from .onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(file, threads=threads, artifact=art, verify=verify)
    raise UserError(f"{file}: artifact format {art.format!r} has no host runtime")


def _entry_beside(file: Path):
    """The manifest entry of ``file`` when the manifest.json beside it lists it, else None."""
    from ..manifest import MANIFEST_NAME, load_manifest

    if not (file.parent / MANIFEST_NAME).is_file():
        return None
    for art in load_manifest(file.parent).artifacts:
        if (file.parent / art.file).resolve() == file.resolve():
            return art
    return None


def _artifact_set(kind, artifacts, threads, model_shape, precision, io, xnnpack, verify,
                  transient_indirection: bool = False) -> EngineSet:
    from ..manifest import MANIFEST_NAME, load_manifest

    path = Path(artifacts)
    if not path.exists():
        raise UserError(f"{path}: artifacts not found")
    suffix = _SUFFIX[kind]

    def single(shape, file):
        if kind == "onnxruntime":
            from .onnxruntime_engine import OnnxRuntimeEngine

            return OnnxRuntimeEngine(file, shape=shape, io=io, threads=threads)
        if kind == "tflite":
            from .tflite_engine import TFLiteEngine

            return TFLiteEngine(file, shape=shape, io=io, threads=threads, xnnpack=xnnpack,
                                transient_indirection=transient_indirection)
        raise UserError(f"{file}: the coreml engine needs the export manifest; pass --artifacts DIR")

    if path.suffix == suffix and not (path.is_dir() and (path / MANIFEST_NAME).exists()):
        # One file named directly: checked against the manifest beside it when that lists it;
        # a file with no manifest has nothing to be checked against and is used as it is.
        art = _entry_beside(path)
        if art is not None and art.format == _MANIFEST_FORMAT[kind]:
            probe = engine_for_artifact(path.parent, art, threads, xnnpack, verify, transient_indirection).activate()
            source = f"{path}, {art.precision}" + ("" if verify else ", not verified")
        else:
            probe = single(None, str(path)).activate()  # reads the fixed shape from the file
            source = f"{path}, no manifest: not verified"
        shape = probe.shape
        return EngineSet(kind, shape, lambda s: probe, [shape], source)

    def manifest_has_onnx() -> bool:
        return (path / MANIFEST_NAME).exists() and any(a.format == "onnx" for a in load_manifest(path).artifacts)

    if kind == "onnxruntime" and not manifest_has_onnx():  # the export keeps its .onnx files beside the manifest
        files = sorted(f for f in path.glob("*.onnx") if not f.name.endswith(".raw.onnx"))
        if not files:
            raise UserError(f"{path}: no onnx artifacts in a manifest and no .onnx files")
        engines = {}
        for f in files:
            e = single(None, str(f))
            engines.setdefault(e.shape, e)
        base = tuple(model_shape) if model_shape else min(engines, key=lambda s: s[0] * s[1])
        return EngineSet(kind, base, lambda s: engines[s], list(engines), f"{path}, no manifest: not verified")

    manifest = load_manifest(path)
    fmt = _MANIFEST_FORMAT[kind]
    by_shape: Dict[Shape, object] = {}
    for shape in sorted({tuple(a.shape) for a in manifest.artifacts if a.format == fmt and a.io == io}):
        cands = [a.precision for a in manifest.artifacts if a.format == fmt and a.io == io and tuple(a.shape) == shape]
        chosen = _pick_precision(cands, precision)
        if chosen is not None:
            by_shape[shape] = manifest.find(fmt, shape, chosen, io)
    if not by_shape:
        raise UserError(f"{path}: the manifest has no {fmt} {io} artifact"
                        + (f" at precision {precision}" if precision != "auto" else ""))

    def factory(shape):
        return engine_for_artifact(path, by_shape[shape], threads, xnnpack, verify, transient_indirection)

    base = tuple(model_shape) if model_shape else min(by_shape, key=lambda s: s[0] * s[1])
    if base not in by_shape:
        raise UserError(f"{path}: no {fmt} artifact at {base[0]}x{base[1]}")
    precisions = sorted({a.precision for a in by_shape.values()})
    checked = "" if verify else ", not verified"
    return EngineSet(kind, base, factory, list(by_shape), f"{path}, {'/'.join(precisions)}{checked}")


def open_engines(kind: str = "torch", artifacts: Optional[os.PathLike] = None, checkpoint: Optional[os.PathLike] = None,
                 threads: Optional[int] = None, model_shape: Optional[Shape] = None, precision: str = "auto",
                 io: str = "tensor", xnnpack: bool = True, verify: bool = True,
                 transient_indirection: bool = False) -> EngineSet:
    """An EngineSet for ``kind``: torch from a checkpoint (any shape), the others from exported artifacts
    (a directory with manifest.json, or one model file).

    Every artifact listed in a manifest is checked against its entry (sha256 and size) before it
    runs; ``verify=False`` skips the check (for artifacts edited on purpose). A single model file
    is checked against the manifest beside it when that lists it, and otherwise used as it is
    (the set's description then says "no manifest: not verified"). ``transient_indirection`` (tflite, with
    XNNPACK): XNNPACK builds its indirection buffers per run instead of keeping them
    (:class:`~runtime_py.engines.tflite_engine.TFLiteEngine`)."""
    if kind not in ENGINE_KINDS:
        raise UserError(f"unknown engine {kind!r}; choose one of {', '.join(ENGINE_KINDS)}")
    if transient_indirection and (kind != "tflite" or not xnnpack):
        raise UserError("--transient-indirection is an XNNPACK option: it needs the tflite engine with XNNPACK "
                        f"(here: the {kind} engine{'' if xnnpack else ', --no-xnnpack'})")
    if kind == "torch":
        if artifacts is not None:
            raise UserError("--artifacts is for the onnxruntime/tflite/coreml engines; the torch engine takes --checkpoint")
        return _torch_set(checkpoint, threads, model_shape)
    if checkpoint is not None:
        raise UserError(f"--checkpoint is for the torch engine; the {kind} engine takes --artifacts DIR")
    if artifacts is None:
        raise UserError(f"the {kind} engine needs --artifacts DIR (an export directory with manifest.json)")
    return _artifact_set(kind, artifacts, threads, model_shape, precision, io, xnnpack, verify, transient_indirection)


__all__ = ["Engine", "EngineSet", "TensorSpec", "ENGINE_KINDS", "open_engines", "engine_for_artifact",
           "DEFAULT_MODEL_SHAPE"]
