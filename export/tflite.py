"""TFLite backend: PyTorch -> ONNX (opset 17) -> onnxsim -> onnx2tf saved_model -> TFLite converter.

Precisions (from one saved_model per shape and I/O signature):

* ``fp32``          float32 weights and activations.
* ``fp16``          float16 weights (dequantized to float32 at load), float32 compute.
* ``int8-dynamic``  dynamic-range: int8 weights, activations quantized on the fly.
* ``int8``          full integer: int8 weights and activations, calibrated on real photos
  with realistic masks (each activation's range chosen per tensor, :mod:`export.quant_ranges`);
  then the post-pass of :func:`export.tflite_graph.integerize` makes ELU and the
  resize/concatenation tail int8 too.
* ``int16x8``       16-bit activations, 8-bit weights (A16W8, what NPU toolchains run):
  calibrated the same way for a symmetric int16 grid; ELU stays float (LiteRT has no int16
  ELU kernel). On CPUs it runs on LiteRT's reference kernels (slow); it is for NPU delegates.

``int8``, ``int8-dynamic`` and ``int16x8`` jobs may name convolutions to keep in float
(``job.extra["keep_float"]``, generator module names; the export's sensitivity-guided
fallback): :func:`float_nodes` says which TFLite convolutions that makes float.

I/O of the files (NHWC, batch 1; names ``image``, ``mask``, ``output``):

* ``tensor``: float32 image (1,H,W,3) RGB [-1,1], mask (1,H,W,1) {0,1} 1 = hole ->
  output (1,H,W,3) float32 RGB [-1,1], raw generator output.
* ``image``: uint8 image (1,H,W,3) RGB, uint8 mask (1,H,W,1) 255 = hole -> uint8 RGB
  composite (1,H,W,3).

The TensorFlow side runs in a child process (:mod:`export.tflite_worker`); this module
imports neither TensorFlow nor onnx2tf, and its ``run``/``describe``/``inventory`` need
only LiteRT.
"""
from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from runtime_py.errors import MissingDependencyError

from .backends import ConvertJob, ConvertResult
from .options import ExportOptions

NAME = "tflite"
SUFFIX = ".tflite"
PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8", "int16x8")
# What an export makes unless asked by name: int16x8 runs on LiteRT's reference kernels on CPUs, and its
# parity gate took over 45 minutes for the 4 held-out samples at 512x680 on this shared 2-core machine.
DEFAULT_PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8")
# Precisions calibrated on photos, and those whose layers the export's fallback may keep in float.
CALIBRATED = ("int8", "int16x8")
FALLBACK_PRECISIONS = ("int8", "int8-dynamic", "int16x8")
# Precisions whose int8 convolutions get their biases corrected for the rounded weights' mean output shift
# (options.bias_correction, :func:`correct_biases`): int8-dynamic's error is mostly its weights' (docs/TOLERANCES.md).
BIAS_CORRECTED = ("int8-dynamic",)
# Precisions whose int8 filters the export rounds again, error-compensating (options.weight_rounding,
# :func:`round_weights`), before any bias correction: the grid stays the converter's.
WEIGHTS_ROUNDED = ("int8-dynamic", "int8")
# Precisions whose activations are quantized at run time on each tensor's own extremes: their parity gate runs every
# held-out sample a second time, nudged (:func:`export.samples.nudged`), because a change that small can move every
# rounding (at 512x680 the shipped model's int8-dynamic hole PSNR moved by up to 6.7 dB on one sample).
RUNTIME_QUANTIZED = ("int8-dynamic",)
# Where a convolution kept float alone still reads an input rounded by its integer producer, so the
# fallback's second phase keeps the producers float too (job.extra["keep_float_inputs"]): int8, and int16x8,
# whose float convolution reads the float ELU output, but the ELU reads the producer's int16 output
# (tflite_graph.float_convs_16x8). int8-dynamic's second phase keeps the layers alone (its float
# convolutions' inputs are never quantized).
FALLBACK_INPUT_PRECISIONS = ("int8", "int16x8")
EXTRA = "export"


def unrounded_convs(generator, precision: str) -> set:
    """The generator's convolutions (module names) a file of ``precision`` leaves float as converted: the
    dynamic-range quantizer's filters under :data:`export.input_groups.MIN_QUANTIZED_ELEMENTS` values (the
    default model's ``mergeconv18``, 432); the other precisions round every convolution."""
    import torch

    from .input_groups import MIN_QUANTIZED_ELEMENTS

    if precision != "int8-dynamic":
        return set()
    return {name for name, module in generator.named_modules()
            if isinstance(module, torch.nn.Conv2d) and module.weight.numel() < MIN_QUANTIZED_ELEMENTS}


METADATA_NAME = "gmcnn_mobile"
# Tools the conversion needs (module name -> what for).
CONVERT_TOOLS = {
    "torch": "the PyTorch model",
    "onnx": "ONNX export",
    "onnxsim": "ONNX simplification",
    "onnx2tf": "ONNX to TensorFlow conversion",
    "tensorflow": "the TFLite converter",
    "tf_keras": "onnx2tf's saved_model",
    "flatbuffers": "TFLite post-passes",
}


def check_available() -> None:
    for module, purpose in list(CONVERT_TOOLS.items()) + [("ai_edge_litert", "the LiteRT interpreter")]:
        if importlib.util.find_spec(module) is None:
            extra = "runtime" if module == "ai_edge_litert" else EXTRA
            raise MissingDependencyError(module, extra, purpose)


# ----------------------------------------------------------------------- post-pass

