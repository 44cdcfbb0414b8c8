"""A NumPy reference executor for Core ML ML programs (``.mlpackage``), for machines without Core ML.

Core ML's ``predict`` runs only on macOS, and coremltools has no executor of its own, so on
Linux this module is what runs an exported Core ML artifact: it reads the package's ML
program with coremltools' milproto loader (weights included) and executes it op by op with
the implementations in :mod:`runtime_py.mil_ops`, computing in the dtypes the program
declares (fp16 where the program computes in fp16). After every op the result's dtype and
shape are checked against what the program declares, so a wrong op semantic shows up as an
error at the op that has it instead of as a vague output difference.

Usage::

    run = load_mlpackage("model.mlpackage")      # needs coremltools (loading only)
    outputs = run({"image": ..., "mask": ...})   # dict name -> numpy array

Feeds and results follow what Core ML's Python ``predict`` takes and returns:

* tensor inputs/outputs: arrays of the declared shape (our exports: NCHW float32);
* image inputs: uint8 arrays, (H, W, 3) RGB for colour images, (H, W) or (H, W, 1) for
  grayscale; the program itself holds the scale/bias pre-processing Core ML applies;
* image outputs: uint8 (H, W, 3) RGB arrays (values clipped to [0, 255] and rounded).

:meth:`MILProgram.predict` is the same with the runtime engines' batch-of-one convention:
image inputs may carry a leading batch axis of 1 ((1,H,W,3), (1,H,W,1)) and image outputs
come back as (1,H,W,3).

Two execution paths (``mode``, :mod:`runtime_py.mil_ops`): ``fast`` (the default, and what the
export's parity gate runs: convolutions through ONNX Runtime's float32 convolution, rounded to fp16 where
the program computes in fp16) and ``exact`` (the op-by-op path: per-tap products, gathered
bilinear weights). The environment variable ``GMCNN_MIL_EXECUTOR=exact`` switches the default,
e.g. for an export whose gate should run the exact path.

A run holds a value only until the last op that reads it (:meth:`MILProgram.release_plan`); program
inputs that no op reads, constants and program outputs stay until the end. Holding every value
to the end of the run made the Core ML gate at 1024x1360 an export's largest stage (issue 17;
docs/COREML.md, "Executor memory").

Inside :func:`sharing_model_core` (the export's Core ML gates), a program whose model core -- every op computed
from the first convolution's input and constants alone -- is op for op, constant for constant, the core of another
program run there, and whose core input comes out bit for bit the same on a sample, takes the values its other ops
read from that core from the other program's run instead of computing them again (:class:`ModelCore`): the
``tensor`` and ``image`` packages of one precision differ only in the ops around the core, so the second of them
computes those alone. The values are the same bits either way; nothing is shared outside the block.

Only :func:`load_mlpackage` / :func:`load_program` import coremltools; executing a loaded
program needs NumPy alone.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from .errors import MissingDependencyError, UserError
from .memory import reuse_freed_memory
from .mil_ops import EXECUTOR_MODES, OPS, op_table

EXECUTOR_NAME = "coreml-reference-executor"

#: environment variable naming the default execution path (``fast`` or ``exact``)
MODE_ENV = "GMCNN_MIL_EXECUTOR"


def default_mode() -> str:
    """``fast`` unless $GMCNN_MIL_EXECUTOR says ``exact``; any other value is one clear error."""
    mode = os.environ.get(MODE_ENV, "").strip() or "fast"
    if mode not in EXECUTOR_MODES:
        raise UserError(f"{MODE_ENV}={mode!r} is not one of {', '.join(EXECUTOR_MODES)}")
    return mode


# Ops that only compute constants; the executor evaluates them once, at load time, as Core ML does.
CONSTEXPR_PREFIX = "constexpr_"


class UnsupportedOpError(UserError):
    """The program contains an op the reference executor does not implement."""


@dataclass
class Step:
    op_type: str
    name: str
    inputs: Dict[str, Union[str, Tuple[str, ...]]]  # input name -> var name, or tuple of var names
    outputs: List[Tuple[str, np.dtype, Optional[Tuple[int, ...]]]]  # (var name, dtype, static shape)


@dataclass
class TensorSpec:
    """One program input/output as the model description declares it."""

    name: str
    dtype: np.dtype
    shape: Tuple[int, ...]
    kind: str = "tensor"  # tensor | image
    color: str = ""  # RGB | BGR | GRAYSCALE for images


@dataclass(frozen=True)
class ModelCore:
    """The model core of a program: the ops computed from one value, ``cut`` (the first convolution's input, made by
    an op), and constants alone.

    ``digests``: each core value's name -> a digest of how it is computed: its op type, the executor path, its
    inputs (the cut, constants by their content, core values by their digests) and its dtype and shape. Two core
    values with one digest, computed from cut values with the same bytes, are the same bytes (the executor is
    deterministic), and so are all the values they were computed from. ``readers``: each core value's name -> the
    values made by the ops that read it. ``outputs``: the core values the program returns."""

    cut: str
    digests: Dict[str, str]
    readers: Dict[str, Tuple[str, ...]]
    outputs: frozenset


def _digest_of_value(value) -> str:
    """sha256 of a constant's or a value's dtype, shape and bytes (repr for non-arrays)."""
    h = hashlib.sha256()
    if isinstance(value, np.ndarray) and not value.dtype.hasobject:
        h.update(f"{value.dtype.str}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    else:
        h.update(repr(value).encode())
    return h.hexdigest()


def _names(ref) -> Tuple[str, ...]:
    return ref if isinstance(ref, tuple) else (ref,)


def find_model_core(program: "MILProgram") -> Optional[ModelCore]:
    """The program's :class:`ModelCore`; None where it has no convolution or the first one reads a program input."""
    first_conv = next((step for step in program.steps if step.op_type == "conv"), None)
    made = {step.outputs[0][0] for step in program.steps}
    if first_conv is None or not isinstance(first_conv.inputs.get("x"), str) or first_conv.inputs["x"] not in made:
        return None
    cut = first_conv.inputs["x"]
    constant_digests: Dict[str, str] = {}
    digests: Dict[str, str] = {}
    readers: Dict[str, List[str]] = {}
    for step in program.steps:
        refs, in_core, reads_core = [], True, False
        for key in sorted(step.inputs):
            for name in _names(step.inputs[key]):
                if name == cut or name in digests:
                    refs.append((key, digests.get(name, "cut")))
                    reads_core = True
                elif name in program.constants:
                    if name not in constant_digests:
                        constant_digests[name] = _digest_of_value(program.constants[name])
                    refs.append((key, "constant", constant_digests[name]))
                else:
                    in_core = False
        name, dtype, shape = step.outputs[0]
        if in_core and reads_core:
            how = (program.mode, step.op_type, refs, np.dtype(dtype).str, shape)
            digests[name] = hashlib.sha256(repr(how).encode()).hexdigest()
        for ref in step.inputs.values():
            for read in _names(ref):
                if read in digests:
                    readers.setdefault(read, []).append(name)
    return ModelCore(cut, digests, {n: tuple(readers.get(n, ())) for n in digests},
                     frozenset(spec.name for spec in program.outputs if spec.name in digests))


