"""The TensorFlow half of the TFLite export, run as a child process.

    python -m export.tflite_worker PLAN.json     # one plan, then exit
    python -m export.tflite_worker               # plans from stdin until EOF: one JSON line each,
                                                 # {"plan": PLAN.json, "stderr": file for its fd 2}

An export keeps one worker for its whole run (:func:`export.tflite.session`, a
:func:`export.tflite.kept_worker` block: the plan of each conversion call on stdin in turn, EOF at the
end); so does the test suite, per test process. A conversion call outside such a block gets a worker of
its own (its plan, then EOF).

For each job of the plan (one ONNX file = one shape and I/O signature): onnx2tf writes a
saved_model, then the TFLite converter makes each requested precision from that
saved_model, the flatbuffer post-passes run (:mod:`export.tflite_graph`), and the TFLite
analyzer's GPU-compatibility report is captured. Only the precisions asked for are
converted: onnx2tf's own .tflite outputs and its ``-oiqt`` variants (which include slow
int16 builds) are never made.

Why a child process: the parent (PyTorch export, LiteRT parity) never imports
TensorFlow; onnx2tf runs ONNX Runtime over every intermediate tensor (memory heavy at
full size), prints a great deal and calls ``sys.exit`` on failure. Each job's output goes
to its own log file; progress and results go to the parent as JSON lines on stdout.

Plan (JSON)::

    {"options": {...},    # the export's options (export.options.ExportOptions.to_json): threads,
                          # range_method, int8_tail, pad_mode, upsample_mode, ...
     "jobs": [{"name": str, "onnx": path, "saved_model": dir, "log": path,
               "reuse_saved_model": bool,                           # skip onnx2tf (fallback candidates)
               "cind": {"image": npy, "mask": npy},            # NHWC samples for onnx2tf
               "artifacts": [{"precision": "fp32|fp16|int8-dynamic|int8|int16x8", "io": "tensor|image",
                              "out": path, "calibration": {"image": npy, "mask": npy} | null,
                              "quant": {"calibrated": path, "float_nodes": [str], "float_model": path,
                                        "converted": path,
                                        "share": {"keep": dir, "source": file} | {"reuse": true} | null} | null,
                              "metadata": {...}}]}]}
"""
from __future__ import annotations

import contextlib
import io as _io
import json
import os
import sys
import time
import traceback
from typing import Optional, Tuple

from runtime_py.memory import AnonPeak, anon_rss_bytes, mib, peak_rss_bytes, reset_peak_rss

from .options import ExportOptions
from .tflite import EVENT_PREFIX


class _Events:
    """JSON lines to the parent on a private duplicate of the original stdout."""

    def __init__(self):
        self._fd = os.dup(1)

    def send(self, **event) -> None:
        os.write(self._fd, (EVENT_PREFIX + json.dumps(event) + "\n").encode())


@contextlib.contextmanager
def _log_to(path: str):
    """Send fd 1 and 2 (Python and C++ output alike) to ``path`` inside the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


class _Meter:
    """This process's peaks per stage -- resident (``VmHWM``, restarted at each stage) and anonymous (sampled,
    :class:`runtime_py.memory.AnonPeak`) -- and the stages measured inside another (calibration inside a
    conversion): the outer stage's peaks are carried across them."""

    def __init__(self):
        self.carried = (0, 0)
        self.inner: list = []
        self._anon = None  # its sampling thread starts with the first stage, in the worker only

    def _reset(self) -> None:
        reset_peak_rss()
        self._anon.reset()

    def start(self) -> float:
        if self._anon is None:
            self._anon = AnonPeak()
        self.carried = (0, 0)
        self.inner = []
        self._reset()
        return time.time()

    def peak(self) -> int:
        return max(self.carried[0], peak_rss_bytes())

    def peak_anon(self) -> int:
        return max(self.carried[1], self._anon.peak())

    @contextlib.contextmanager
    def inner_stage(self, name: str):
        self.carried = (self.peak(), self.peak_anon())
        self._reset()
        t0 = time.time()
        try:
            yield
        finally:
            self.inner.append({"stage": name, "t_start": t0, "seconds": round(time.time() - t0, 3),
                               "peak_rss": peak_rss_bytes(), "peak_anon": self._anon.peak()})
            self._reset()


