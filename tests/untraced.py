"""Line coverage without paying for third-party code: its imports and its heaviest entry points run with the
coverage tracer suspended (``make test``'s ``--cov``). Installed by tests/conftest.py; a run without a tracer is
untouched.

Why: on Python 3.11 a trace function slows *every* Python line while it is set, including the lines of files
coverage does not measure; the interpreter only skips calling it. Measured in one process (pytest-cov's
CTracer, 2 Dec 2026): importing torch + coremltools (which imports TensorFlow) 13.9 s of CPU untraced, 26.7 s
traced; one tiny Core ML w8 conversion (cnum 4, 64x96) 11.8 s untraced, 29.4 s traced, 15.5 s with this module;
a w8a8 conversion 33.4 s with only ``coremltools.convert`` untraced, 24.4 s with every call below.
Every xdist worker imports torch and most import TensorFlow, and the suite makes about a dozen Core ML
conversions.

What is measured stays the same: only third-party code runs untraced -- the import of a package named in
:data:`PACKAGES` (none of which imports the project's code), and the functions in :data:`CALLS`, which call
back into the project's code only through the functions in :data:`CALLBACKS` (``coremltools.convert`` converts
an already traced TorchScript graph; linear weight quantization and saving work on the converted program;
palettization and w8a8's graph passes call the export's palette function, which runs traced again; the .tflite
schema's object API and matplotlib's drawing take data only). The project's own lines around them are traced
as before.
"""
from __future__ import annotations

import functools
import importlib.abc
import sys
import threading
from typing import Callable, Dict, Tuple

#: Top-level packages whose modules are imported (executed) untraced.
PACKAGES = frozenset({
    "torch", "torchvision", "tensorflow", "tf_keras", "keras", "tensorboard", "coremltools", "onnx", "onnxruntime",
    "onnxsim", "onnx2tf", "onnx_graphsurgeon", "ai_edge_litert", "tflite_runtime", "numpy", "scipy", "sympy",
    "matplotlib", "PIL", "cv2", "hypothesis", "safetensors", "google", "jax", "ml_dtypes", "h5py", "pandas",
})

#: Third-party functions run untraced: module -> attribute paths in it, patched right after the module is
#: imported. None of them calls the project's code.
CALLS: Dict[str, Tuple[str, ...]] = {
    "coremltools": ("convert",),
    # palettize_weights calls the export's palette function (a CALLBACKS entry: traced again)
    "coremltools.optimize.coreml": ("linear_quantize_weights", "palettize_weights"),
    # w8a8's activation passes (~8 s of CPU traced); palettize_weights runs through it too
    "coremltools.models.utils": ("_apply_graph_pass",),
    "coremltools.models.model": ("MLModel.save",),
    # the .tflite object API under export.tflite_graph.read/write (unpacking and packing every table of a file):
    # 10 x (3 reads, 1 write) of the tiny int8 file 6.75 s of CPU traced, 2.47 s untraced
    "ai_edge_litert.schema_py_generated": ("ModelT.InitFromPackedBuf", "ModelT.Pack"),
    "matplotlib.figure": ("Figure.savefig",),  # drawing the benchmark report's plots
    # pytest rewriting a test module's asserts (parse, rewrite, compile; the module then runs traced as before):
    # every xdist worker rewrites every test module, as nothing caches the result where bytecode is not written
    # (PYTHONDONTWRITEBYTECODE); collecting the suite 16.6 s of CPU traced, 9.2 s with plain asserts
    "_pytest.assertion.rewrite": ("_rewrite_test",),
}


#: The project's functions that third-party code of :data:`CALLS` calls back: module -> function names, wrapped
#: by :func:`retraced` when the module is imported, so that their lines are measured.
CALLBACKS: Dict[str, Tuple[str, ...]] = {
    "export.coreml": ("_palette_lut",),  # palettize_weights' lut_function
}

_suspended = threading.local()  # .tracers: the trace functions untraced() calls in this thread suspended, innermost last