def postprocess(raw: bytes, precision: str, io: str, options: Optional[ExportOptions] = None,
                metadata: Optional[dict] = None) -> Tuple[bytes, Dict[str, object]]:
    """Flatbuffer post-passes applied to every converted file; returns (bytes, report).

    In order: NHWC outputs and named I/O (inputs ordered ``image``, ``mask``); uint8 I/O for
    float ``image`` files; for int8, ELU chains then (``options.int8_tail``) the float tail into
    int8; then the XNNPACK rewrites of reflection pads (``options.pad_mode='slices'``) and 2x
    nearest upsampling (``options.upsample_mode='depth_to_space'``); last, the inputs renumbered
    to tensors 0 and 1. ``options`` defaults to :class:`export.options.ExportOptions`' defaults.
    """
    from . import tflite_graph as g

    options = options or ExportOptions()
    model = g.read(raw)
    report: Dict[str, object] = {"output_transposes_removed": g.nhwc_outputs(model)}
    layout = g.channels_last(model)
    if layout:  # only input-grouped graphs have channels-first detours (export.input_groups)
        report["layout_transposes_removed"] = layout
    report["io_tensors_named"] = g.set_io_names(model)
    if io == "image" and precision != "int8":
        report["uint8_io_casts"] = g.uint8_io(model)
    if precision == "int8":
        report["elu_chains_to_int8"] = g.integerize(model, through=())
        report["inventory_after_elu_pass"] = g.inventory(g.write(model))
        if options.int8_tail:
            report["float_regions_to_int8"] = g.integerize(model, through=g.DATA_MOVEMENT_OPS)
    if options.pad_mode == "slices":
        report["mirror_pads_to_slices"] = g.mirror_pad_to_slices(model)
    if options.upsample_mode == "depth_to_space":
        report["nearest_upsamples_to_depth_to_space"] = g.nearest_2x_to_depth_to_space(model)
    report["input_tensors_first"] = g.inputs_first(model)  # last: the passes above append tensors
    if metadata:
        g.add_metadata(model, METADATA_NAME, metadata)
    return g.write(model), report


# ---------------------------------------------------------------------- conversion

def _progress(progress, msg: str) -> None:
    if progress:
        progress(msg)