_METER = _Meter()


def check_onnx(onnx_path: str) -> None:
    """Fail early (before TensorFlow starts) on an ONNX file onnx2tf could not read."""
    import onnx

    onnx.checker.check_model(onnx.load(onnx_path))


def _values_bytes(onnx_path: str) -> int:
    """Bytes of every value the ONNX graph computes (float32 sizes; its nodes' outputs, shapes inferred):
    what onnx2tf's validation run of ONNX Runtime returns at once."""
    import numpy as np
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(onnx_path))
    total = 0
    for info in list(model.graph.value_info) + list(model.graph.output):
        dims = [d.dim_value for d in info.type.tensor_type.shape.dim]
        total += 4 * int(np.prod(dims)) if dims and all(dims) else 0
    return total


def _pinned_onnx2tf(module: str, name: str):
    """(onnx2tf's submodule ``module``, its attribute ``name``), or None where onnx2tf's layout is not the pinned
    version's (what the patches of its internals below need)."""
    import importlib

    try:
        found = importlib.import_module(f"onnx2tf.{module}")
    except ImportError:
        return None
    value = getattr(found, name, None)
    return None if value is None else (found, value)


@contextlib.contextmanager
def _onnx2tf_validation_run(folder: str, onnx_path: str, threads: int):
    """onnx2tf's validation run of ONNX Runtime (every intermediate value of the graph, which its strict mode
    compares each converted op against), made cheaper in time and memory; the same values, so the same
    conversion (the tiny reference export's bytes; the default model's fp32 file at 512x680 and 1024x1360).

    * **Threads.** onnx2tf gives that session ``psutil.cpu_count() - 1`` threads: one on a 2-core machine, where
      the run was nearly all of onnx2tf's time (77.8 of 86.5 s at 1024x1360, profiled); its view of the cores
      is made ``threads + 1``, the export's ``--threads`` (57.8 s at 2 threads, docs/EXPORT.md).
    * **Memory.** Its outputs go to memory-mapped files in ``folder`` instead of RAM: onnx2tf does that only when
      they exceed 80 % of the available memory, so its view of the available memory says none is. The pages are
      the page cache's, written back and dropped under memory pressure, and the folder is removed after. Not
      when the disk has no room for them (onnx2tf would then skip its validation silently and convert otherwise).

    Yields whether the outputs go to disk; neither applies where onnx2tf's internals differ from the pinned
    version's."""
    import shutil
    import types

    found = _pinned_onnx2tf("utils.common_functions", "psutil")
    if found is None:  # pragma: no cover - another onnx2tf layout
        yield False
        return
    common_functions, real = found
    os.makedirs(folder, exist_ok=True)
    try:
        on_disk = real.disk_usage(folder).free >= 2 * _values_bytes(onnx_path)

        def virtual_memory():
            return real.virtual_memory()._replace(available=-1) if on_disk else real.virtual_memory()

        common_functions.psutil = types.SimpleNamespace(cpu_count=lambda logical=True: max(1, threads) + 1,
                                                        disk_usage=real.disk_usage, virtual_memory=virtual_memory)
        try:
            yield on_disk
        finally:
            common_functions.psutil = real
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class ValidationRunSkipped(RuntimeError):
    """Raised in onnx2tf's place of its validation run, which it treats as a graph ONNX Runtime cannot run."""