def _suspended_tracers() -> list:
    if not hasattr(_suspended, "tracers"):
        _suspended.tracers = []
    return _suspended.tracers


def untraced(fn: Callable) -> Callable:
    """``fn`` run with the calling thread's trace function suspended, then restored (coverage's tracer takes
    itself back at the next call event: it is made for ``sys.settrace(sys.gettrace())``)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        tracer = sys.gettrace()
        if tracer is None:
            return fn(*args, **kwargs)
        tracers = _suspended_tracers()
        tracers.append(tracer)
        sys.settrace(None)
        try:
            return fn(*args, **kwargs)
        finally:
            tracers.pop()
            sys.settrace(tracer)

    call.__wrapped_untraced__ = True
    return call


def retraced(fn: Callable) -> Callable:
    """``fn``, called back from inside an :func:`untraced` call in this thread, run with the trace function that
    call suspended (then suspended again); anywhere else ``fn`` as it is."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        tracers = _suspended_tracers()
        if not tracers or sys.gettrace() is not None:
            return fn(*args, **kwargs)
        sys.settrace(tracers[-1])
        try:
            return fn(*args, **kwargs)
        finally:
            sys.settrace(None)

    call.__wrapped_retraced__ = True
    return call


class _UntracedLoader:
    """Runs another loader's module creation and execution untraced; the module keeps the real loader."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return untraced(self.loader.create_module)(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader
        untraced(self.loader.exec_module)(module)
        _patch_imported()


class _CallbackLoader(_UntracedLoader):
    """Runs another loader's module execution as it is (traced), then wraps the module's :data:`CALLBACKS`."""

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _patch_callbacks(module)


def _patch_imported() -> None:
    """Patch the :data:`CALLS` of every module imported so far. Not only the one just executed: the modules it
    imports run untraced too, so they come through the ordinary loaders (``coremltools.models.model`` is
    imported by ``coremltools``' own import)."""
    for module_name in CALLS:
        if module_name in sys.modules:
            _patch_calls(sys.modules[module_name])


def _patch_callbacks(module) -> None:
    """Replace the :data:`CALLBACKS` of ``module`` with their :func:`retraced` versions (once)."""
    for name in CALLBACKS.get(module.__name__, ()):
        fn = getattr(module, name, None)
        if fn is not None and not getattr(fn, "__wrapped_retraced__", False):
            setattr(module, name, retraced(fn))


def _patch_calls(module) -> None:
    """Replace the :data:`CALLS` of ``module`` with their untraced versions (once; one not defined yet, in a
    module still being imported, at a later import)."""
    for path in CALLS.get(module.__name__, ()):
        owner_name, _, name = path.rpartition(".")
        owner = getattr(module, owner_name, None) if owner_name else module
        fn = getattr(owner, name, None)
        if fn is not None and not getattr(fn, "__wrapped_untraced__", False):
            setattr(owner, name, untraced(fn))


class UntracedImports(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path``: a module of :data:`PACKAGES`, imported while a tracer is set, gets the spec the
    other finders give it, with its loader wrapped in :class:`_UntracedLoader`; a module of :data:`CALLBACKS`,
    in :class:`_CallbackLoader`."""

    def find_spec(self, name, path=None, target=None):
        if sys.gettrace() is None:
            return None
        if name in CALLBACKS:
            wrapper = _CallbackLoader
        elif name.partition(".")[0] in PACKAGES:
            wrapper = _UntracedLoader
        else:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = wrapper(spec.loader)
            return spec
        return None


def install() -> None:
    """Put :class:`UntracedImports` first on ``sys.meta_path`` (once), and patch :data:`CALLS` and
    :data:`CALLBACKS` of modules already imported."""
    if not any(isinstance(f, UntracedImports) for f in sys.meta_path):
        sys.meta_path.insert(0, UntracedImports())
    _patch_imported()
    for module_name in CALLBACKS:
        if module_name in sys.modules:
            _patch_callbacks(sys.modules[module_name])