def _export_sources(job: ConvertJob) -> Tuple[Path, Dict[str, str]]:
    """ONNX file and onnx2tf sample inputs of a job's (shape, io), made once per workdir."""
    from .onnx_export import export_onnx
    from .wrappers import wrap

    work = Path(job.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    onnx_path = work / "model.onnx"
    cind = {"image": str(work / "cind_image.npy"), "mask": str(work / "cind_mask.npy")}
    if not onnx_path.exists():
        generator = job.generator
        if job.extra.get("input_groups"):
            from .input_groups import grouped_generator

            generator = grouped_generator(generator, job.extra["input_groups"])
        export_onnx(wrap(generator, job.io), job.io, job.shape, onnx_path)
        image, mask = network_feed(job.calibration, job.io)
        np.save(cind["image"], image[:1])
        np.save(cind["mask"], mask[:1])
    return onnx_path, cind


def artifact_file(job: ConvertJob) -> str:
    """The file name of ``job``'s artifact: its ``out`` without the export's temporary prefix
    (``.partial-<pid>-``, :data:`export.api.PARTIAL_PREFIX`)."""
    name = Path(job.out).name
    return name.split("-", 2)[-1] if name.startswith(".partial-") else name


def network_feed(samples, io: str) -> Tuple[np.ndarray, np.ndarray]:
    """(image, mask) NHWC float32 arrays as the saved_model takes them: [-1,1]/{0,1} for ``tensor``,
    0..255 values for ``image`` (the uint8 boundary is added after conversion)."""
    if io == "tensor":
        return samples.tensor_image(), samples.tensor_mask()
    return samples.images.astype(np.float32), samples.masks.astype(np.float32)


def convert_many(jobs: Sequence[ConvertJob], progress=None, stages=None) -> Dict[str, ConvertResult]:
    """Convert all jobs with one TensorFlow process; jobs sharing a workdir share one saved_model."""
    conversion = start_many(jobs, progress, stages)
    try:
        return conversion.wait()
    finally:
        conversion.cancel()  # an interrupted wait (Ctrl-C, SIGTERM) leaves no worker behind


class Conversion:
    """The TFLite worker converting in the background (:func:`start_many`): ``wait()`` gives the results,
    ``cancel()`` stops the worker (an interrupted export)."""

    def __init__(self, results: Dict[str, ConvertResult], run=None):
        self.results = results
        self._error: Optional[BaseException] = None
        self._proc: list = []
        self._thread = None
        if run is not None:
            import threading

            self._thread = threading.Thread(target=self._run, args=(run,), name="tflite-worker", daemon=True)
            self._thread.start()

    def _run(self, run) -> None:
        try:
            self.results.update(run(self._proc))
        except BaseException as exc:  # handed to the waiting thread
            self._error = exc

    def wait(self) -> Dict[str, ConvertResult]:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self.results

    def cancel(self) -> None:
        while True:  # the worker may be starting right now: kill whatever has started until the thread ends
            for proc in self._proc:
                if proc.poll() is None:
                    proc.kill()
            if self._thread is None:
                return
            self._thread.join(timeout=0.5)
            if not self._thread.is_alive():
                return


def start_many(jobs: Sequence[ConvertJob], progress=None, stages=None) -> Conversion:
    """:func:`convert_many` with the TensorFlow worker left running in the background: the ONNX files
    are made here (this thread: PyTorch), then the worker starts and this returns at once."""
    check_available()
    groups: Dict[Path, List[ConvertJob]] = collections.OrderedDict()
    # per shape the tensor signature first: its calibration pass is kept for the image signature's
    # (tflite_calibration.calibrate_ranges' share), which wraps the same network
    calibrated = [(tuple(job.shape), job.io) for job in jobs
                  if job.precision in CALIBRATED and not job.extra.get("keep_float")]
    shares = {shape for shape, io in calibrated if io == "image" and (shape, "tensor") in calibrated}
    shape_order = {shape: i for i, shape in enumerate(dict.fromkeys(tuple(job.shape) for job in jobs))}
    for job in sorted(jobs, key=lambda job: (shape_order[tuple(job.shape)],
                                             tuple(job.shape) in shares and job.io != "tensor")):
        # absolute: the worker runs in the repository root, not in the caller's folder (--out exported/)
        groups.setdefault(Path(job.workdir).absolute(), []).append(job)
    results: Dict[str, ConvertResult] = {}
    plan = {"options": jobs[0].options.to_json(), "jobs": []}  # one export's jobs share its options
    by_out: Dict[str, ConvertJob] = {}
    for work, group in groups.items():
        first = group[0]
        _progress(progress, f"tflite {first.shape[0]}x{first.shape[1]} {first.io}: PyTorch -> ONNX (opset 17) + onnxsim")
        t0 = time.time()
        try:
            with _stage(stages, f"onnx + onnxsim {first.shape[0]}x{first.shape[1]} {first.io}", give_back=True):
                onnx_path, cind = _export_sources(first)
        except Exception as exc:
            for job in group:
                results[job.key] = ConvertResult(None, error=f"ONNX export failed: {type(exc).__name__}: {exc}")
            continue
        _progress(progress, f"tflite {first.shape[0]}x{first.shape[1]} {first.io}: ONNX ready ({time.time() - t0:.1f}s)")
        arts = []
        for job in group:
            calib = None
            if job.precision in CALIBRATED:
                calib = {"image": str(work / "calib_image.npy"), "mask": str(work / "calib_mask.npy")}
                if not Path(calib["image"]).exists():
                    image, mask = network_feed(job.calibration, job.io)
                    np.save(calib["image"], image)
                    np.save(calib["mask"], mask)
            quant = None
            if job.precision in CALIBRATED or job.precision == "int8-dynamic":
                quant = {"calibrated": str(work / f"calibrated_{job.precision}.tflite"),
                         "float_model": str(work / "converter_fp32.tflite"), "float_nodes": [],
                         "converted": str(work / f"converter_{job.precision}.tflite"), "share": None}
                if job.precision in CALIBRATED and tuple(job.shape) in shares and not job.extra.get("keep_float"):
                    quant["share"] = ({"reuse": True} if job.io == "image" else
                                      {"keep": str(work), "source": artifact_file(job)})
                if job.extra.get("keep_float"):
                    try:
                        generator, keep = job.generator, job.extra["keep_float"]
                        if job.extra.get("input_groups"):  # the grouped file's convolutions: each layer's parts
                            from .input_groups import grouped_generator, part_names

                            generator = grouped_generator(generator, job.extra["input_groups"])
                            keep = part_names(generator, keep)
                        quant["float_nodes"] = float_nodes(generator, work, job.precision, keep,
                                                           bool(job.extra.get("keep_float_inputs")))
                    except (OSError, ValueError) as exc:
                        results[job.key] = ConvertResult(None, error=f"fallback: {exc}")
                        continue
            out = str(Path(job.out).absolute())
            arts.append({"precision": job.precision, "io": job.io, "out": out, "calibration": calib,
                         "quant": quant, "metadata": job.metadata})
            by_out[out] = job
        if not arts:
            continue
        # fallback candidates come right after the pure file of the same run: its saved_model is reused
        reuse = all(job.extra.get("keep_float") for job in group) and (work / "saved_model").is_dir()
        plan["jobs"].append({"name": f"{first.shape[0]}x{first.shape[1]} {first.io}", "onnx": str(onnx_path),
                             "reuse_saved_model": reuse,
                             "saved_model": str(work / "saved_model"), "log": str(work / "tflite_worker.log"),
                             "cind": cind, "artifacts": arts})
    def run(procs):
        out = _run_worker(plan, by_out, progress, stages, procs) if plan["jobs"] else {}
        for job in jobs:
            res = out.get(job.key)
            if res is None or res.path is None:
                continue
            if job.extra.get("input_groups"):
                # its filters are the groups' slices, which neither rewrite matches to the generator's convolutions
                res.details["input_groups"] = {"bias_correction": False, "weight_rounding": "nearest"}
                continue
            if job.precision in WEIGHTS_ROUNDED and job.options.weight_rounding == "gptq":
                try:
                    with _stage(stages, f"weight rounding {job.shape[0]}x{job.shape[1]} {job.io} {job.precision}"):
                        res.details["weight_rounding"] = round_weights(job, Path(res.path), progress)
                except (OSError, ValueError) as exc:
                    out[job.key] = ConvertResult(None, error=f"weight rounding: {exc}")
                    continue
            if job.precision not in BIAS_CORRECTED or not job.options.bias_correction:
                continue
            try:
                with _stage(stages, f"bias correction {job.shape[0]}x{job.shape[1]} {job.io} {job.precision}"):
                    res.details["bias_correction"] = correct_biases(job, Path(res.path))
            except (OSError, ValueError) as exc:
                out[job.key] = ConvertResult(None, error=f"bias correction: {exc}")
        for job in jobs:
            if job.key not in results and job.key not in out:
                out[job.key] = ConvertResult(None, error="the conversion produced no file")
        return out

    return Conversion(results, run)


def _stage(stages, name: str, give_back: bool = False):
    """``stages.stage(name, give_back)`` (an :class:`export.stages.StageLog`), or nothing."""
    return stages.stage(name, give_back) if stages is not None else contextlib.nullcontext()


# conv_nodes_of: the largest relative difference (Frobenius norm) between a float filter and its file's filter
MATCH_LIMIT = 0.25


def conv_nodes_of(generator, model_bytes: bytes) -> Dict[str, str]:
    """Generator convolution (module name) -> its CONV_2D in a TFLite file (output tensor name),
    matched by weights: same shape, least relative difference (int8 filters are dequantized).
    ValueError if a convolution has no clear match."""
    import torch

    from . import tflite_graph as g

    model = g.read(model_bytes)
    tfl = [(name, g.conv_weights(model, i).transpose(0, 3, 1, 2)) for name, i in g.conv_nodes(model)]
    out: Dict[str, str] = {}
    taken = set()
    for module_name, mod in generator.named_modules():
        if not isinstance(mod, torch.nn.Conv2d):
            continue
        w = mod.weight.detach().cpu().numpy()
        norm = max(float(np.linalg.norm(w)), 1e-12)
        best = sorted((float(np.linalg.norm(tw - w)) / norm, node)
                      for node, tw in tfl if tw.shape == w.shape and node not in taken)
        # int8 filters, rounded to nearest or error-compensating (export.weight_rounding), stay within a few
        # percent of the float filter's norm; another layer's filter is about sqrt(2) of it away
        if not best or best[0][0] > MATCH_LIMIT or (len(best) > 1 and best[1][0] <= 2 * MATCH_LIMIT):
            raise ValueError(f"convolution {module_name} has no unique match in the TFLite file")
        out[module_name] = best[0][1]
        taken.add(best[0][1])
    return out


def float_nodes(generator, work: Path, precision: str, keep_float: Sequence[str], inputs: bool = False) -> List[str]:
    """The TFLite convolutions (output tensor names) that keeping the generator convolutions
    ``keep_float`` out of quantization makes float.

    ``int8-dynamic``: those convolutions (float32 weights, so their inputs are not quantized).
    ``int8``: those convolutions; the quantizer leaves the ELU before each one in float (it dequantizes
    the producer's int8 output, then ELU, then the float convolution), so the convolution's weights,
    its output and the ELU output it reads are float, while the producing convolution's own output
    stays int8. With ``inputs``, also the convolutions producing their inputs: then the whole tensor
    between them is float (it stays float only between float ops). For ``int8`` also the resizes,
    concatenations, pads and slices lying between float convolutions only
    (:func:`export.tflite_graph.ops_between_convs`): left to the quantizer they round on their own
    calibrated ranges; and the ops joining the graph's inputs or outputs to float convolutions with no
    convolution between (:func:`export.tflite_graph.io_path_ops`: the normalisation, the hole and the
    masked input; an ``image`` file's compositing). ``int16x8``: those convolutions, made
    float in the 16x8 quantizer's output (:func:`export.tflite_graph.float_convs_16x8`): they read the ELU
    output before its int16 QUANTIZE (a DEQUANTIZE where an int16 concatenation or resize feeds them) and
    their float output goes straight to the ELU after them; that ELU's input is still the producing
    convolution's int16 output, rounded, unless ``inputs`` keeps the producer float too (as for int8).
    Read from the pure file's calibrated model
    (calibrated precisions) or converter output in ``work``.
    """
    from . import tflite_graph as g

    source = work / (f"calibrated_{precision}.tflite" if precision in CALIBRATED else f"converter_{precision}.tflite")
    data = source.read_bytes()
    nodes = conv_nodes_of(generator, data)
    unknown = [k for k in keep_float if k not in nodes]
    if unknown:
        raise ValueError(f"no convolution named {', '.join(unknown)}")
    chosen = {nodes[k] for k in keep_float}
    graph = g.read(data) if precision == "int8" or (precision in FALLBACK_INPUT_PRECISIONS and inputs) else None
    if precision in FALLBACK_INPUT_PRECISIONS and inputs:
        producers = g.conv_producers(graph)
        chosen |= {p for k in keep_float for p in producers[nodes[k]]}
    if precision == "int8":
        # the resizes and concatenations between float convolutions would still be int8 on their own
        # ranges: at 1024x1360 the shipped model's upsamplings alone hold every convolution float at
        # 16.9 dB (42.5 dB with them float too)
        chosen |= set(g.ops_between_convs(graph, chosen))
        # the path from the graph's inputs to a float convolution, and from one to the outputs, too:
        # rounded there, the input reaches the float branch on the int8 grid anyway
        chosen |= set(g.io_path_ops(graph, chosen))
    return sorted(chosen)


# Beside a calibrated model (``calibrated_<precision>.tflite`` in a job's work folder) the TFLite worker keeps its
# calibration pass's convolution input means and per-channel ranges (export.tflite_calibration.calibrate_ranges'
# ``input_means`` and ``input_ranges``), as JSON: the convolution's output tensor name -> its input's channel means,
# or [channel lows, channel highs].
CALIBRATION_MEANS_SUFFIX = ".means.json"
CALIBRATION_RANGES_SUFFIX = ".ranges.json"
MEASURED_BY_CALIBRATION = "the int8 calibration pass (LiteRT float model, XNNPACK)"


def _calibration_per_conv(generator, work: Path, suffix: str) -> Optional[Dict[str, np.ndarray]]:
    """What a calibration pass of this run kept in ``work`` beside its calibrated model (``suffix``), by generator
    convolution (module name -> float64 array whose last axis is the input channel): the convolutions matched to
    the calibrated model's by weights (:func:`conv_nodes_of`). None when no pass kept it or it does not cover every
    convolution with the right channel count."""
    import torch

    for precision in CALIBRATED:
        model = work / f"calibrated_{precision}.tflite"
        kept = Path(str(model) + suffix)
        if not (model.is_file() and kept.is_file()):
            continue
        with open(kept) as f:
            by_node = {name: np.asarray(values, np.float64) for name, values in json.load(f).items()}
        try:
            nodes = conv_nodes_of(generator, model.read_bytes())
        except ValueError:
            return None
        convs = {name: m for name, m in generator.named_modules() if isinstance(m, torch.nn.Conv2d)}
        if any(nodes.get(name) not in by_node or by_node[nodes[name]].shape[-1] != m.in_channels
               for name, m in convs.items()):
            return None
        return {name: by_node[nodes[name]] for name in convs}
    return None


def calibration_input_means(generator, work: Path) -> Optional[Dict[str, np.ndarray]]:
    """The convolution input means a calibration pass of this run measured in ``work`` (a job's work folder: the
    int8 or int16x8 file's pass over the same calibration samples), by generator convolution (module name, float64
    (C_in,)). None when no pass left them (:func:`_calibration_per_conv`)."""
    return _calibration_per_conv(generator, work, CALIBRATION_MEANS_SUFFIX)


def calibration_input_ranges(generator, work: Path) -> Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]]:
    """The convolution inputs' per-channel (least, largest) values over the calibration samples that a calibration
    pass of this run measured in ``work``, by generator convolution (module name -> two float64 (C_in,) arrays, as
    :func:`export.input_groups.channel_ranges` gives them). None when no pass left them."""
    kept = _calibration_per_conv(generator, work, CALIBRATION_RANGES_SUFFIX)
    if kept is None or any(v.shape != (2, v.shape[-1]) for v in kept.values()):
        return None
    return {name: (v[0], v[1]) for name, v in kept.items()}