@contextlib.contextmanager
def _without_validation_run():
    """onnx2tf converts without its validation run (:mod:`export.onnx2tf_validation`): its call of the run raises
    :class:`ValidationRunSkipped`, which onnx2tf catches as it does a graph ONNX Runtime cannot run (it logs that
    its "shape estimation is skipped" and converts with no values to compare against). Yields whether that
    applies; not where onnx2tf's internals differ from the pinned version's (the run then happens)."""
    found = _pinned_onnx2tf("onnx2tf", "dummy_onnx_inference")
    if found is None:  # pragma: no cover - another onnx2tf layout
        yield False
        return
    converter, real = found

    def skipped(**_):
        raise ValidationRunSkipped("gmcnn-mobile skipped onnx2tf's validation run (no op of the graph reads it)")

    converter.dummy_onnx_inference = skipped
    try:
        yield True
    finally:
        converter.dummy_onnx_inference = real


def validation_run_reason(onnx_path: str, mode: str) -> Optional[str]:
    """Why onnx2tf's validation run of ``onnx_path`` happens (``None``: it is skipped): ``mode`` ``always``, or
    in ``auto`` the first op of the graph whose onnx2tf handler could read it
    (:func:`export.onnx2tf_validation.ambiguity`)."""
    import onnx

    from .onnx2tf_validation import ambiguity

    if mode == "always":
        return "--onnx2tf-validation always"
    return ambiguity(onnx.load(onnx_path))


def run_onnx2tf(onnx_path: str, saved_model: str, cind: dict, threads: int = 2, validation: str = "auto") -> None:
    """ONNX -> saved_model through onnx2tf, its validation run as ``validation`` says (``auto``: only where an op
    of the graph could read it; ``always``)."""
    import numpy as np
    import onnx2tf
    import tensorflow as tf
    import tf_keras

    params = []
    for name, path in cind.items():
        channels = int(np.load(path, mmap_mode="r").shape[-1])
        params.append([name, path, [0.0] * channels, [1.0] * channels])
    folder = os.path.join(os.path.dirname(saved_model), "onnx2tf_validation_outputs")
    reason = validation_run_reason(onnx_path, validation)
    arguments = dict(
        input_onnx_file_path=onnx_path,
        output_folder_path=saved_model,
        not_use_onnxsim=True,  # the exporter already ran onnxsim
        custom_input_op_name_np_data_path=params,
        disable_model_save=True,  # we write the saved_model ourselves, and no .tflite
        verbosity="info",
    )
    try:
        with contextlib.ExitStack() as stack:
            skipped = reason is None and stack.enter_context(_without_validation_run())
            if skipped:
                print("gmcnn-mobile: onnx2tf's validation run skipped: no op of this graph is one whose handler "
                      "reads it (onnx2tf's warning below that its shape estimation is skipped says so)", flush=True)
            else:
                on_disk = stack.enter_context(_onnx2tf_validation_run(folder, onnx_path, threads))
                print(f"gmcnn-mobile: onnx2tf's validation run on {threads} thread(s), its outputs "
                      f"{'on disk in ' + folder if on_disk else 'in memory'} ({reason or 'onnx2tf not as pinned'})",
                      flush=True)
                arguments.update(onnxruntime_output_memmap=on_disk,
                                 onnxruntime_output_memmap_dir=folder if on_disk else None)
            model = onnx2tf.convert(**arguments)
    except SystemExit as exc:  # onnx2tf reports errors by exiting
        raise RuntimeError(f"onnx2tf exited with status {exc.code}") from None
    if model is None:
        raise RuntimeError("onnx2tf returned no model")
    signature = [tf.TensorSpec(t.shape, t.dtype, name=t.name.split(":")[0]) for t in model.inputs]
    archive = tf_keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name="serving_default", fn=lambda *xs: {"output": model(list(xs))}, input_signature=signature)
    archive.write_out(saved_model)


_CALIBRATION_REPORT: dict = {}
# Precisions with calibrated activations: (activation bits, symmetric grid) -- TFLite's int8 scheme
# (scale and zero point) and its 16x8 scheme (int16 activations, zero point 0).
ACTIVATION_GRIDS = {"int8": (8, False), "int16x8": (16, True)}
_CALIBRATION_SETTINGS = {"bits": 8, "symmetric": False, "method": "minmax", "threads": 2, "share": None,
                         "folder": None, "progress": None}