@dataclass(frozen=True)
class _SharingPlan:
    """What a run of one program does inside :func:`sharing_model_core`: ``common``, its core values that another
    registered program computes too; ``frontier``, those of them its other ops read or it returns (all it needs of
    ``common``); ``keep``, those of them another registered program's frontier has."""

    common: frozenset
    frontier: Tuple[str, ...]
    keep: frozenset


class CoreSharing:
    """The values shared inside one :func:`sharing_model_core` block among the registered programs' cores:
    ``values[(digest, cut digest)]`` (read-only copies); ``runs_served``: the runs that took their frontier from
    them."""

    def __init__(self, cores: List[ModelCore]):
        self._registered = Counter(frozenset(core.digests.values()) for core in cores)
        self._presence = Counter(d for core in cores for d in set(core.digests.values()))
        self._plans: Dict[frozenset, _SharingPlan] = {}
        fronts = [(core, self._common_and_frontier(core)[1]) for core in cores]
        self._wanted = Counter(core.digests[name] for core, frontier in fronts for name in frontier)
        self.values: Dict[Tuple[str, str], np.ndarray] = {}
        self.runs_served = 0

    def _common_and_frontier(self, core: ModelCore) -> Tuple[frozenset, Tuple[str, ...]]:
        itself = 1 if self._registered[frozenset(core.digests.values())] else 0
        common = frozenset(n for n, d in core.digests.items() if self._presence[d] > itself)
        frontier = tuple(sorted(n for n in common if n in core.outputs or any(r not in common for r in core.readers[n])))
        return common, frontier

    def plan(self, core: ModelCore) -> _SharingPlan:
        key = frozenset(core.digests.values())
        if key not in self._plans:
            common, frontier = self._common_and_frontier(core)
            own = Counter(core.digests[n] for n in frontier) if self._registered[key] else Counter()
            keep = frozenset(n for n in common if self._wanted[core.digests[n]] > own[core.digests[n]])
            self._plans[key] = _SharingPlan(common, frontier, keep)
        return self._plans[key]

    def frontier_of(self, core: ModelCore, plan: _SharingPlan, cut_digest: str) -> Optional[Dict[str, np.ndarray]]:
        """The frontier's values for a cut with bytes of ``cut_digest``, or None unless all are kept."""
        found = {name: self.values.get((core.digests[name], cut_digest)) for name in plan.frontier}
        return found if found and all(v is not None for v in found.values()) else None

    def keep(self, core: ModelCore, name: str, cut_digest: str, value: np.ndarray) -> None:
        kept = np.array(value, copy=True)
        kept.flags.writeable = False  # an op writing into an input would raise, not change another run's value
        self.values[(core.digests[name], cut_digest)] = kept