def round_weights(job: ConvertJob, path: Path, progress=None) -> Dict[str, object]:
    """Replace, in the file at ``path`` (an int8 or int8-dynamic file of ``job``), the converter's int8 filters by
    error-compensating ones on the same grid (:mod:`export.weight_rounding`), chosen from each convolution's inputs
    on ``job.calibration``; once per shape and run, kept in the run's work folder. Returns the manifest's record:
    ``{"method", "layers": filters replaced, "kept": filters left as converted (their scales are not the
    converter's usual ones), "samples"}``."""
    from . import tflite_graph as g
    from .weight_rounding import METHOD, compensated_levels, levels_cache

    levels = compensated_levels(job.generator, job.calibration, levels_cache(Path(job.workdir).parent, job.shape),
                                progress=(lambda msg: _progress(progress, f"tflite {job.shape[0]}x{job.shape[1]}: "
                                                                          f"{msg}")))
    data = path.read_bytes()
    nodes = conv_nodes_of(job.generator, data)
    model = g.read(data)
    written, kept = g.set_conv_levels(model, {node: (levels[k][0].transpose(0, 2, 3, 1), levels[k][1])
                                              for k, node in nodes.items()})
    path.write_bytes(g.write(model))
    return {"method": METHOD, "layers": len(written), "kept": sorted(kept),
            "samples": int(len(job.calibration.images))}


