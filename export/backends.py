"""Format backends: what the export orchestration (:mod:`export.api`) needs from a format.

A backend is a module exposing:

``NAME``, ``SUFFIX``, ``PRECISIONS`` (all it can make), ``EXTRA`` (the pip extra that brings
its tools), and

* ``check_available() -> None`` -- raise :class:`runtime_py.errors.MissingDependencyError`
  naming the extra when a tool is missing.
* ``convert(job: ConvertJob) -> Path`` -- write the artifact at ``job.out`` (a temporary
  name chosen by the orchestration; the backend never writes final names) and return it,
  or ``(path, details)`` with a dict for the manifest (e.g. a calibration report).
  A backend may also define ``convert_many(jobs, progress, stages) -> Dict[str, ConvertResult]``
  to share work between jobs (TFLite converts every precision of one shape and I/O
  signature from one saved_model; Core ML compresses each precision from one converted
  program and calls :func:`convert_each`); otherwise ``convert`` is called per job. A backend whose
  conversion runs in a child process may define ``start_many`` (same arguments), which returns
  at once with an object whose ``wait()`` gives those results and ``cancel()`` stops it: the
  export then converts and gates another format meanwhile, when the memory budget allows.
* ``session(stages) -> context manager`` (optional) -- what the backend keeps for the whole of one
  export run, opened before its first conversion and closed when the export ends or fails
  (TFLite: one TensorFlow worker for every conversion call; :func:`session`); with it, ``done()``
  (optional) -- the export converts nothing more in this format: what the session keeps may go
  before the session ends (:func:`done`).
* ``describe(path, io, shape) -> (inputs, outputs)`` -- lists of
  :class:`runtime_py.manifest.TensorInfo`.
* ``inventory(path, threads) -> dict`` -- op inventory for the manifest (format specific
  keys; the TFLite one is documented in docs/MANIFEST.md).
* ``run(path, io, samples, threads) -> (outputs, executor)`` -- execute the artifact on
  :class:`export.samples.Samples`: ``outputs`` is (N, H, W, 3) float32 in [-1, 1] for the
  ``tensor`` signature or uint8 0..255 for ``image``; ``executor`` says what ran it
  (e.g. ``litert-2.1.0 xnnpack 2 threads``). Return ``(None, reason)`` where the artifact
  cannot be executed here (Core ML on Linux before its reference executor exists): the
  parity gate then records a structural-only check.

Optional, for quantized precisions: ``CALIBRATED`` (precisions calibrated on photos: their
cache key and manifest entry record ``options.range_method``), ``FALLBACK_PRECISIONS`` (precisions
whose failing files the export's sensitivity-guided fallback may retry with ``job.extra["keep_float"]``,
a list of generator convolution names to keep out of quantization; :mod:`export.fallback`),
``unrounded_convs(generator, precision) -> set`` (the generator convolutions, module names, that a file of
``precision`` leaves in float as converted -- filters under the converter's size threshold: the fallback ranks,
simulates and keeps float only those it rounds), ``RUNTIME_QUANTIZED`` (precisions whose activations are quantized at run time: their parity gate also runs the
nudged copies of the held-out samples, :func:`export.samples.nudged`), and
``quantization_summary(path, precision, details) -> dict`` (the manifest's
``build.quantization``: weight and activation schemes, per-tensor ranges, quantized MAC share).

Formats are looked up lazily so a missing backend module (Core ML until it lands) gives
a clear error only when that format is asked for.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Dict, Iterable, Optional, Tuple

from runtime_py.errors import UserError

from .options import ExportOptions

FORMAT_MODULES = {"tflite": "export.tflite", "coreml": "export.coreml"}


@dataclass
class ConvertJob:
    """One artifact to make.

    generator: a ``models.gmcnn.GMCNNGenerator`` in eval mode (PyTorch fp32 reference).
    shape: (rows, cols) of the fixed model input.
    calibration: :class:`export.samples.Samples` at ``shape`` (int8 calibration; other
        precisions may ignore it or use one sample where a tool needs an example input).
    workdir: scratch folder shared by jobs of the same format, shape and I/O signature.
    out: where to write the artifact (a temporary name inside the output folder).
    options: the export's :class:`export.options.ExportOptions` (``pad_mode``, ``int8_tail``,
        ``range_method``, ``threads``, ...), the same value for every job of one export.
    metadata: facts the backend may embed in the file (generator, shape, signature, checkpoint).
    extra: what this one artifact asks of its backend beyond the export's options:
        ``keep_float`` (the fallback's candidates: generator convolution names kept out of quantization).
    """

    key: str
    generator: object
    shape: Tuple[int, int]
    precision: str
    io: str
    calibration: object
    workdir: Path
    out: Path
    options: ExportOptions = field(default_factory=ExportOptions)
    metadata: Dict[str, object] = field(default_factory=dict)
    extra: Dict[str, object] = field(default_factory=dict)


@dataclass
class ConvertResult:
    path: Optional[Path]
    seconds: float = 0.0
    details: Dict[str, object] = field(default_factory=dict)  # e.g. converter inventory, post-pass report
    error: str = ""
    log: str = ""


def get_backend(fmt: str) -> ModuleType:
    """The backend module of ``fmt``; UserError if unknown or not built yet."""
    if fmt not in FORMAT_MODULES:
        raise UserError(f"unknown format {fmt!r}; choose from {', '.join(FORMAT_MODULES)}")
    name = FORMAT_MODULES[fmt]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            raise UserError(f"the {fmt} format is not available yet in this version of gmcnn-mobile "
                            f"(its backend {name} has not landed)") from None
        raise


def available_formats() -> Tuple[str, ...]:
    """Formats whose backend module exists (tools may still be missing: see check_available)."""
    out = []
    for fmt, name in FORMAT_MODULES.items():
        if importlib.util.find_spec(name) is not None:
            out.append(fmt)
    return tuple(out)


@contextlib.contextmanager
def session(modules: Iterable[ModuleType], stages=None):
    """Every backend's ``session(stages)`` (those that have one) for the block: one export run's conversions.
    ``stages``: the export's :class:`export.stages.StageLog`."""
    with contextlib.ExitStack() as stack:
        for backend in modules:
            if hasattr(backend, "session"):
                stack.enter_context(backend.session(stages))
        yield


def done(backend: ModuleType) -> None:
    """The export converts nothing more in ``backend``'s format: its ``done()`` where it has one (TFLite: the
    worker closes instead of waiting idle through the other formats' conversions and gates)."""
    if hasattr(backend, "done"):
        backend.done()


def convert_all(backend: ModuleType, jobs, progress=None, stages=None) -> Dict[str, ConvertResult]:
    """Run ``jobs`` through ``backend`` (its ``convert_many`` when it has one). ``stages``: the export's
    :class:`export.stages.StageLog`, which times each conversion (and measures its peak memory)."""
    if hasattr(backend, "convert_many"):
        return backend.convert_many(jobs, progress=progress, stages=stages)
    return convert_each(backend, jobs, progress, stages)


def convert_each(backend: ModuleType, jobs, progress=None, stages=None, convert=None) -> Dict[str, ConvertResult]:
    """``convert`` (default ``backend.convert``) on each job in turn, each timed as its own stage; an error is
    that job's result (a :class:`runtime_py.errors.UserError` stops the export)."""
    import contextlib
    import time

    results = {}
    for job in jobs:
        t0 = time.time()
        name = f"{backend.NAME} {job.shape[0]}x{job.shape[1]} {job.io} {job.precision}"
        if progress:
            progress(f"{name}: converting")
        try:
            with stages.stage(f"convert {name}", give_back=True) if stages is not None else contextlib.nullcontext():
                path = (convert or backend.convert)(job)
            details = {}
            if isinstance(path, tuple):  # (path, details), e.g. a calibration report
                path, details = path
            results[job.key] = ConvertResult(Path(path), time.time() - t0, dict(details))
        except UserError:
            raise
        except Exception as exc:  # one artifact failing must not stop the others
            results[job.key] = ConvertResult(None, time.time() - t0, error=f"{type(exc).__name__}: {exc}")
    return results


def start_all(backend: ModuleType, jobs, progress=None, stages=None):
    """Start ``jobs`` (the backend's ``start_many`` when it has one, else :func:`convert_all` now); returns an
    object whose ``wait()`` gives the results and ``cancel()`` stops what still runs."""
    if hasattr(backend, "start_many"):
        return backend.start_many(jobs, progress=progress, stages=stages)
    return _Done(convert_all(backend, jobs, progress=progress, stages=stages))


class _Done:
    def __init__(self, results: Dict[str, ConvertResult]):
        self.results = results

    def wait(self) -> Dict[str, ConvertResult]:
        return self.results

    def cancel(self) -> None:
        pass