_sharing: Optional[CoreSharing] = None


@contextlib.contextmanager
def sharing_model_core(paths, mode: Optional[str] = None):
    """A block inside which runs of the programs of ``paths`` (``.mlpackage`` files, loaded here once to find their
    cores, :func:`find_model_core`) share their model cores' values: a program run after another whose core it has,
    on a sample whose cut value has the same bytes, computes only the ops outside its core. Yields the
    :class:`CoreSharing`; its values go with the block. Programs loaded with another ``mode`` (executor path) share
    nothing with these (the path is part of each digest). A package that does not load shares nothing: its own run
    says why, as outside the block."""
    global _sharing
    mode = default_mode() if mode is None else mode
    cores = []
    for path in paths:
        try:
            core = find_model_core(load_program(path, mode=mode))
        except UserError:  # unreadable, an op the executor lacks, coremltools missing: the package's gate reports it
            continue
        if core is not None:
            cores.append(core)
    previous, _sharing = _sharing, CoreSharing(cores)
    try:
        yield _sharing
    finally:
        _sharing = previous


def runs_served_by_sharing() -> int:
    """Runs inside the current :func:`sharing_model_core` block that took their core's values from an earlier run
    (0 outside one)."""
    return _sharing.runs_served if _sharing is not None else 0


@dataclass
class MILProgram:
    """A loaded ML program: constants evaluated, ops in execution order, I/O declarations."""

    inputs: List[TensorSpec]
    outputs: List[TensorSpec]
    steps: List[Step]
    constants: Dict[str, object]
    op_counts: Dict[str, int]
    spec_version: int = 0
    metadata: Dict[str, str] = field(default_factory=dict)
    check: bool = True  # verify each op's output dtype/shape against the program
    mode: str = "fast"  # fast | exact (module docstring)
    decompressed: set = field(default_factory=set)  # constants made by constexpr_* ops (compressed weights)
    release: bool = True  # drop each value after its last reader (False: keep all to the end, as before issue 17)
    _release_plan: Optional[List[Tuple[str, ...]]] = field(default=None, init=False, repr=False, compare=False)
    _core: object = field(default=None, init=False, repr=False, compare=False)  # ModelCore, or False: none

    def model_core(self) -> Optional[ModelCore]:
        """:func:`find_model_core`, computed once per program."""
        if self._core is None:
            self._core = find_model_core(self) or False
        return self._core or None

    def release_plan(self) -> List[Tuple[str, ...]]:
        """For each step (same index as :attr:`steps`), the names of the values no later step reads: the step's
        inputs read for the last time, and its own result when nothing reads it. Constants and program outputs
        never appear. Computed once per program."""
        if self._release_plan is None:
            last: Dict[str, int] = {}
            for i, step in enumerate(self.steps):
                for v in step.inputs.values():
                    for n in (v if isinstance(v, tuple) else (v,)):
                        last[n] = i
                last.setdefault(step.outputs[0][0], i)
            kept = set(self.constants) | {spec.name for spec in self.outputs}
            plan: List[List[str]] = [[] for _ in self.steps]
            for n, i in last.items():
                if n not in kept:
                    plan[i].append(n)
            self._release_plan = [tuple(names) for names in plan]
        return self._release_plan

    # -- feeds

    def _prepare(self, spec: TensorSpec, value) -> np.ndarray:
        if spec.kind == "image":
            return image_to_tensor(value, spec)
        arr = np.asarray(value)
        if tuple(arr.shape) != tuple(spec.shape):
            raise UserError(f"input {spec.name!r}: shape {arr.shape} does not match the model's {spec.shape}")
        return arr.astype(spec.dtype, copy=False)

    def __call__(self, feed: Dict[str, object], *, timings: Optional[Dict[str, float]] = None,
                 observe: Optional[Callable[[Step, np.ndarray], None]] = None) -> Dict[str, np.ndarray]:
        """Run the program. ``feed`` maps input names to arrays (see module docstring for layouts).
        ``observe(step, result)`` is called after every op (calibration reads activations through it), before
        the values that op read for the last time are released."""
        missing = [s.name for s in self.inputs if s.name not in feed]
        if missing:
            raise UserError(f"missing model input(s) {missing}; the model takes {[s.name for s in self.inputs]}")
        env: Dict[str, object] = dict(self.constants)
        for spec in self.inputs:
            env[spec.name] = self._prepare(spec, feed[spec.name])
        ops = op_table(self.mode)
        plan = self.release_plan() if self.release else [()] * len(self.steps)
        sharing = _sharing if observe is None else None  # an observer sees every op
        core = self.model_core() if sharing is not None else None
        with reuse_freed_memory():  # every op allocates its result afresh: 1.6x faster at 1024x1360
            self._run_steps(env, ops, plan, timings, observe, (sharing, core) if core is not None else None)
        out = {}
        for spec in self.outputs:
            value = np.asarray(env[spec.name])
            out[spec.name] = tensor_to_image(value, spec) if spec.kind == "image" else value.astype(spec.dtype, copy=False)
        return out

    def _run_steps(self, env: Dict[str, object], ops, plan, timings, observe, shared=None) -> None:
        """The ops in order, each result into ``env`` and the values read for the last time (``plan``) out of it.
        ``shared``: (:class:`CoreSharing`, this program's :class:`ModelCore`) inside :func:`sharing_model_core`: the
        values its plan keeps go to it; where its frontier is there for this run's cut, the shared values' ops
        are not run."""
        sharing, core = shared if shared is not None else (None, None)
        sharing_plan = sharing.plan(core) if sharing is not None else None
        cut_digest: Optional[str] = None
        served = False  # the shared values' frontier came from an earlier run: the ops making them are not run
        for step, done in zip(self.steps, plan):
            if served and step.outputs[0][0] in sharing_plan.common:
                for n in done:
                    env.pop(n, None)  # a core value this run never made
                continue
            kwargs = {
                k: (tuple(env[n] for n in v) if isinstance(v, tuple) else env[v]) for k, v in step.inputs.items()
            }
            t0 = time.perf_counter() if timings is not None else 0.0
            result = ops[step.op_type](**kwargs)
            if timings is not None:
                timings[step.op_type] = timings.get(step.op_type, 0.0) + time.perf_counter() - t0
            name, dtype, shape = step.outputs[0]
            if self.check:
                _check_result(step, result, dtype, shape)
            if observe is not None:
                observe(step, result)
            env[name] = result
            if sharing_plan is not None and (sharing_plan.frontier or sharing_plan.keep):
                if name == core.cut:
                    cut_digest = _digest_of_value(np.asarray(result))
                    frontier = sharing.frontier_of(core, sharing_plan, cut_digest)
                    if frontier is not None:
                        env.update(frontier)
                        served = True
                        sharing.runs_served += 1
                elif cut_digest is not None and name in sharing_plan.keep:
                    sharing.keep(core, name, cut_digest, np.asarray(result))
            for n in done:
                del env[n]
            # the loop's own names would keep this op's inputs and result alive through the next op
            del kwargs, result

    def predict(self, feed: Dict[str, object]) -> Dict[str, np.ndarray]:
        """``__call__`` with batch-of-one image arrays in and out (runtime_py.engines convention)."""
        out = self(self.unbatched(feed))
        kinds = {s.name: s.kind for s in self.outputs}
        return {k: (v[None] if kinds[k] == "image" else v) for k, v in out.items()}

    @staticmethod
    def unbatched(feed: Dict[str, object]) -> Dict[str, object]:
        """An engine's feed (uint8 images batch-of-one: (1,H,W,3) RGB, (1,H,W,1) mask) as ``__call__`` takes it
        ((H,W,3), (H,W,1)); float tensors unchanged."""
        return {k: _drop_batch(v) for k, v in feed.items()}