_CALIBRATION_BUDGET: list = []  # the export's memory budget (bytes), set per plan
_CALIBRATED_MODEL: list = []  # the float model with the chosen ranges, as the last calibration returned it
# the last calibration's convolution input means (export.tflite_calibration.calibrate_ranges' input_means), kept
# beside its calibrated model for the int8-dynamic files' bias correction (export.tflite.calibration_input_means)
_CALIBRATION_MEANS: dict = {}
# and their per-channel ranges (input_ranges), for the int8-dynamic fallback's input channel groups
# (export.tflite.calibration_input_ranges)
_CALIBRATION_RANGES: dict = {}


def _install_calibration() -> None:
    """Make the converter calibrate with :func:`export.tflite_calibration.calibrate_ranges`
    (XNNPACK, multi-threaded, free of the in-place range problem, ranges chosen per tensor)
    instead of its own calibrator."""
    from tensorflow.lite.python.optimize import calibrator

    from .tflite_calibration import calibrate_ranges

    if getattr(calibrator.Calibrator.calibrate, "_gmcnn", False):
        return

    def calibrate(self, dataset_gen):
        with _METER.inner_stage("calibration"):
            memory = calibration_memory(_CALIBRATION_BUDGET[0]) if _CALIBRATION_BUDGET else None
            data, report = calibrate_ranges(self._model_content, dataset_gen, memory_bytes=memory,
                                            input_means=_CALIBRATION_MEANS, input_ranges=_CALIBRATION_RANGES,
                                            **_CALIBRATION_SETTINGS)
        passes = (report.get("groups") or {}).get("passes", [])
        if len(passes) > 1:  # the stage report gets a row per group, inside the calibration's
            for number, row in enumerate(passes, 1):
                _METER.inner.append({"stage": f"calibration group {number}/{len(passes)}", "t_start": row["t_start"],
                                     "seconds": row["seconds"], "peak_rss": row["peak_rss_bytes"],
                                     "peak_anon": row["peak_anon_bytes"], "within": "calibration"})
        _CALIBRATION_REPORT.clear()
        _CALIBRATION_REPORT.update(report)
        _CALIBRATED_MODEL[:] = [data]
        return data

    calibrate._gmcnn = True
    calibrator.Calibrator.calibrate = calibrate


def calibration_memory(budget_bytes: int) -> int:
    """What the memory budget leaves a calibration pass (issue 17): ``budget_bytes`` less the anonymous memory this
    worker and the export process that started it hold as the calibration starts. (When the schedule runs Core ML
    beside this worker, the budget already holds both estimates: ``export.stages.side_by_side``.)"""
    from runtime_py.memory import resident_of

    return max(0, int(budget_bytes) - resident_of(["self", os.getppid()])[1])


def _calibrating_converter(saved_model: str, precision: str, io: str, calibration: dict, options: ExportOptions,
                           share: dict = None):
    """The TFLite converter of a calibrated precision, calibrating with :func:`_install_calibration`'s
    hook (each activation's range chosen by ``options.range_method``, ``options.threads`` threads;
    ``share``: as :func:`export.tflite_calibration.calibrate_ranges` takes it)."""
    import numpy as np
    import tensorflow as tf

    images, masks = np.load(calibration["image"]), np.load(calibration["mask"])

    def representative():
        for i in range(images.shape[0]):
            yield {"image": images[i : i + 1], "mask": masks[i : i + 1]}

    bits, symmetric = ACTIVATION_GRIDS[precision]
    _CALIBRATION_SETTINGS.update(bits=bits, symmetric=symmetric, method=options.range_method, threads=options.threads,
                                 share=share, folder=os.path.dirname(os.path.abspath(saved_model)))
    _CALIBRATION_BUDGET[:] = [int(options.memory_budget_gib * (1 << 30))]
    _install_calibration()
    _CALIBRATION_REPORT.clear()
    _CALIBRATED_MODEL.clear()
    _CALIBRATION_MEANS.clear()
    _CALIBRATION_RANGES.clear()
    conv = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = (
        [tf.lite.OpsSet.TFLITE_BUILTINS_INT8] if precision == "int8" else
        [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS])
    if precision == "int8" and io == "image":
        conv.inference_input_type = tf.uint8
        conv.inference_output_type = tf.uint8
    return conv


