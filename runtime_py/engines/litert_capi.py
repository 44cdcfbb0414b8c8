"""LiteRT's C API through ctypes: a compiled model on the CPU (XNNPACK) with delegate flags of our choosing.

Why: XNNPACK keeps, for every convolution with a kernel over 1x1, one pointer per output pixel and kernel tap
(its *indirection buffer*) for the interpreter's whole life: 627 MiB for the default model at 512x680, 2.45 GiB
at 1024x1360 (docs/EXPORT.md, "Where a LiteRT pass's memory goes"). With the delegate flag
``TFLITE_XNNPACK_DELEGATE_FLAG_TRANSIENT_INDIRECTION_BUFFER`` it builds them per run in one scratch area
instead. LiteRT's Python ``Interpreter`` takes no delegate flags (its default delegate is built with the
defaults) and ``CompiledModel.from_file`` takes no CPU options, but the ``ai_edge_litert`` wheel ships
``libLiteRt.so``, the LiteRT C API with its own XNNPACK, whose CPU options carry the flags
(``LiteRtSetCpuOptionsXNNPackFlags``). Only :class:`runtime_py.engines.tflite_engine.TFLiteEngine` uses this
module (``transient_indirection=True``); the library is loaded on first use, never at import.

A compiled model made with ``record_builtin_ops=True`` also says which of the graph's ops LiteRT ran on its
built-in kernels rather than in XNNPACK (:attr:`CompiledModel.builtin_ops`), read from LiteRT's profiler over
the model's first run: the delegation the run had, without loading the file into the Python interpreter, whose
XNNPACK builds every indirection buffer to tell it (4.1-4.6 GB at 1024x1360; docs/EXPORT.md, "The inventory from
the gate's first inference").

Declarations follow LiteRT v2.1.0's headers (``litert/c/*.h``, the wheel's version): every function returns a
``LiteRtStatus`` (0 = ok); handles are opaque pointers. Tensors are bound to host memory the engine allocates
once, 64-byte aligned (``LITERT_HOST_MEMORY_BUFFER_ALIGNMENT``; LiteRT refuses other addresses).
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import MissingDependencyError, UserError

#: tflite/delegates/xnnpack/xnnpack_delegate.h (the same value from TensorFlow 2.13 to LiteRT 2.1).
XNNPACK_FLAG_TRANSIENT_INDIRECTION_BUFFER = 0x00000020

_ALIGNMENT = 64  # LITERT_HOST_MEMORY_BUFFER_ALIGNMENT (litert/c/litert_tensor_buffer_types.h)
_MAX_RANK = 8  # LITERT_TENSOR_MAX_RANK (litert/c/litert_layout.h)
_HW_CPU = 1  # kLiteRtHwAcceleratorCpu
_QUANT_PER_TENSOR = 1  # kLiteRtQuantizationPerTensor
_OPERATOR_INVOKE_EVENT = 2  # LiteRtProfilerEventType: a node the interpreter invoked (a built-in op, or a delegate's)
#: LiteRtProfilerT's buffer in a compiled model (litert/runtime/compiled_model.cc, v2.1.0): a run with this many
#: events may have lost some, and then says nothing about the delegation
_PROFILER_CAPACITY = 2048
#: LiteRtElementType -> numpy (the values are TfLiteType's).
_DTYPES = {1: np.float32, 2: np.int32, 3: np.uint8, 4: np.int64, 6: np.bool_, 7: np.int16, 9: np.int8,
           10: np.float16, 11: np.float64}


def is_notice(line: str) -> bool:
    """A line LiteRT's C API prints on descriptor 2 on every environment and compiled model it creates or destroys
    (its INFO lines, that this host has no NPU or GPU accelerator library, blank lines): not a line for the user."""
    return line.startswith("INFO: ") or "accelerator could not be loaded" in line or not line.strip()


class _Layout(ctypes.Structure):
    # unsigned int rank : 7; bool has_strides : 1; -- both in the first 32-bit word on x86-64 and arm64
    _fields_ = [("bits", ctypes.c_uint32), ("dimensions", ctypes.c_int32 * _MAX_RANK),
                ("strides", ctypes.c_uint32 * _MAX_RANK)]


class _RankedTensorType(ctypes.Structure):
    _fields_ = [("element_type", ctypes.c_int), ("layout", _Layout)]


class _PerTensorQuantization(ctypes.Structure):
    _fields_ = [("scale", ctypes.c_float), ("zero_point", ctypes.c_int64)]


class _MemoryUsage(ctypes.Structure):  # LiteRtMemoryUsage (litert/c/litert_profiler_event.h)
    _fields_ = [("total_allocated_bytes", ctypes.c_size_t), ("in_use_allocated_bytes", ctypes.c_size_t),
                ("private_footprint_bytes", ctypes.c_size_t)]


class _ProfiledEvent(ctypes.Structure):  # ProfiledEventData (litert/c/litert_profiler_event.h)
    _fields_ = [("tag", ctypes.c_char_p), ("event_type", ctypes.c_int), ("start_timestamp_us", ctypes.c_uint64),
                ("elapsed_time_us", ctypes.c_uint64), ("begin_mem_usage", _MemoryUsage),
                ("end_mem_usage", _MemoryUsage), ("event_metadata1", ctypes.c_uint64),
                ("event_metadata2", ctypes.c_uint64), ("event_source", ctypes.c_int)]


_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
_SIZE = ctypes.c_size_t
_STR = ctypes.POINTER(ctypes.c_char_p)
_SIGNATURES = {
    "LiteRtCreateEnvironment": [ctypes.c_int, _P, _PP],
    "LiteRtCreateModelFromFile": [ctypes.c_char_p, _PP],
    "LiteRtCreateModelFromBuffer": [_P, _SIZE, _PP],
    "LiteRtCreateOptions": [_PP],
    "LiteRtSetOptionsHardwareAccelerators": [_P, ctypes.c_int],
    "LiteRtCreateCpuOptions": [_PP],
    "LiteRtFindCpuOptions": [_P, _PP],
    "LiteRtSetCpuOptionsNumThread": [_P, ctypes.c_int],
    "LiteRtGetCpuOptionsXNNPackFlags": [_P, ctypes.POINTER(ctypes.c_uint32)],
    "LiteRtSetCpuOptionsXNNPackFlags": [_P, ctypes.c_uint32],
    "LiteRtAddOpaqueOptions": [_P, _P],
    "LiteRtCreateCompiledModel": [_P, _P, _P, _PP],
    "LiteRtGetModelSignature": [_P, _SIZE, _PP],
    "LiteRtGetNumSignatureInputs": [_P, ctypes.POINTER(_SIZE)],
    "LiteRtGetNumSignatureOutputs": [_P, ctypes.POINTER(_SIZE)],
    "LiteRtGetSignatureInputTensorByIndex": [_P, _SIZE, _PP],
    "LiteRtGetSignatureOutputTensorByIndex": [_P, _SIZE, _PP],
    "LiteRtGetTensorName": [_P, _STR],
    "LiteRtGetRankedTensorType": [_P, ctypes.POINTER(_RankedTensorType)],
    "LiteRtGetQuantizationTypeId": [_P, ctypes.POINTER(ctypes.c_int)],
    "LiteRtGetPerTensorQuantization": [_P, ctypes.POINTER(_PerTensorQuantization)],
    "LiteRtCreateTensorBufferFromHostMemory": [ctypes.POINTER(_RankedTensorType), _P, _SIZE, _P, _PP],
    "LiteRtRunCompiledModel": [_P, _SIZE, _SIZE, _PP, _SIZE, _PP],
    "LiteRtCreateRuntimeOptions": [_PP],
    "LiteRtFindRuntimeOptions": [_P, _PP],
    "LiteRtSetRuntimeOptionsEnableProfiling": [_P, ctypes.c_bool],
    "LiteRtCompiledModelGetProfiler": [_P, _PP],
    "LiteRtStartProfiler": [_P],
    "LiteRtStopProfiler": [_P],
    "LiteRtGetNumProfilerEvents": [_P, ctypes.POINTER(ctypes.c_int)],
    "LiteRtGetProfilerEvents": [_P, ctypes.c_int, ctypes.POINTER(_ProfiledEvent)],
}
_DESTROY = ("LiteRtDestroyEnvironment", "LiteRtDestroyModel", "LiteRtDestroyOptions", "LiteRtDestroyOpaqueOptions",
            "LiteRtDestroyCompiledModel", "LiteRtDestroyTensorBuffer")
_LIB: Optional[ctypes.CDLL] = None


def library_path() -> str:
    """The wheel's ``libLiteRt.so`` (found without importing ``ai_edge_litert``)."""
    spec = importlib.util.find_spec("ai_edge_litert")
    if spec is None or not spec.origin:
        raise MissingDependencyError("ai_edge_litert", "runtime", "the tflite engine")
    return os.path.join(os.path.dirname(spec.origin), "libLiteRt.so")