def correct_biases(job: ConvertJob, path: Path) -> Dict[str, object]:
    """Correct, in the file at ``path`` (a dynamic-range file of ``job``), each int8 convolution's bias for the mean
    output shift of its rounded weights (:func:`export.tflite_graph.correct_conv_biases`), with each convolution's
    input channel means over ``job.calibration``: those the int8 (or int16x8) calibration pass of this run measured
    in LiteRT's float model (:func:`calibration_input_means`), else a PyTorch forward per sample
    (:func:`export.activations.input_means`); once per shape and run, kept in the run's work folder, where the
    fallback's simulation reads them too. Returns the manifest's record:
    ``{"layers": corrected convolutions, "samples": calibration samples, "input_means": where they were measured}``."""
    from . import tflite_graph as g
    from .activations import input_means, means_cache, means_source

    cache = means_cache(Path(job.workdir).parent, job.shape)
    measured = None if cache.is_file() else calibration_input_means(job.generator, Path(job.workdir))
    means = input_means(job.generator, job.calibration, cache, measured=measured, source=MEASURED_BY_CALIBRATION)
    data = path.read_bytes()
    nodes = conv_nodes_of(job.generator, data)
    convs = dict(job.generator.named_modules())
    filters = {node: convs[k].weight.detach().cpu().numpy().transpose(0, 2, 3, 1) for k, node in nodes.items()}
    model = g.read(data)
    changed = g.correct_conv_biases(model, filters, {node: means[k] for k, node in nodes.items()})
    path.write_bytes(g.write(model))
    return {"layers": changed, "samples": int(len(job.calibration.images)), "input_means": means_source(cache)}


#: Marks the worker's JSON event lines on its stdout (the worker imports it from here: no import cycle).
EVENT_PREFIX = "@@gmcnn "