def _keep_calibrated(cache: str) -> None:
    """Write the last calibration's model and report to ``cache`` (and ``cache``.json) for fallback candidates, its
    convolution input means to ``cache``.means.json (:data:`export.tflite.CALIBRATION_MEANS_SUFFIX`) for the bias
    correction and their per-channel ranges to ``cache``.ranges.json (:data:`export.tflite.CALIBRATION_RANGES_SUFFIX`)
    for the input channel groups, where it measured them."""
    from .tflite import CALIBRATION_MEANS_SUFFIX, CALIBRATION_RANGES_SUFFIX

    def write_json(path, value):
        with open(path + ".partial", "w") as f:
            json.dump(value, f)
        os.replace(path + ".partial", path)

    if cache and _CALIBRATED_MODEL:
        with open(cache + ".json", "w") as f:
            json.dump(_CALIBRATION_REPORT, f)
        if _CALIBRATION_MEANS:
            write_json(cache + CALIBRATION_MEANS_SUFFIX,
                       {name: [float(v) for v in mean] for name, mean in _CALIBRATION_MEANS.items()})
        if _CALIBRATION_RANGES:
            write_json(cache + CALIBRATION_RANGES_SUFFIX,
                       {name: [[float(v) for v in lo], [float(v) for v in hi]]
                        for name, (lo, hi) in _CALIBRATION_RANGES.items()})
        with open(cache, "wb") as f:
            f.write(_CALIBRATED_MODEL[0])


def calibrated_model(saved_model: str, precision: str, io: str, calibration: dict, options: ExportOptions,
                     quant: dict) -> bytes:
    """The float model with each activation's chosen range (TFLite's calibrated model, before
    quantization); cached at ``quant["calibrated"]`` (fallback candidates reuse it)."""
    cache = quant.get("calibrated")
    # a fallback candidate reuses the calibration of the pure file made just before it: keeping a
    # layer float changes which tensors get quantized, not the float model's statistics
    if cache and quant.get("float_nodes") and os.path.exists(cache) and os.path.exists(cache + ".json"):
        t0 = time.time()
        with open(cache + ".json") as f:
            _CALIBRATION_REPORT.clear()
            _CALIBRATION_REPORT.update(json.load(f))
        with open(cache, "rb") as f:
            data = f.read()
        _CALIBRATION_REPORT.update(statistics_reused=True, calibrated_model_reused=True,
                                   seconds=round(time.time() - t0, 2))
        return data
    conv = _calibrating_converter(saved_model, precision, io, calibration, options, quant.get("share"))
    conv._experimental_calibrate_only = True  # stop after calibration: quantize_calibrated does the rest
    data = conv.convert()
    _keep_calibrated(cache)
    return data


def quantize_16x8(calibrated: bytes) -> bytes:
    """The converter's 16x8 quantizer's own output for a calibrated float model (int16 activations, int8
    per-channel weights, int64 biases, float fallback), before :func:`quantize_calibrated`'s rewrites."""
    import numpy as np
    from tensorflow.lite.python.optimize import calibrator

    # the converter's 16x8 path calibrates and quantizes in one call; the model already holds
    # the chosen ranges, so its quantizer runs with nothing fed (it keeps those min/max)
    return calibrator.Calibrator(calibrated)._calibrator.QuantizeModel(
        np.dtype(np.float32).num, np.dtype(np.float32).num, True, np.dtype(np.int16).num,
        np.dtype(np.int64).num, False, False)