def _drop_batch(value):
    arr = np.asarray(value)
    return arr[0] if arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[0] == 1 else arr


def _check_result(step: Step, result, dtype, shape) -> None:
    if not isinstance(result, np.ndarray) or result.dtype != dtype:
        got = getattr(result, "dtype", type(result).__name__)
        raise RuntimeError(f"op {step.name!r} ({step.op_type}) produced {got}, the program declares {dtype}")
    if shape is not None and tuple(result.shape) != tuple(shape):
        raise RuntimeError(f"op {step.name!r} ({step.op_type}) produced shape {result.shape}, the program declares {shape}")


# ------------------------------------------------------------------------ image I/O

def image_to_tensor(value, spec: TensorSpec) -> np.ndarray:
    """uint8 image (H,W,3) RGB or (H,W)/(H,W,1) gray -> float (1,C,H,W) in [0,255], the way Core ML feeds an image input."""
    arr = np.asarray(value)
    if arr.dtype != np.uint8:
        raise UserError(f"image input {spec.name!r} must be uint8, got {arr.dtype}")
    _, c, h, w = spec.shape
    if spec.color == "GRAYSCALE":
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.shape != (h, w):
            raise UserError(f"grayscale image input {spec.name!r} must be ({h}, {w}), got {arr.shape}")
        chw = arr[None]
    else:
        if arr.shape != (h, w, 3):
            raise UserError(f"RGB image input {spec.name!r} must be ({h}, {w}, 3), got {arr.shape}")
        chw = arr.transpose(2, 0, 1)
        if spec.color == "BGR":
            chw = chw[::-1]
    return np.ascontiguousarray(chw[None]).astype(spec.dtype)