def library() -> ctypes.CDLL:
    """``libLiteRt.so``, loaded once, with the functions this module calls declared."""
    global _LIB
    if _LIB is None:
        path = library_path()
        try:
            lib = ctypes.CDLL(path)
            for name, args in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, ctypes.c_int
            for name in _DESTROY:
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = [_P], None
            lib.LiteRtGetStatusString.argtypes, lib.LiteRtGetStatusString.restype = [ctypes.c_int], ctypes.c_char_p
        except (OSError, AttributeError) as exc:
            raise UserError(f"{path}: LiteRT's C API is missing or not the expected one ({exc}); transient "
                            "indirection buffers need ai-edge-litert 2.1") from None
        _LIB = lib
    return _LIB


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
    start = (-raw.ctypes.data) % _ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class CompiledModel:
    """One .tflite compiled for LiteRT's CPU accelerator (XNNPACK, then the built-in kernels for what it leaves).

    ``inputs`` / ``outputs``: per tensor of the model's first signature (LiteRT makes one of the main subgraph's
    inputs and outputs when the file has none), in its order, ``(name, shape, dtype, quantization)`` with the
    tensor's own name (what LiteRT's Python interpreter calls it) and per-tensor (scale, zero point) or None.
    :meth:`run` copies a feed into the bound input arrays and returns copies of the outputs.
    ``transient_indirection``: XNNPACK builds its indirection buffers per run (see the module docstring).
    ``record_builtin_ops``: LiteRT's profiler watches the first run, and :attr:`builtin_ops` then holds the op types
    (with counts) of the nodes LiteRT ran on its built-in kernels, outside XNNPACK ({}: XNNPACK ran them all); None
    before that run, without the option, or where the profile could not hold the whole run.
    """

    def __init__(self, path: Optional[str] = None, content: Optional[bytes] = None, threads: int = 1,
                 transient_indirection: bool = True, record_builtin_ops: bool = False):
        self._lib = lib = library()
        self.builtin_ops: Optional[Dict[str, int]] = None
        self._profiler: Optional[ctypes.c_void_p] = None  # until the first run has been read
        self._handles: List[Tuple[str, ctypes.c_void_p]] = []  # (destroy function, handle), destroyed in reverse
        self._content = None
        self._label = path or "TFLite model"
        try:
            self._open(lib, path, content, threads, transient_indirection, record_builtin_ops)
        except BaseException:
            self.close()
            raise

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            text = (self._lib.LiteRtGetStatusString(status) or b"status %d" % status).decode(errors="replace")
            verb = "cannot run it" if what == "running the model" else "cannot load it"
            raise UserError(f"{self._label}: LiteRT {verb} (C API, {what}: {text})")

    def _new(self, destroy: Optional[str], create, *args, what: str) -> ctypes.c_void_p:
        handle = ctypes.c_void_p()
        self._check(create(*args, ctypes.byref(handle)), what)
        if destroy:
            self._handles.append((destroy, handle))
        return handle

    def _added_options(self, options, create, find, what: str) -> ctypes.c_void_p:
        """A new set of opaque options (``create``) added to ``options``, which from then on owns and destroys it;
        returns its typed handle (``find``)."""
        opaque = self._new(None, create, what=what)
        added = self._lib.LiteRtAddOpaqueOptions(options, opaque)
        if added != 0:
            self._lib.LiteRtDestroyOpaqueOptions(opaque)
        self._check(added, f"adding the {what}")
        return self._new(None, find, opaque, what=what)

    def _open(self, lib, path, content, threads, transient, record_builtin_ops) -> None:
        env = self._new("LiteRtDestroyEnvironment", lib.LiteRtCreateEnvironment, 0, None, what="environment")
        if content is None:
            model = self._new("LiteRtDestroyModel", lib.LiteRtCreateModelFromFile, os.fsencode(path),
                              what="reading the model")
        else:  # LiteRT reads the bytes in place: they must outlive the model
            self._content = ctypes.create_string_buffer(bytes(content), len(content))
            model = self._new("LiteRtDestroyModel", lib.LiteRtCreateModelFromBuffer, self._content, len(content),
                              what="reading the model")
        # kept until the compiled model is destroyed (destroyed after it: the handles go in reverse)
        options = self._new("LiteRtDestroyOptions", lib.LiteRtCreateOptions, what="options")
        self._check(lib.LiteRtSetOptionsHardwareAccelerators(options, _HW_CPU), "choosing the CPU")
        cpu = self._added_options(options, lib.LiteRtCreateCpuOptions, lib.LiteRtFindCpuOptions, "CPU options")
        self._check(lib.LiteRtSetCpuOptionsNumThread(cpu, int(threads)), "setting the threads")
        flags = ctypes.c_uint32()  # XNNPACK's defaults (QS8 | QU8 in this build), plus ours
        self._check(lib.LiteRtGetCpuOptionsXNNPackFlags(cpu, ctypes.byref(flags)), "reading XNNPACK's flags")
        self.xnnpack_flags = flags.value | (XNNPACK_FLAG_TRANSIENT_INDIRECTION_BUFFER if transient else 0)
        self._check(lib.LiteRtSetCpuOptionsXNNPackFlags(cpu, self.xnnpack_flags), "setting XNNPACK's flags")
        if record_builtin_ops:
            runtime = self._added_options(options, lib.LiteRtCreateRuntimeOptions, lib.LiteRtFindRuntimeOptions,
                                          "runtime options")
            self._check(lib.LiteRtSetRuntimeOptionsEnableProfiling(runtime, True), "enabling the profiler")
        self._compiled = self._new("LiteRtDestroyCompiledModel", lib.LiteRtCreateCompiledModel, env, model, options,
                                   what="compiling the model")
        if record_builtin_ops:  # the compiled model owns its profiler
            self._profiler = self._new(None, lib.LiteRtCompiledModelGetProfiler, self._compiled, what="profiler")
            self._check(lib.LiteRtStartProfiler(self._profiler), "starting the profiler")
        signature = self._new(None, lib.LiteRtGetModelSignature, model, 0, what="reading the signature")
        self.inputs, in_types = self._tensors(signature, lib.LiteRtGetNumSignatureInputs,
                                              lib.LiteRtGetSignatureInputTensorByIndex)
        self.outputs, out_types = self._tensors(signature, lib.LiteRtGetNumSignatureOutputs,
                                                lib.LiteRtGetSignatureOutputTensorByIndex)
        self._in_arrays = [aligned_empty(shape, dtype) for _, shape, dtype, _ in self.inputs]
        self._out_arrays = [aligned_empty(shape, dtype) for _, shape, dtype, _ in self.outputs]
        self._in_buffers = [self._bind(t, a) for t, a in zip(in_types, self._in_arrays)]
        self._out_buffers = [self._bind(t, a) for t, a in zip(out_types, self._out_arrays)]

    def _tensors(self, signature, count_fn, tensor_fn):
        lib = self._lib
        count = _SIZE()
        self._check(count_fn(signature, ctypes.byref(count)), "counting the signature's tensors")
        specs, types = [], []
        for i in range(count.value):
            tensor = self._new(None, tensor_fn, signature, i, what="reading a tensor")
            name = ctypes.c_char_p()
            self._check(lib.LiteRtGetTensorName(tensor, ctypes.byref(name)), "reading a tensor's name")
            ranked = _RankedTensorType()
            self._check(lib.LiteRtGetRankedTensorType(tensor, ctypes.byref(ranked)), "reading a tensor's type")
            if ranked.element_type not in _DTYPES:
                raise UserError(f"{self._label}: tensor {name.value!r} has LiteRT element type "
                                f"{ranked.element_type}, which this engine does not read")
            rank = ranked.layout.bits & 0x7F
            shape = tuple(int(ranked.layout.dimensions[k]) for k in range(rank))
            qtype, quant = ctypes.c_int(), None
            self._check(lib.LiteRtGetQuantizationTypeId(tensor, ctypes.byref(qtype)), "reading a quantization")
            if qtype.value == _QUANT_PER_TENSOR:
                q = _PerTensorQuantization()
                self._check(lib.LiteRtGetPerTensorQuantization(tensor, ctypes.byref(q)), "reading a quantization")
                quant = (float(q.scale), int(q.zero_point))
            specs.append((name.value.decode(), shape, np.dtype(_DTYPES[ranked.element_type]), quant))
            types.append(ranked)
        return specs, types

    def _bind(self, ranked: _RankedTensorType, array: np.ndarray) -> ctypes.c_void_p:
        # no deallocator: the array is ours, and lives as long as this object
        return self._new("LiteRtDestroyTensorBuffer", self._lib.LiteRtCreateTensorBufferFromHostMemory,
                         ctypes.byref(ranked), array.ctypes.data, array.nbytes, None, what="binding a tensor")

    def run(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Inputs by tensor name (every input, the declared shape; cast to the declared dtype) -> outputs by name."""
        for (name, _, _, _), array in zip(self.inputs, self._in_arrays):
            array[...] = feed[name]
        ins = (ctypes.c_void_p * len(self._in_buffers))(*self._in_buffers)
        outs = (ctypes.c_void_p * len(self._out_buffers))(*self._out_buffers)
        self._check(self._lib.LiteRtRunCompiledModel(self._compiled, 0, len(self._in_buffers), ins,
                                                     len(self._out_buffers), outs), "running the model")
        if self._profiler is not None:
            self._read_first_run()
        return {name: array.copy() for (name, _, _, _), array in zip(self.outputs, self._out_arrays)}

    def _read_first_run(self) -> None:
        """:attr:`builtin_ops` from the profiler's events of the first run; the profiler stops there."""
        lib, profiler = self._lib, self._profiler
        self._profiler = None
        self._check(lib.LiteRtStopProfiler(profiler), "stopping the profiler")
        count = ctypes.c_int()
        self._check(lib.LiteRtGetNumProfilerEvents(profiler, ctypes.byref(count)), "counting the profiler's events")
        if not 0 < count.value < _PROFILER_CAPACITY:
            return
        events = (_ProfiledEvent * count.value)()
        self._check(lib.LiteRtGetProfilerEvents(profiler, count.value, events), "reading the profiler's events")
        # XNNPACK reports its own operators under other event types; a node LiteRT invoked is either a built-in op
        # (its op name) or, unprofiled, a delegate's node (the delegate's name)
        ops: Dict[str, int] = {}
        for event in events:
            tag = (event.tag or b"").decode(errors="replace")
            if event.event_type == _OPERATOR_INVOKE_EVENT and "Delegate" not in tag:
                ops[tag] = ops.get(tag, 0) + 1
        self.builtin_ops = dict(sorted(ops.items()))

    def close(self) -> None:
        """Destroy every handle (buffers, compiled model, model, environment: the reverse of their creation)."""
        while self._handles:
            destroy, handle = self._handles.pop()
            getattr(self._lib, destroy)(handle)
        self._in_arrays = self._out_arrays = []
        self._content = None

    def __del__(self):  # an engine deactivates it; this frees one dropped without that
        if getattr(self, "_handles", None):
            self.close()