def quantize_calibrated(calibrated: bytes, precision: str, io: str, float_nodes=()) -> bytes:
    """Quantize a calibrated float model as the converter would, leaving the convolutions whose
    output tensors are named in ``float_nodes`` in float.

    int8: the MLIR quantizer (``mlir_quantize``, per-channel int8 weights, int8 activations,
    ``denylisted_nodes``); ``image`` files take and give uint8. int16x8: the converter's 16x8
    quantizer (int16 activations, symmetric; int8 per-channel weights; int64 biases) with float
    fallback allowed, because LiteRT has no int16 ELU (the 43 ELUs stay float between
    DEQUANTIZE and QUANTIZE); it takes no list of float nodes, so the named convolutions are made
    float in its output afterwards (:func:`export.tflite_graph.float_convs_16x8`: the float filters
    and biases of ``calibrated``, their inputs and outputs float); its bilinear resizes always run in float
    (:func:`export.tflite_graph.float_resizes_16x8`).
    """
    if precision == "int8":
        from tensorflow.lite.python.convert import mlir_quantize
        import tensorflow as tf

        io_type = tf.uint8 if io == "image" else tf.float32
        return mlir_quantize(calibrated, disable_per_channel=False, input_data_type=io_type,
                             output_data_type=io_type, denylisted_nodes=list(float_nodes) or None)
    if precision == "int16x8":
        from . import tflite_graph

        model = tflite_graph.read(quantize_16x8(calibrated))
        tflite_graph.float_resizes_16x8(model)  # LiteRT's int16 bilinear resize is far coarser than int16
        if float_nodes:
            tflite_graph.float_convs_16x8(model, tflite_graph.read(calibrated), float_nodes)
        return tflite_graph.write(model)
    raise ValueError(f"{precision} has no calibrated activations")


def convert_precision(saved_model: str, precision: str, io: str, calibration, options: ExportOptions,
                      quant: dict = None) -> bytes:
    """TFLite converter from the saved_model for one precision (see docs/EXPORT.md).

    ``options``: the export's; calibrated precisions use its ``range_method`` and ``threads``.
    ``quant`` (quantized precisions): ``calibrated`` (cache path of the calibrated model),
    ``float_nodes`` (output tensor names of convolutions kept in float: int8 leaves them out of
    quantization; int8-dynamic gives them back their float32 weights from ``float_model``),
    ``converted`` (the converter's own file of the pure precision, which an int8-dynamic candidate
    starts from instead of converting again).
    """
    quant = quant or {}
    if precision == "int8" and not quant.get("float_nodes"):
        # the converter in one call, as before the fallback existed (the same bytes); the calibrated
        # model is kept for the fallback's candidates
        data = _calibrating_converter(saved_model, precision, io, calibration, options, quant.get("share")).convert()
        _keep_calibrated(quant.get("calibrated"))
        return data
    if precision in ACTIVATION_GRIDS:
        calibrated = calibrated_model(saved_model, precision, io, calibration, options, quant)
        return quantize_calibrated(calibrated, precision, io, quant.get("float_nodes") or ())
    if precision == "int8-dynamic" and quant.get("float_nodes") and os.path.exists(quant.get("converted") or ""):
        # a fallback candidate: the converter's output of the pure file made just before it (the
        # converter is deterministic), with the kept layers' float32 filters given back below
        with open(quant["converted"], "rb") as f:
            return _restore_float_weights(f.read(), quant)
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    if precision == "fp16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif precision == "int8-dynamic":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    elif precision != "fp32":
        raise ValueError(f"unknown TFLite precision {precision!r}")
    data = conv.convert()
    if precision == "int8-dynamic" and quant.get("float_nodes"):
        data = _restore_float_weights(data, quant)
    return data