def tensor_to_image(value: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """float (1,C,H,W) -> uint8 (H,W,3) RGB or (H,W) gray, clipped to [0,255] and rounded."""
    chw = np.asarray(value, np.float32)[0]
    if spec.color == "BGR":
        chw = chw[::-1]
    u8 = np.clip(np.rint(chw), 0, 255).astype(np.uint8)
    return u8[0] if spec.color == "GRAYSCALE" else np.ascontiguousarray(u8.transpose(1, 2, 0))


# ------------------------------------------------------------------------ loading

@contextlib.contextmanager
def quiet_coremltools():
    """Silence what importing coremltools says on every run off macOS: its "untested torch/tensorflow
    version" notices and one "Failed to load _ML...Proxy: No module named 'coremltools.libcoremlpython'"
    per missing native proxy (eight lines a process; Linux has no Core ML runtime, and the reference
    executor is how packages run here), and TensorFlow's C++ start-up lines when coremltools brings
    TensorFlow in (``TF_CPP_MIN_LOG_LEVEL`` 2 unless set). Its errors still get through."""
    import logging
    import warnings

    # coremltools imports TensorFlow when it is installed: its C++ start-up lines (CUDA stubs, CPU
    # features) are not the user's business either, unless they asked for them
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def import_coremltools(purpose: str = "reading .mlpackage files"):
    """``coremltools``, imported quietly (:func:`quiet_coremltools`); MissingDependencyError naming
    ``purpose`` without it."""
    try:
        with quiet_coremltools():
            import coremltools
            # the native proxies' modules are imported on first use of MLModel / compute plans
            import coremltools.models.compute_plan  # noqa: F401
            import coremltools.models.model  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("coremltools", "export", purpose) from exc
    return coremltools


def _import_coremltools():
    coremltools = import_coremltools()
    try:
        with quiet_coremltools():
            from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
            from coremltools.converters.mil.mil import types
    except ImportError as exc:
        raise MissingDependencyError("coremltools", "export", "reading .mlpackage files") from exc
    return coremltools, milproto_load, types


def _description_specs(description, role: str) -> Dict[str, Tuple[str, str]]:
    """name -> (kind, color) from the model description's inputs or outputs."""
    out = {}
    for feature in getattr(description, role):
        which = feature.type.WhichOneof("Type")
        if which == "imageType":
            from coremltools.proto import FeatureTypes_pb2

            color = FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(feature.type.imageType.colorSpace)
            out[feature.name] = ("image", color)
        else:
            out[feature.name] = ("tensor", "")
    return out


def load_program(path: Union[str, Path], function: str = "main", mode: Optional[str] = None) -> MILProgram:
    """Read an .mlpackage's ML program and prepare it for execution (``mode``: fast | exact, None
    :func:`default_mode`).

    Raises UserError for a missing/unreadable package or a non-ML-program model, and
    UnsupportedOpError naming every op type the executor does not implement.
    """
    path = Path(path)
    mode = default_mode() if mode is None else mode
    op_table(mode)  # an unknown mode fails here, before the slow load
    if not path.exists():
        raise UserError(f"{path}: no such Core ML package")
    ct, milproto_load, types = _import_coremltools()
    try:
        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
    except Exception as exc:  # coremltools raises assorted types for corrupt packages
        raise UserError(f"{path}: not a readable Core ML package ({type(exc).__name__}: {exc})") from None
    if spec.WhichOneof("Type") != "mlProgram":
        raise UserError(f"{path}: model type {spec.WhichOneof('Type')!r} is not an ML program")
    program = milproto_load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)
    if function not in program.functions:
        raise UserError(f"{path}: the ML program has no function {function!r}")
    func = program.functions[function]

    ops = list(func.operations)
    if any(op.blocks for op in ops):
        raise UnsupportedOpError(f"{path}: control-flow ops with nested blocks are not supported")
    counts = Counter(op.op_type for op in ops)
    unknown = sorted(t for t in counts if t != "const" and t not in OPS)
    if unknown:
        raise UnsupportedOpError(
            f"{path}: the reference executor does not implement op(s) {', '.join(unknown)}"
        )

    def np_dtype(var) -> np.dtype:
        return np.dtype(types.nptype_from_builtin(var.dtype))

    def static_shape(var):
        shape = var.shape
        return tuple(int(s) for s in shape) if all(isinstance(s, (int, np.integer)) for s in shape) else None

    in_kinds = _description_specs(spec.description, "input")
    out_kinds = _description_specs(spec.description, "output")
    inputs = [
        TensorSpec(name, np_dtype(var), static_shape(var), *in_kinds.get(name, ("tensor", "")))
        for name, var in func.inputs.items()
    ]
    outputs = [TensorSpec(v.name, np_dtype(v), static_shape(v), *out_kinds.get(v.name, ("tensor", ""))) for v in func.outputs]

    constants: Dict[str, object] = {}
    steps: List[Step] = []
    for op in ops:
        if len(op.outputs) != 1:
            raise UnsupportedOpError(f"{path}: op {op.name!r} ({op.op_type}) has {len(op.outputs)} outputs")
        out = op.outputs[0]
        if op.op_type == "const":
            val = out.val
            constants[out.name] = val if isinstance(val, (str, bool)) else np.asarray(val)
            continue
        step_inputs = {}
        for key, var in op.inputs.items():
            step_inputs[key] = tuple(v.name for v in var) if isinstance(var, (list, tuple)) else var.name
        step = Step(op.op_type, op.name, step_inputs, [(out.name, np_dtype(out), static_shape(out))])
        if op.op_type.startswith(CONSTEXPR_PREFIX):
            kwargs = {k: (tuple(constants[n] for n in v) if isinstance(v, tuple) else constants[v]) for k, v in step_inputs.items()}
            value = OPS[op.op_type](**kwargs)
            _check_result(step, value, *step.outputs[0][1:])
            constants[out.name] = value
        else:
            steps.append(step)
    metadata = dict(spec.description.metadata.userDefined)
    decompressed = {step_out for op in ops if op.op_type.startswith(CONSTEXPR_PREFIX) for step_out in [op.outputs[0].name]}
    return MILProgram(inputs, outputs, steps, constants, dict(counts), spec.specificationVersion, metadata,
                      mode=mode, decompressed=decompressed)


def load_mlpackage(path: Union[str, Path], mode: Optional[str] = None) -> Callable[[Dict[str, object]], Dict[str, np.ndarray]]:
    """The runtime's Core ML engine off macOS: a callable ``feed dict -> output dict`` (see module docstring)."""
    return load_program(path, mode=mode)


def op_inventory(path: Union[str, Path]) -> Dict[str, int]:
    """Count of each op type in the package's main function (const included)."""
    return dict(sorted(load_program(path).op_counts.items()))