class _Worker:
    """A TensorFlow child process (``python -m export.tflite_worker``) converting the plans it is handed on its
    stdin, one at a time, each with its own stderr file (the first one's takes what it prints at start)."""

    def __init__(self, stderr_path: Path):
        root = Path(__file__).resolve().parent.parent
        env = dict(os.environ)
        env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        with open(stderr_path, "ab") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-m", "export.tflite_worker"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=str(root))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def submit(self, plan_path: Path, stderr_path: Path) -> None:
        try:
            self.proc.stdin.write((json.dumps({"plan": str(plan_path), "stderr": str(stderr_path)}) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:  # it has stopped: reading its output finds the end and says so
            pass

    def events(self):
        """The plan's event lines (dicts) up to its ``finished`` one, or to the worker's end (then waited for)."""
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith(EVENT_PREFIX):
                ev = json.loads(line[len(EVENT_PREFIX):])
                yield ev
                if ev.get("event") == "finished":
                    return
        self.proc.wait()

    def close(self, timeout: float = 60.0) -> None:
        """Let it finish its plan and exit (end of its stdin); killed if it does not within ``timeout`` s."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class _Kept:
    """The one worker :func:`kept_worker` keeps for this process, the lock of whoever converts with it, and the
    stage logs of the exports within the block: the worker counts in their summed memory while it lives, idle too."""

    def __init__(self):
        import threading

        self.lock = threading.Lock()
        self.worker: Optional[_Worker] = None
        self.depth = 0
        self.logs: list = []

    def take(self, stderr_path: Path) -> "_Worker":
        """The kept worker, started now when there is none or it has stopped (called holding :attr:`lock`)."""
        if self.worker is None or not self.worker.alive():
            self._unwatch(self.worker, self.logs)
            self.worker = _Worker(stderr_path)
            from .stages import TFLITE_WORKER

            for log in self.logs:
                log.watch(self.worker.proc.pid, TFLITE_WORKER)
        return self.worker

    @staticmethod
    def _unwatch(worker: Optional["_Worker"], logs) -> None:
        if worker is not None:
            for log in logs:
                log.unwatch(worker.proc.pid)


_KEPT = _Kept()


@contextlib.contextmanager
def kept_worker(stages=None):
    """Within the block, this process's TFLite conversions go to one worker, started at the first of them and
    closed at the end of the block (a worker that stopped or was killed is replaced at the next), instead of one
    worker per conversion call: each start spends ~7 s of CPU importing TensorFlow and onnx2tf. An export keeps
    one for its whole run (:func:`session`), the test suite one per test process (tests/conftest.py); blocks
    nest, and the outermost one closes the worker. ``stages`` (an :class:`export.stages.StageLog`): the worker
    counts in its summed memory while the block lasts, between conversions too. The worker's environment is
    this process's when it starts."""
    from .stages import TFLITE_WORKER

    with _KEPT.lock:
        _KEPT.depth += 1
        if stages is not None:
            _KEPT.logs.append(stages)
            if _KEPT.worker is not None and _KEPT.worker.alive():
                stages.watch(_KEPT.worker.proc.pid, TFLITE_WORKER)
    failed = True
    try:
        yield
        failed = False
    finally:
        with _KEPT.lock:
            _KEPT.depth -= 1
            if stages is not None:
                _KEPT.logs.remove(stages)
                _KEPT._unwatch(_KEPT.worker, [stages])
            worker, _KEPT.worker = (_KEPT.worker, None) if _KEPT.depth == 0 else (None, _KEPT.worker)
        if worker is not None:
            # ended by an error or Ctrl-C: stopped now, not after whatever plan it may still be given
            if failed:
                worker.kill()
            else:
                worker.close()


def session(stages=None):
    """The converter of one export (:func:`export.backends.session`): one TensorFlow worker for every conversion
    call of the run -- the files, then each batch of the fallback's candidates -- closed when the export ends or
    fails (:func:`kept_worker`; a conversion that is interrupted kills it at once)."""
    return kept_worker(stages)


def done() -> None:
    """The export converts no more TFLite files (:func:`export.backends.done`): its worker is closed now, where
    only the export's :func:`session` keeps it (not within an outer :func:`kept_worker`: the test suite's), rather
    than held idle through the other formats' work; a later conversion would start a new one."""
    with _KEPT.lock:
        worker, _KEPT.worker = (_KEPT.worker, None) if _KEPT.depth == 1 else (None, _KEPT.worker)
        _KEPT._unwatch(worker, _KEPT.logs)
    if worker is not None:
        worker.close()


def _run_worker(plan: dict, by_out: Dict[str, ConvertJob], progress, stages=None,
                procs: Optional[list] = None) -> Dict[str, ConvertResult]:
    """Run the worker on ``plan`` (its process in ``procs`` while it converts it); each stage it reports goes to
    ``stages``."""
    work = Path(plan["jobs"][0]["saved_model"]).parent
    stderr_path = work / "tflite_worker.stderr.log"
    stderr_path.write_bytes(b"")
    plan_path = work / "tflite_plan.json"
    plan_path.write_text(json.dumps(plan, indent=1))
    with _KEPT.lock if _KEPT.depth else contextlib.nullcontext():
        kept = _KEPT.depth > 0
        worker = _KEPT.take(stderr_path) if kept else _Worker(stderr_path)
        # a kept worker counts in the summed memory of the exports within kept_worker already, idle or not
        watch = stages if stages is not None and not (kept and any(log is stages for log in _KEPT.logs)) else None
        try:
            results, failed_jobs = _converted(worker, plan_path, stderr_path, by_out, progress, watch, procs,
                                              stages)
        except BaseException:
            worker.kill()
            raise
        if not kept:
            worker.close()
    for spec in plan["jobs"]:
        for art in spec["artifacts"]:
            job = by_out[art["out"]]
            if job.key in results:
                continue
            if spec["name"] in failed_jobs:
                msg, log = failed_jobs[spec["name"]]
                results[job.key] = ConvertResult(None, error=msg, log=log)
            else:
                results[job.key] = ConvertResult(
                    None, error=f"the TensorFlow worker stopped (exit {worker.proc.returncode}); log: {stderr_path}",
                    log=str(stderr_path))
    return results


def _converted(worker: _Worker, plan_path: Path, stderr_path: Path, by_out: Dict[str, ConvertJob], progress,
               watch, procs: Optional[list], stages=None):
    """Hand ``plan_path`` (its stderr to ``stderr_path``) to ``worker`` and follow its events: (results by job key,
    job name -> (message, log) of the jobs that failed as a whole). ``stages`` records the stages the worker reports;
    ``watch`` (a stage log too, or None) counts the worker in its summed memory while it converts."""
    from .stages import TFLITE_WORKER

    results: Dict[str, ConvertResult] = {}
    failed_jobs = {}
    if procs is not None:
        procs.append(worker.proc)
    if watch is not None:
        watch.watch(worker.proc.pid, TFLITE_WORKER)

    def record(name, ev, seconds=None):
        if stages is not None and "peak_rss" in ev:
            stages.add(name, TFLITE_WORKER, ev["t_start"] - stages.t0,
                       ev["seconds"] if seconds is None else seconds, ev["peak_rss"], ev.get("peak_anon", 0))
    try:
        worker.submit(plan_path, stderr_path)
        for ev in worker.events():
            kind = ev.get("event")
            if kind == "stage":
                _progress(progress, f"tflite {ev['job']}: {ev['stage']}")
            elif kind == "stage_done":
                label = f"tflite {ev['job']}: " if ev.get("job") else "tflite: "
                _progress(progress, f"{label}{ev['stage']} done ({ev['seconds']:.1f}s)")
                record(f"{ev['stage']} {ev['job']}", ev)
            elif kind == "artifact":
                job = by_out[ev["out"]]
                inner = ev.get("inner_stages") or []
                for sub in inner:
                    record(f"{sub['stage']} {ev['job']} {job.precision}", sub)
                record(f"convert tflite {ev['job']} {job.precision}", ev,
                       ev["seconds"] - sum(sub["seconds"] for sub in inner if not sub.get("within")))
                details = {"inventory_converter": ev["inventory_converter"], "postpass": ev["postpass"],
                           "analyzer": ev["analyzer"]}
                results[job.key] = ConvertResult(Path(ev["out"]), ev["seconds"], details)
                _progress(progress, f"tflite {ev['job']} {job.precision}: converted ({ev['seconds']:.1f}s)")
            elif kind == "error":
                msg = f"{ev['stage']} failed: {ev['message']} (log: {ev['log']})"
                if ev.get("out"):
                    job = by_out[ev["out"]]
                    results[job.key] = ConvertResult(None, error=msg, log=ev["log"])
                else:
                    failed_jobs[ev["job"]] = (msg, ev["log"])
    finally:
        if watch is not None:
            watch.unwatch(worker.proc.pid)
        if procs is not None and worker.alive():
            procs.remove(worker.proc)  # converted: Conversion.cancel leaves a kept worker alone
    return results, failed_jobs


def convert(job: ConvertJob) -> Path:
    """One artifact (see :func:`convert_many`, which batches)."""
    res = convert_many([job])[job.key]
    if res.path is None:
        raise RuntimeError(res.error)
    return res.path


# ------------------------------------------------------------------- LiteRT side

def litert_version() -> str:
    from runtime_py.machine import package_version

    return package_version("ai-edge-litert")


def engine(path: Path, threads: int = 1, io: str = "tensor", xnnpack: bool = True,
           transient_indirection: bool = False, record_builtin_ops: bool = False):
    """The runtime's TFLite engine on a file (LiteRT, XNNPACK unless ``xnnpack`` is False; with
    ``transient_indirection`` XNNPACK builds its indirection buffers per run, and with ``record_builtin_ops`` too
    the first inference records what ran outside XNNPACK), not yet activated."""
    from runtime_py.engines.tflite_engine import TFLiteEngine

    return TFLiteEngine(path, io=io, threads=int(threads), xnnpack=xnnpack, transient_indirection=transient_indirection,
                        record_builtin_ops=record_builtin_ops)


#: The gate runs files with XNNPACK's transient indirection buffers: the same output bytes, and 2.45 GiB less
#: memory for the default model at 1024x1360 (5.3 -> 2.9 GiB anonymous for one inference; docs/EXPORT.md).
GATE_TRANSIENT_INDIRECTION = True


#: How the gate's processes that share a file's samples are named in the export's memory report.
GATE_PROCESS = "tflite gate process"


def reference_kernel_convs(path: Path) -> int:
    """How many of the file's convolutions read int16 activations (int16x8): XNNPACK has no int16 kernels, so
    LiteRT runs them on its reference kernels, which use one thread whatever the interpreter is given."""
    from . import tflite_graph as g

    return sum(r["input"] == "int16" for r in g.conv_macs(g.read(Path(path).read_bytes())))


def gate_processes(path: Path, threads: int, n_samples: int) -> int:
    """Processes :func:`run` shares the samples between: one per thread (at most one per sample) for a file with
    convolutions on LiteRT's single-threaded reference kernels (:func:`reference_kernel_convs`), so that each
    thread's core runs one sample; 1 for a file XNNPACK runs, which uses the threads itself."""
    if threads < 2 or n_samples < 2:
        return 1
    return min(int(threads), n_samples) if reference_kernel_convs(path) else 1


def _run_share(path: str, io: str, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """One gate process's share of the samples (a child of :func:`run`), on one thread."""
    from .parity import run_samples
    from .samples import Samples

    eng = engine(Path(path), 1, io, transient_indirection=GATE_TRANSIENT_INDIRECTION)
    return run_samples(eng, Samples(images, masks, [""] * len(images)))


def _run_in_processes(path: Path, io: str, samples, processes: int, share=_run_share) -> np.ndarray:
    """The outputs of :func:`run` from ``processes`` fresh interpreters (spawned: the export holds PyTorch and
    threads, which a fork would copy), each on a contiguous share of the samples; in the samples' order. The
    export's memory report counts them while they run (the stage logs of :func:`kept_worker`). Interrupted
    (Ctrl-C, or the export's SIGTERM), it terminates the processes at once: each runs minutes of reference
    kernels, which an orderly shutdown would wait for. ``share``: what each process runs (a test's stand-in)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    shares = np.array_split(np.arange(len(samples)), processes)  # processes <= samples: none empty
    with _KEPT.lock:
        logs = list(_KEPT.logs)
    pool = ProcessPoolExecutor(max_workers=len(shares), mp_context=multiprocessing.get_context("spawn"))
    watched: List[int] = []
    finished = False
    try:
        futures = [pool.submit(share, str(path), io, samples.images[s], samples.masks[s]) for s in shares]
        for pid in list(pool._processes):  # spawned at submit; the test counts them
            for log in logs:
                log.watch(pid, GATE_PROCESS)
            watched.append(pid)
        try:
            outputs = np.concatenate([f.result() for f in futures])
        except BrokenProcessPool:
            raise RuntimeError(f"{path}: a gate process stopped without a result (killed, or out of memory?)") from None
        finished = True
        return outputs
    finally:
        if not finished:
            for process in list((pool._processes or {}).values()):
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        for pid in watched:
            for log in logs:
                log.unwatch(pid)


def run(path: Path, io: str, samples, threads: int = 2, keep_going=None):
    """Execute the file on ``samples`` through the TFLite engine; returns (outputs (N,H,W,3), executor).

    ``tensor``: float32 in [-1, 1]; ``image``: uint8 (:func:`export.parity.run_samples`, which takes
    ``keep_going``: the outputs stop at the first sample it turns down). A file whose
    convolutions run on LiteRT's single-threaded reference kernels (int16x8) has its samples shared between
    ``threads`` processes of one thread each (:func:`gate_processes`): the same outputs, about ``threads`` times
    sooner where there are that many cores; there ``keep_going`` is refused (a ValueError): its gate runs the
    samples in chunks of that many."""
    from .parity import run_samples

    processes = gate_processes(path, threads, len(samples))
    if processes > 1:
        if keep_going is not None:
            raise ValueError("keep_going needs one engine: this file's samples run in processes")
        return (_run_in_processes(path, io, samples, processes),
                f"litert-{litert_version()} reference kernels (int16 activations), {processes} processes x 1 thread")
    from runtime_py.engines.tflite_engine import TFLiteEngine

    from . import tflite_sharing

    def cut_engine(content: bytes):
        return TFLiteEngine(model_content=content, io=io, threads=int(threads),
                            transient_indirection=GATE_TRANSIENT_INDIRECTION)

    eng = tflite_sharing.wrap(
        engine(path, threads, io, transient_indirection=GATE_TRANSIENT_INDIRECTION,
               record_builtin_ops=GATE_TRANSIENT_INDIRECTION),
        path, io, _file_identity(path), make_specs=lambda: engine(path, io=io, xnnpack=False), make_cut=cut_engine)
    outputs = run_samples(eng, samples, keep_going)
    if eng.builtin_ops is not None:
        _builtin_ops_seen[_file_identity(path)] = eng.builtin_ops
    return outputs, f"litert-{litert_version()} xnnpack {threads} threads{eng.note()}"


def gate_session(paths):
    """The block the export gates its TFLite files in (:mod:`export.api`): a ``tensor`` file's inferences kept
    for the ``image`` file of its network, which then runs its own ops alone around them
    (:mod:`export.tflite_sharing`), with the same output bytes."""
    from . import tflite_sharing

    return tflite_sharing.session()


#: (device, inode, bytes, modification time) of a file a gate ran -> what LiteRT ran outside XNNPACK in its first
#: inference (:attr:`runtime_py.engines.tflite_engine.TFLiteEngine.builtin_ops`), for :func:`xnnpack_fallback_ops`.
#: The export moves a passing file into place by renaming it, which keeps all four.
_builtin_ops_seen: Dict[tuple, Dict[str, int]] = {}


def _file_identity(path: Path) -> tuple:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def describe(path: Path, io: str, shape=None):
    """(inputs, outputs) as TensorInfo in the file's positional order, read from the file through LiteRT."""
    from runtime_py.contract import tensor_info

    # the tensors' names, shapes, types and scales are the file's whatever runs it: without XNNPACK, which would pack
    # every weight first (about 15-29 s of the default model's file at 1024x1360 here, against 0.02 s)
    with engine(path, io=io, xnnpack=False) as e:
        return [[tensor_info(s.name, io, s.shape, s.dtype, "NHWC", s.quantization) for s in specs]
                for specs in (e.input_specs(), e.output_specs())]


def xnnpack_fallback_ops(path: Path, threads: int = 1) -> Dict[str, int]:
    """Op types (with counts) that LiteRT's XNNPACK leaves to the built-in kernels, measured: what a gate's first
    inference of this very file ran outside XNNPACK (:func:`run`, LiteRT's profiler), else by loading the file
    into LiteRT's interpreter (:meth:`runtime_py.engines.tflite_engine.TFLiteEngine.delegation`), whose XNNPACK
    builds every indirection buffer to say it (4.1-4.6 GB at 1024x1360). The two agree on every file of a full
    default export (docs/EXPORT.md, "The inventory from the gate's first inference")."""
    seen = _builtin_ops_seen.pop(_file_identity(path), None)
    if seen is not None:
        return dict(seen)
    with engine(path, threads) as e:
        return e.delegation()["ops_outside"]


def gpu_verdict(analyzer_text: str) -> Dict[str, object]:
    """The GPU-compatibility lines of the TFLite analyzer report."""
    lines = [l.strip() for l in (analyzer_text or "").splitlines()]
    warnings = [l for l in lines if "GPU COMPATIBILITY WARNING" in l.upper() or "not supported by" in l.lower()]
    compatible = any("looks compatible with GPU delegate" in l for l in lines)
    verdict = next((l for l in lines if "GPU delegate" in l), "no verdict in the analyzer report")
    return {"compatible": bool(compatible and not warnings), "verdict": verdict, "warnings": warnings[:50]}


def inventory(path: Path, threads: int = 1, details: Optional[dict] = None) -> Dict[str, object]:
    """Manifest op inventory: counts per op type, QUANTIZE/DEQUANTIZE counts, ops XNNPACK
    does not take (measured), GPU verdict, and -- for int8 -- the converter's inventory
    before the post-pass."""
    from . import tflite_graph

    data = Path(path).read_bytes()
    inv = tflite_graph.inventory(data)
    inv["xnnpack_fallback_ops"] = xnnpack_fallback_ops(path, threads)
    details = details or {}
    if details.get("analyzer"):
        inv["gpu_compatibility"] = gpu_verdict(details["analyzer"])
    if details.get("inventory_converter") is not None:
        inv["before_postpass"] = details["inventory_converter"]
    if details.get("postpass"):
        # the calibration report goes to build.quantization (quantization_summary)
        inv["postpass"] = {k: v for k, v in details["postpass"].items() if k != "calibration"}
    return inv


WEIGHT_SCHEME = "int8, symmetric, one scale per output channel"


def quantization_summary(path: Path, precision: str, details: Optional[dict] = None) -> Dict[str, object]:
    """Manifest ``build.quantization`` of a quantized file: weight scheme, activation scheme (per
    calibrated tensor: the range method and range), and the convolution MACs computed quantized
    (``int8``/``int16x8``: integer input; ``int8-dynamic``: int8 weights) against those in float."""
    from . import tflite_graph as g

    if precision not in ("int8", "int8-dynamic", "int16x8"):
        return {}
    rows = g.conv_macs(g.read(Path(path).read_bytes()))
    if precision == "int8-dynamic":
        quantized = [r for r in rows if r["weights"] == "int8"]
    else:
        quantized = [r for r in rows if r["input"] in ("int8", "int16")]
    total = sum(r["macs"] for r in rows) or 1
    # the biases as the file stores them: int32 (int8), int64 (int16x8), float32 (int8-dynamic's hybrid convolutions)
    biases = sorted({r["bias"] for r in quantized if r["bias"] != "none"})
    out: Dict[str, object] = {
        "weights": WEIGHT_SCHEME + (f"; biases {', '.join(biases)}" if biases else ""),
        "conv_macs_quantized_fraction": round(sum(r["macs"] for r in quantized) / total, 4),
        "convs_quantized": len(quantized), "convs": len(rows),
        "float_convs": [r["node"] for r in rows if r not in quantized],
    }
    if (details or {}).get("weight_rounding"):
        out["weight_rounding"] = details["weight_rounding"]
    calibration = ((details or {}).get("postpass") or {}).get("calibration")
    if precision == "int8-dynamic":
        out["activations"] = {"scheme": "int8, quantized at run time per tensor (dynamic range)"}
        if (details or {}).get("bias_correction"):
            out["bias_correction"] = details["bias_correction"]
    elif calibration:
        out["activations"] = {"scheme": "int16, symmetric" if precision == "int16x8" else "int8, scale and zero point",
                              **calibration}
    return out