def _float32_scalars(data: bytes, saved_model: str, io: str, options: ExportOptions) -> Tuple[bytes, int]:
    """The fp16 converter output ``data`` with its scalar constants float32 (:func:`export.tflite_graph.float32_scalars`),
    taken from the fp32 converter output beside ``saved_model`` (converted here where this plan made none before:
    ``--precisions fp16`` alone), and how many scalars it replaced."""
    from . import tflite_graph

    path = os.path.join(os.path.dirname(saved_model), "converter_fp32.tflite")
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(convert_precision(saved_model, "fp32", io, None, options))
    with open(path, "rb") as f:
        float_model = tflite_graph.read(f.read())
    model = tflite_graph.read(data)
    replaced = tflite_graph.float32_scalars(model, float_model)
    return tflite_graph.write(model), replaced


def _restore_float_weights(data: bytes, quant: dict) -> bytes:
    """A dynamic-range file whose ``quant["float_nodes"]`` convolutions get back the float32 filters
    of ``quant["float_model"]`` (the fp32 file of the same saved_model)."""
    from . import tflite_graph

    with open(quant["float_model"], "rb") as f:
        float_model = f.read()
    model = tflite_graph.read(data)
    tflite_graph.restore_float_weights(model, tflite_graph.read(float_model), quant["float_nodes"])
    return tflite_graph.write(model)


def gpu_analysis(data: bytes) -> str:
    import tensorflow as tf

    out = _io.StringIO()
    with contextlib.redirect_stdout(out):
        tf.lite.experimental.Analyzer.analyze(model_content=data, gpu_compatibility=True)
    return out.getvalue()


def run_job(job: dict, options: ExportOptions, events: _Events) -> None:
    from . import tflite_graph
    from .tflite import postprocess

    name = job["name"]
    _CALIBRATION_SETTINGS["progress"] = lambda line: events.send(event="stage", job=name, stage=line)
    t0 = _METER.start()
    if not job.get("reuse_saved_model"):
        events.send(event="stage", job=name, stage="onnx2tf")
        with _log_to(job["log"]):
            try:
                check_onnx(job["onnx"])
                run_onnx2tf(job["onnx"], job["saved_model"], job["cind"], options.threads,
                            options.onnx2tf_validation)
            except Exception as exc:
                traceback.print_exc()
                events.send(event="error", job=name, stage="onnx2tf", message=f"{type(exc).__name__}: {exc}",
                            log=job["log"])
                return
        events.send(event="stage_done", job=name, stage="onnx2tf", seconds=round(time.time() - t0, 2), t_start=t0,
                    peak_rss=_METER.peak(), peak_anon=_METER.peak_anon())
    for art in job["artifacts"]:
        t1 = _METER.start()
        events.send(event="stage", job=name, stage=f"convert {art['precision']}", out=art["out"])
        quant = art.get("quant") or {}
        with _log_to(job["log"]):
            try:
                if quant.get("float_nodes") and art["precision"] == "int8-dynamic" and not os.path.exists(quant["float_model"]):
                    with open(quant["float_model"], "wb") as f:  # the float32 weights the kept layers get back
                        f.write(convert_precision(job["saved_model"], "fp32", art["io"], None, options))
                raw = convert_precision(job["saved_model"], art["precision"], art["io"], art.get("calibration"), options,
                                        quant)
                if not quant.get("float_nodes"):
                    # the converter's own file, kept beside the saved_model for inspection and tests
                    with open(os.path.join(os.path.dirname(job["saved_model"]), f"converter_{art['precision']}.tflite"), "wb") as f:
                        f.write(raw)
                before = tflite_graph.inventory(raw)
                scalars = None
                if art["precision"] == "fp16":
                    raw, scalars = _float32_scalars(raw, job["saved_model"], art["io"], options)
                final, report = postprocess(raw, art["precision"], art["io"], options, metadata=art.get("metadata"))
                if scalars is not None:
                    report["float32_scalars"] = scalars
                if art["precision"] in ACTIVATION_GRIDS:
                    report["calibration"] = dict(_CALIBRATION_REPORT)
                analysis = gpu_analysis(final)
                tmp = art["out"] + ".part"
                with open(tmp, "wb") as f:
                    f.write(final)
                os.replace(tmp, art["out"])
            except Exception as exc:
                traceback.print_exc()
                events.send(event="error", job=name, stage=f"convert {art['precision']}", out=art["out"],
                            message=f"{type(exc).__name__}: {exc}", log=job["log"])
                continue
        events.send(event="artifact", job=name, out=art["out"], seconds=round(time.time() - t1, 2), t_start=t1,
                    peak_rss=_METER.peak(), peak_anon=_METER.peak_anon(), inner_stages=_METER.inner,
                    inventory_converter=before, postpass=report, analyzer=analysis)


def _stderr_to(path: str) -> None:
    """Send fd 2 (outside a job's log) to ``path``, the plan's own file (a worker converts several plans)."""
    sys.stderr.flush()
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)


_PLANS_RUN: list = []  # the plans this process has converted


def _as_if_fresh() -> None:
    """Put back the global state a plan leaves behind, as a fresh process has it, so that a plan converted after
    another one writes the same files and reports: the layers' names, which the .tflite tensor names are made of,
    come from tf_keras' per-name counters (``model_2/tf.nn.elu_86`` where a fresh process writes
    ``model/tf.nn.elu_1``); onnx2tf seeds every random generator when it is imported (seeded again); the
    calibration's kept statistics (a plan measures its own)."""
    from .tflite_calibration import forget_statistics

    forget_statistics()
    if "tf_keras" in sys.modules:
        import tf_keras

        tf_keras.backend.clear_session()
        tf_keras.utils.set_random_seed(0)


#: A plan that leaves the worker holding more anonymous memory than this gives back what it can
#: (:func:`_release_memory`); below it (tiny models: ~250 MiB, TensorFlow's own) the 0.1 s of CPU buys ~30 MiB.
RELEASE_ABOVE_BYTES = 512 << 20


def _release_memory() -> None:
    """Give back what a finished plan leaves allocated, so that the worker holds little while it waits for the
    next plan (an export keeps it for the whole run, gates included): tf_keras' global graph state (onnx2tf's
    Keras model), unreachable objects, and the C allocator's free pages (glibc's ``malloc_trim``). Said in the
    plan's stderr log, with this process's anonymous memory before and after."""
    from runtime_py.memory import give_back

    before, t0 = anon_rss_bytes(), time.process_time()
    if "tf_keras" in sys.modules:
        sys.modules["tf_keras"].backend.clear_session()
    give_back()
    print(f"gmcnn-mobile: plan done; anonymous memory {mib(before):.0f} MiB, {mib(anon_rss_bytes()):.0f} MiB "
          f"after releasing what it left ({time.process_time() - t0:.2f} s of CPU)", file=sys.stderr, flush=True)


def run_plan(plan_path: str, events: _Events) -> None:
    """Convert every job of the plan at ``plan_path``, then release what it left when that is much; the last event
    says ``finished``."""
    with open(plan_path) as f:
        plan = json.load(f)
    if _PLANS_RUN:
        _as_if_fresh()
    _PLANS_RUN.append(plan_path)
    t0 = time.time()
    options = ExportOptions.from_json(plan["options"])
    for job in plan["jobs"]:
        run_job(job, options, events)
    if anon_rss_bytes() > RELEASE_ABOVE_BYTES:
        _release_memory()
    events.send(event="finished", plan=plan_path, seconds=round(time.time() - t0, 2))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    events = _Events()
    if argv:
        run_plan(argv[0], events)
        return 0
    for line in sys.stdin:
        if line.strip():
            request = json.loads(line)
            _stderr_to(request["stderr"])  # first: a plan that cannot be read says so in its own log
            run_plan(request["plan"], events)
    return 0


if __name__ == "__main__":
    sys.exit(main())
