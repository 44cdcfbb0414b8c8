"""Core ML export: one ML program (``.mlpackage``) per shape x precision x I/O signature.

Precisions (all compute in fp16 -- Core ML's GPU and Neural Engine are fp16 machines):

* ``fp16``       -- fp16 weights (``compute_precision=FLOAT16``);
* ``w8``         -- int8 weights, linear symmetric per output channel
  (``constexpr_affine_dequantize``), decompressed to fp16 at load time;
* ``palettized`` -- 6-bit palettized weights (64-entry lookup table per tensor, 1-D k-means
  computed here with NumPy: coremltools' own k-means needs scikit-learn).
* ``w8a8``       -- ``w8`` weights and int8 activations: ``quantize``/``dequantize`` pairs
  (iOS 17 ops, linear symmetric, one scale per tensor) around the inputs of convolutions, ELUs
  and clips, the format recent Neural Engines run in int8. Calibrated on the export's photos
  by running the fp16 program in the NumPy reference executor (Core ML's own calibration calls
  ``MLModel.predict``, macOS only), each tensor's range chosen as for TFLite int8
  (:mod:`export.quant_ranges`, symmetric grid). Deployment target iOS 17 / macOS 14.

Deployment target iOS 16 / macOS 13: the first with image outputs for ML programs and the
iOS16 weight-compression ops (``constexpr_affine_dequantize``, ``constexpr_lut_to_dense``). The I/O signatures are described in
:mod:`export.coreml_io`.

This module is the ``coreml`` format backend of the export command (the interface is described
in :mod:`export.backends`: ``convert(job)``, ``describe``, ``inventory``, ``run``);
:func:`convert_generator` is the same conversion with plain arguments.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from runtime_py import tolerances
from runtime_py.errors import MissingDependencyError, UserError
from runtime_py.imageio import default_file_mode

from .coreml_io import IOS, coreml_types, example_inputs, tensor_infos, wrap

PRECISIONS = ("fp16", "w8", "palettized", "w8a8")
DEFAULT_PRECISIONS = ("fp16", "w8")
# w8a8 calibrates its activations on photos; w8 files that miss their gate may keep their most
# sensitive layers' weights in fp16 (export.fallback).
CALIBRATED = ("w8a8",)
FALLBACK_PRECISIONS = ("w8",)
# Tensors smaller than this stay fp16 (biases; compressing them saves nothing worth an op).
WEIGHT_THRESHOLD = 512


def unrounded_convs(generator, precision: str) -> set:
    """The generator's convolutions (module names) whose weights a file of ``precision`` leaves fp16 as converted:
    those of :data:`WEIGHT_THRESHOLD` values or fewer (the quantizer's threshold is inclusive; the default model's
    ``mergeconv18``, 432) in the weight-quantized precisions; none in fp16."""
    import torch

    if precision not in ("w8", "w8a8", "palettized"):
        return set()
    return {name for name, module in generator.named_modules()
            if isinstance(module, torch.nn.Conv2d) and module.weight.numel() <= WEIGHT_THRESHOLD}
PALETTE_BITS = 6
# The tolerance tables live with every other one, in runtime_py.tolerances (measurements: docs/COREML.md):
# the reference executor vs PyTorch fp32, and the export gate's Core ML rows (export.parity.tolerance_for
# reads a backend's PARITY_TOLERANCES).
EXECUTOR_TOLERANCES = tolerances.COREML_EXECUTOR
PARITY_TOLERANCES = tolerances.COREML_PARITY
AUTHOR = "gmcnn-mobile"
LICENSE = "MIT (code); weights: see the checkpoint's licence"

NAME = "coreml"
SUFFIX = ".mlpackage"
EXTRA = "export"

__all__ = ["NAME", "SUFFIX", "EXTRA", "PRECISIONS", "IOS", "check_available", "convert", "convert_generator",
           "describe", "inventory", "run", "artifact_name", "tensor_infos", "predict_samples"]


def _ct():
    from runtime_py.mil_executor import import_coremltools

    return import_coremltools("Core ML export")


def artifact_name(shape: Tuple[int, int], precision: str, io: str) -> str:
    return f"gmcnn_{shape[0]}x{shape[1]}_{precision}_{io}.mlpackage"


# ---------------------------------------------------------------------- weight compression

def kmeans_1d(values: np.ndarray, nbits: int, iterations: int = 30) -> Tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on scalars: (lut (2**nbits,), indices (len(values),) uint8).

    Deterministic: centres start at evenly spaced quantiles; on sorted data each cluster is a
    contiguous run, so assignment is a searchsorted against the midpoints between centres.
    """
    k = 1 << nbits
    flat = np.asarray(values, np.float64).ravel()
    order = np.sort(flat)
    centres = np.quantile(order, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        bounds = np.searchsorted(order, (centres[1:] + centres[:-1]) / 2)
        edges = np.concatenate([[0], bounds, [order.size]])
        sums = np.add.reduceat(np.concatenate([order, [0.0]]), edges[:-1])
        counts = np.diff(edges)
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
        if np.allclose(updated, centres):
            break
        centres = np.sort(updated)
    idx = np.searchsorted((centres[1:] + centres[:-1]) / 2, flat)
    return centres, idx.astype(np.uint8)


def _palette_lut(weight: np.ndarray):
    lut, idx = kmeans_1d(weight, PALETTE_BITS)
    return lut.astype(weight.dtype), idx


def weight_const_names(mlmodel, modules) -> Dict[str, str]:
    """Generator convolution (module name) -> the name of its weight constant in a freshly converted
    program (``generator_net_layers_b1conv1_weight_to_fp16``: the traced parameter's path). UserError
    for a module with no weight constant."""
    consts = [op.inputs["weight"].op.name for op in mlmodel._mil_program.functions["main"].operations
              if op.op_type == "conv"]
    out = {}
    for module in modules:
        stem = "_" + module.replace(".", "_") + "_weight"
        found = [c for c in consts if stem in "_" + c]
        if len(found) != 1:
            raise UserError(f"convolution {module} has no unique weight constant in the Core ML program")
        out[module] = found[0]
    return out


def check_keep_float(generator, modules) -> None:
    """UserError, before anything is converted, for a name in ``modules`` that is not a convolution of
    ``generator`` (module names as ``generator.named_modules()`` gives them): it can have no weight constant
    to keep fp16. :func:`weight_const_names` then finds each one's constant in the converted program."""
    import torch

    convolutions = {name for name, module in generator.named_modules() if isinstance(module, torch.nn.Conv2d)}
    for module in modules:
        if module not in convolutions:
            raise UserError(f"convolution {module} has no unique weight constant in the Core ML program: "
                            "the generator has no convolution of that name")


def compress(mlmodel, precision: str, keep_float=()):
    """Apply the weight compression of ``precision`` to a converted fp16 ML program; the weights of
    the generator convolutions named in ``keep_float`` stay fp16 (w8)."""
    if precision == "fp16":
        return mlmodel
    _ct()  # a missing coremltools is a one-line MissingDependencyError
    import coremltools.optimize.coreml as cto

    if precision in ("w8", "w8a8"):
        op_cfg = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                             granularity="per_channel", weight_threshold=WEIGHT_THRESHOLD)
        skip = {name: None for name in weight_const_names(mlmodel, keep_float).values()} if keep_float else None
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op_cfg,
                                                                           op_name_configs=skip))
    if precision == "palettized":
        op_cfg = cto.OpPalettizerConfig(mode="custom", lut_function=_palette_lut, weight_threshold=WEIGHT_THRESHOLD)
        return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=op_cfg))
    raise UserError(f"unknown Core ML precision {precision!r}; expected one of {', '.join(PRECISIONS)}")


# ---------------------------------------------------------------------- metadata

CONVERSION_DATE_KEY = "com.github.apple.coremltools.conversion_date"


def _metadata(generator, shape, precision: str, io: str, checkpoint_sha256: str) -> Dict[str, str]:
    meta = generator.meta
    return {
        "gmcnn_mobile.variant": meta.variant,
        "gmcnn_mobile.cnum": str(meta.cnum),
        "gmcnn_mobile.shape": f"{shape[0]}x{shape[1]}",
        "gmcnn_mobile.precision": precision,
        "gmcnn_mobile.io": io,
        "gmcnn_mobile.checkpoint_sha256": checkpoint_sha256,
        "gmcnn_mobile.channel_order": "RGB",
        "gmcnn_mobile.weights_channel_order": meta.channel_order,
        "gmcnn_mobile.layout": "NCHW" if io == "tensor" else "image",
        "gmcnn_mobile.mask_polarity": "1=hole" if io == "tensor" else "255=hole (>=128 counts as hole)",
        "gmcnn_mobile.value_range": "[-1,1]" if io == "tensor" else "[0,255]",
    }


def fill_description(mlmodel, generator, shape, precision: str, io: str, checkpoint_sha256: str) -> None:
    """Fill in the model's description: author, licence, summary, per-feature text, user metadata."""
    h, w = shape
    m = generator.meta
    mlmodel.author = AUTHOR
    mlmodel.license = str(m.extra.get("license", LICENSE)) if isinstance(m.extra, dict) else LICENSE
    mlmodel.short_description = (
        f"GMCNN image inpainting ({m.variant} variant, cnum {m.cnum}) at {h}x{w}, {precision} weights, "
        f"fp16 compute, {io} I/O: fills the masked hole of a photo."
    )
    mlmodel.version = "1"
    if io == "tensor":
        text = {
            "image": f"(1,3,{h},{w}) float32 NCHW, RGB, values in [-1,1] (x/127.5 - 1)",
            "mask": f"(1,1,{h},{w}) float32 NCHW, 1 = hole, 0 = known",
            "output": f"(1,3,{h},{w}) float32 NCHW, RGB in [-1,1]; raw prediction everywhere (composite it yourself)",
        }
    else:
        text = {
            "image": f"{w}x{h} RGB image (8-bit); normalised to [-1,1] inside",
            "mask": f"{w}x{h} 8-bit grayscale mask, 255 = hole (values >= 128 count as hole)",
            "output": f"{w}x{h} RGB image: prediction inside the hole, input pixels elsewhere",
        }
    for name, desc in text.items():
        if name in mlmodel.input_description or name in mlmodel.output_description:
            target = mlmodel.input_description if name != "output" else mlmodel.output_description
            target[name] = desc
    mlmodel.user_defined_metadata.update(_metadata(generator, shape, precision, io, checkpoint_sha256))
    # coremltools stamps the day of conversion into the metadata, so the same checkpoint gave other
    # package bytes on another day; the manifest's ``created`` keeps the time instead.
    if CONVERSION_DATE_KEY in mlmodel.user_defined_metadata:
        del mlmodel.user_defined_metadata[CONVERSION_DATE_KEY]


# ---------------------------------------------------------------------- conversion

#: The smallest side :func:`trace_shape` halves a shape down to.
TRACE_MIN_SIDE = 256


def trace_shape(variant: str, shape: Tuple[int, int], min_side: Optional[int] = None) -> Tuple[int, int]:
    """The (rows, cols) at which ``_trace`` runs the generator for a program declared at ``shape``: ``shape``
    halved while both halves stay multiples of 4 and at least ``min_side`` (default :data:`TRACE_MIN_SIDE`) and the
    variant's own minimum.

    The traced TorchScript graph is the same at every shape the generator accepts
    (:func:`models.gmcnn.check_shape`), and ``ct.convert`` takes the shapes from the inputs it is given: the one
    size the model's Python code computes, the TF variant's stride-2 SAME padding, depends only on whether the
    sides at full and half resolution are even, which every multiple of 4 gives; every other size is a traced
    ``aten::size``. A trace computes a whole forward pass, 26 s of the default model at 1024x1360 against 1.4 s at
    256x340 on a 2-core EPYC, and the package is the same bytes (tests/test_coreml_export.py; docs/COREML.md).
    """
    from models.gmcnn import min_side as variant_min_side

    floor = max(TRACE_MIN_SIDE if min_side is None else int(min_side), variant_min_side(variant))
    h, w = (int(v) for v in shape)
    while h % 8 == 0 and w % 8 == 0 and min(h, w) // 2 >= floor:
        h, w = h // 2, w // 2
    return h, w


def _trace(generator, shape, io: str):
    """The TorchScript trace of ``generator`` behind signature ``io``, run at ``shape`` (:func:`trace_shape`)."""
    import torch

    module = wrap(generator, io)
    with torch.no_grad():
        return torch.jit.trace(module, example_inputs(shape, io), check_trace=False)


def stable_item_identifiers(package: Path) -> None:
    """Rewrite ``package``'s ``Manifest.json`` so that the same package contents give the same bytes.

    coremltools names each item of a package (the program, the weights folder) by a fresh random UUID at every
    save, and lists the items in that order, so two exports of one model never had the same package digest.
    Each identifier becomes a name-based UUID (version 5) of the item's path and its digest
    (:func:`runtime_py.manifest.artifact_digest`: a file's sha256, a folder's listing digest), the items listed by path; the index keeps its fields and its 4-space JSON layout. Core ML reads the identifiers
    only as keys (``rootModelIdentifier`` names the program's), so any UUID string serves.
    """
    import json
    import uuid

    from runtime_py.manifest import artifact_digest

    index_path = Path(package) / "Manifest.json"
    index = json.loads(index_path.read_text())
    items = index["itemInfoEntries"]
    renamed = {}
    for old, item in items.items():
        digest, _ = artifact_digest(Path(package) / "Data" / item["path"])
        renamed[old] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"gmcnn-mobile:{item['path']}:{digest}"))
    index["itemInfoEntries"] = {renamed[old]: items[old] for old in sorted(items, key=lambda k: items[k]["path"])}
    index["rootModelIdentifier"] = renamed[index["rootModelIdentifier"]]
    index_path.write_text(json.dumps(index, indent=4) + "\n")


def save_atomically(mlmodel, final: Path) -> Path:
    """Save an .mlpackage under a temporary name in the same folder, then rename it into place.

    A package is a directory, and rename() cannot replace a non-empty one, so an existing
    package is first renamed aside and deleted only after the new one is in place. Its item identifiers are
    made stable first (:func:`stable_item_identifiers`): the same model saves into the same bytes.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final.stem}.", suffix=".partial", dir=final.parent))
    os.chmod(tmp_dir, default_file_mode(directory=True))
    tmp = tmp_dir / final.name
    try:
        mlmodel.save(str(tmp))
        stable_item_identifiers(tmp)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return final


def calibrate_activations(mlmodel, io: str, images: np.ndarray, masks: np.ndarray, workdir,
                          method: str = "minmax") -> Tuple[object, Dict[str, object]]:
    """int8 activations for a converted fp16 program (iOS 17 target): returns (program with
    ``quantize``/``dequantize`` pairs, report).

    The program runs in the reference executor on each calibration sample (images (N,H,W,3)
    uint8, masks (N,H,W[,1]) 255 = hole), which records every op output's min, max and a value
    subsample; :func:`export.quant_ranges.choose_ranges` picks each tensor's symmetric int8 range
    (judged after the ELU for tensors that only feed one);
    tensors meeting at a concatenation share one range (as coremltools does); then coremltools'
    own passes insert the pairs (``insert_prefix/suffix_quantize_dequantize_pair``).
    """
    from coremltools.converters.mil.frontend.milproto import load as milproto_load
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.models import utils as model_utils
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig

    from runtime_py.contract import hole_of
    from runtime_py.engines.coreml_engine import CoreMLEngine
    from runtime_py.mil_executor import load_program

    from .quant_ranges import TensorStats, choose_ranges

    ct = _ct()
    stats: Dict[str, TensorStats] = {}
    rng = np.random.default_rng(0)

    def keep(name, value):
        if name in outputs or not np.issubdtype(value.dtype, np.floating):
            return
        flat = value.ravel()
        sub = flat if flat.size <= 1 << 15 else flat[rng.integers(0, flat.size, 1 << 15)]
        stats.setdefault(name, TensorStats()).add(float(flat.min()), float(flat.max()), sub.astype(np.float32))

    tmp = Path(tempfile.mkdtemp(prefix=".calibrate-", dir=workdir))
    try:
        mlmodel.save(str(tmp / "fp16.mlpackage"))
        program = load_program(tmp / "fp16.mlpackage")
        outputs = {spec.name for spec in program.outputs}
        # fed as the runtime's Core ML engine feeds the package (the contract's encoding of each sample)
        engine = CoreMLEngine(tmp / "fp16.mlpackage", shape=images.shape[1:3], io=io, reference=True)
        with engine:
            for image, mask in zip(images, masks.reshape(*masks.shape[:3], 1)):
                feed = program.unbatched(engine.make_feed(image, hole_of(mask[..., 0])))
                for spec in program.inputs:
                    keep(spec.name, program._prepare(spec, feed[spec.name]).astype(np.float32))
                program(feed, observe=lambda step, result: keep(step.outputs[0][0], result))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    consumers: Dict[str, set] = {}
    for step in program.steps:
        for v in step.inputs.values():
            for name in (v if isinstance(v, tuple) else (v,)):
                consumers.setdefault(name, set()).add(step.op_type)
    through = {name: "ELU" for name in stats if consumers.get(name) == {"elu"}}
    chosen = choose_ranges(stats, bits=8, symmetric=True, method=method, through=through)
    ranges = {name: {"rmin": c["range"][0], "rmax": c["range"][1]} for name, c in chosen.items()}
    for step in program.steps:  # inputs and output of a concatenation share one range
        if step.op_type == "concat":
            group = [n for n in step.inputs["values"] + (step.outputs[0][0],) if n in ranges]
            lo, hi = min(ranges[n]["rmin"] for n in group), max(ranges[n]["rmax"] for n in group)
            for n in group:
                ranges[n] = {"rmin": lo, "rmax": hi}
    outside = {}
    if io == "image":
        # the image signature's own ops around the network (normalising the photo and the mask, compositing the
        # prediction into the known pixels) stay float: int8 there moved half the known pixels by a level
        convs = [i for i, step in enumerate(program.steps) if step.op_type == "conv"]
        outside = {step.name: None for step in program.steps[:convs[0]] + program.steps[convs[-1] + 1:]}
    config = OptimizationConfig(global_config=OpLinearQuantizerConfig(mode="linear_symmetric"),
                                op_name_configs=outside)
    passes = []
    for name in ("insert_prefix_quantize_dequantize_pair", "insert_suffix_quantize_dequantize_pair"):
        graph_pass = PASS_REGISTRY[f"compression::{name}"]
        graph_pass.set_options([PassOption("config", config), PassOption("activation_stats", ranges)])
        passes.append(graph_pass)
    passes.append(PASS_REGISTRY["common::dequantize_quantize_pair_elimination"])
    quantized = model_utils._apply_graph_pass(mlmodel, passes, spec_version=ct._SPECIFICATION_VERSION_IOS_17,
                                              pymil_load_func=milproto_load.load, skip_model_load=True)
    report = {"scheme": "int8, linear symmetric, one scale per tensor", "activation_bits": 8, "symmetric": True,
              "method": method, "samples": int(images.shape[0]),
              "methods": {m: sum(c["method"] == m for c in chosen.values()) for m in {c["method"] for c in chosen.values()}},
              "tensors": chosen}
    return quantized, report


def _converted_program(generator, shape: Tuple[int, int], io: str, compute: str, target, say, converted=None):
    """The fp16 (``compute``) ML program of ``generator`` behind signature ``io`` at ``shape`` for deployment
    ``target``, as ``ct.convert`` makes it; taken from ``converted`` (a dict this fills) when an earlier call
    made it. Compression and calibration build new programs and leave it unchanged, so every precision of
    one shape and signature starts from one conversion; only the latest shape and signature's are kept."""
    ct = _ct()
    h, w = shape
    key = (id(generator), h, w, io, compute, str(target))
    if converted is not None and key in converted:
        return converted[key]
    th, tw = trace_shape(generator.meta.variant, (h, w))
    say(f"coreml {h}x{w} {io}: tracing" + (f" at {th}x{tw}" if (th, tw) != (h, w) else ""))
    traced = _trace(generator, (th, tw), io)
    inputs, outputs = coreml_types((h, w), io)
    say(f"coreml {h}x{w} {io}: converting")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlmodel = ct.convert(
            traced, inputs=inputs, outputs=outputs, convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT32 if compute == "fp32" else ct.precision.FLOAT16,
            minimum_deployment_target=target, skip_model_load=True,
        )
    if converted is not None:
        for other in [k for k in converted if k[:4] != key[:4]]:
            del converted[other]
        converted[key] = mlmodel
    return mlmodel


def convert_generator(generator, shape: Tuple[int, int], precision: str, io: str, workdir, *,
            checkpoint_sha256: str = "", name: Optional[str] = None,
            progress: Optional[Callable[[str], None]] = None, compute: str = "fp16",
            keep_float=(), calibration=None, range_method: str = "minmax", report: Optional[dict] = None,
            converted: Optional[dict] = None) -> Path:
    """Convert ``generator`` to a Core ML ML program and save it atomically in ``workdir``.

    generator: a models.gmcnn.GMCNNGenerator (eval mode); shape: (rows, cols), multiples of 4.
    Returns the path of the written ``.mlpackage`` (``name`` or :func:`artifact_name`).
    ``compute="fp32"`` builds an fp32 program instead: not a shipped precision, it exists so
    tests can check the reference executor's op semantics without fp16 rounding in the way.
    ``keep_float``: generator convolutions whose weights stay fp16 (w8's fallback).
    ``calibration`` (w8a8): export.samples.Samples to calibrate the activations on;
    ``range_method`` as in :func:`export.quant_ranges.choose_ranges`; ``report`` (a dict)
    receives the calibration report. ``converted``: a dict shared by calls that may reuse one conversion
    (:func:`convert_many`): the program converted for this shape, I/O signature and deployment target is
    compressed again instead of converted again (the same package bytes).
    Raises UserError for an unknown precision / I/O signature or an unusable shape.
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown Core ML precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if io not in IOS:
        raise UserError(f"unknown I/O signature {io!r}; expected one of {', '.join(IOS)}")
    from models.gmcnn import check_shape

    h, w = int(shape[0]), int(shape[1])
    try:
        check_shape(generator.meta.variant, h, w)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if keep_float:
        check_keep_float(generator, keep_float)
    ct = _ct()
    say = progress or (lambda _msg: None)
    if precision == "w8a8" and calibration is None:
        raise UserError("w8a8 needs calibration samples")
    target = ct.target.iOS17 if precision == "w8a8" else ct.target.iOS16
    converted_program = _converted_program(generator, (h, w), io, compute, target, say, converted)
    mlmodel = converted_program
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if precision == "w8a8":
            say(f"coreml {h}x{w} {precision} {io}: calibrating activations on {len(calibration)} samples "
                "in the reference executor")
            mlmodel, calibration_report = calibrate_activations(mlmodel, io, calibration.images, calibration.masks,
                                                                Path(workdir), range_method)
            if report is not None:
                report["calibration"] = calibration_report
        if precision != "fp16":
            say(f"coreml {h}x{w} {precision} {io}: compressing weights")
            mlmodel = compress(mlmodel, precision, keep_float)
    if mlmodel is converted_program and converted is not None:
        # fp16 is the converted program itself, described below: no other precision may start from it now
        # (a copy of the program would do, but its metadata map serialises in another order: other bytes)
        converted.pop(next(k for k, v in converted.items() if v is mlmodel))
    fill_description(mlmodel, generator, (h, w), precision, io, checkpoint_sha256)
    return save_atomically(mlmodel, Path(workdir) / (name or artifact_name((h, w), precision, io)))


# ---------------------------------------------------------------------- manifest entries

def manifest_artifact(path, shape: Tuple[int, int], precision: str, io: str, *, relative_to=None, parity=None):
    """A runtime_py.manifest.Artifact describing a written package (op inventory from the program itself)."""
    from runtime_py.manifest import Artifact, artifact_digest

    path = Path(path)
    inputs, outputs = tensor_infos(shape, io)
    file = path.relative_to(relative_to).as_posix() if relative_to else path.name
    sha, size = artifact_digest(path)
    return Artifact(file=file, format="coreml", shape=[int(shape[0]), int(shape[1])], precision=precision, io=io,
                    sha256=sha, bytes=size, inputs=inputs, outputs=outputs,
                    op_inventory=inventory(path), parity=parity)


# ---------------------------------------------------------------------- running (parity gate)

def predict_samples(path, io: str, images: np.ndarray, masks: np.ndarray, *,
                    reference: Optional[bool] = True, compute_units: str = "ALL") -> np.ndarray:
    """Run an exported package on a batch, one sample at a time, through the runtime's Core ML engine.

    images: (N,H,W,3) uint8 RGB; masks: (N,H,W,1) or (N,H,W) uint8, 255 = hole.
    Returns (N,H,W,3): float32 RGB in [-1,1] (raw prediction) for ``tensor`` I/O, uint8 RGB
    composite for ``image`` I/O. ``reference``: True (default) the NumPy reference executor
    (:mod:`runtime_py.mil_executor`), False real Core ML (macOS, on ``compute_units``), None whichever
    runs here.
    """
    from runtime_py.engines.coreml_engine import CoreMLEngine

    from .parity import run_samples
    from .samples import Samples

    masks = masks.reshape(*masks.shape[:3], 1)
    engine = CoreMLEngine(path, shape=images.shape[1:3], io=io, reference=reference, compute_units=compute_units)
    return run_samples(engine, Samples(images, masks, [""] * len(images)))


# ---------------------------------------------------------------------- export backend interface

def check_available() -> None:
    """Raise MissingDependencyError (naming the extra) when coremltools is not installed. Looks it up
    without importing it (coremltools imports TensorFlow and torch: ~10 s, which an export whose files
    are all up to date does not need)."""
    import importlib.util

    if importlib.util.find_spec("coremltools") is None:
        raise MissingDependencyError("coremltools", "export", "Core ML export")


def convert_many(jobs, progress=None, stages=None):
    """Backend entry: every job through :func:`convert` (each its own stage), the program of each shape, I/O
    signature and deployment target converted once and compressed per precision (fp16, w8, palettized,
    w8a8's calibration, the fallback's keep-float candidates)."""
    from . import backends

    converted: Dict[tuple, object] = {}
    groups = {}  # fp16 last in its shape and signature: it takes the converted program itself
    for job in jobs:
        groups.setdefault((tuple(job.shape), job.io), []).append(job)
    ordered = [job for group in groups.values() for job in sorted(group, key=lambda job: job.precision == "fp16")]
    return backends.convert_each(sys.modules[__name__], ordered, progress, stages,
                                 convert=lambda job: convert(job, converted))


def convert(job, converted: Optional[dict] = None) -> Tuple[Path, Dict[str, object]]:
    """Backend entry (export.backends.ConvertJob): write the package at ``job.out`` and return it.
    ``converted``: as in :func:`convert_generator`."""
    meta = dict(job.metadata)
    out = Path(job.out)
    report: Dict[str, object] = {}
    path = convert_generator(job.generator, tuple(job.shape), job.precision, job.io, out.parent, name=out.name,
                             checkpoint_sha256=str(meta.get("checkpoint_sha256", "")),
                             keep_float=tuple(job.extra.get("keep_float") or ()),
                             calibration=job.calibration if job.precision in CALIBRATED else None,
                             range_method=job.options.range_method, report=report, converted=converted)
    return path, report


WEIGHT_SCHEME = "int8, linear symmetric, one scale per output channel (constexpr_affine_dequantize)"


def quantization_summary(path, precision: str, details: Optional[dict] = None) -> Dict[str, object]:
    """Manifest ``build.quantization`` of a w8 / w8a8 package: weight scheme, the convolution MACs
    whose weights are int8, and (w8a8) each calibrated tensor's range method and range."""
    if precision not in ("w8", "w8a8"):
        return {}
    from runtime_py.mil_executor import load_program

    program = load_program(path)
    total = quantized = 0
    float_convs = []
    for step in program.steps:
        if step.op_type != "conv":
            continue
        weight = program.constants[step.inputs["weight"]]
        _, _, oh, ow = step.outputs[0][2]
        macs = int(oh * ow * np.prod(weight.shape))
        total += macs
        if step.inputs["weight"] in program.decompressed:
            quantized += macs
        else:
            float_convs.append(step.name)
    out: Dict[str, object] = {"weights": WEIGHT_SCHEME, "conv_macs_quantized_fraction": round(quantized / max(total, 1), 4),
                              "float_convs": float_convs}
    calibration = (details or {}).get("calibration")
    out["activations"] = calibration if calibration else {"scheme": "fp16"}
    return out


def describe(path, io: str, shape=None):
    """(inputs, outputs) TensorInfo lists for the manifest."""
    if shape is None:
        from runtime_py.mil_executor import load_program

        shape = load_program(path).inputs[0].shape[-2:]
    return tensor_infos(tuple(int(v) for v in shape), io)


def inventory(path, threads: int = 1, details: Optional[dict] = None) -> Dict[str, object]:
    """Op inventory of the package's ML program: count per op type, weight-decompression ops, dtypes."""
    from runtime_py.mil_executor import load_program

    program = load_program(path)
    counts = dict(sorted(program.op_counts.items()))
    conv_dtypes = sorted({str(dt) for s in program.steps if s.op_type == "conv" for _, dt, _ in s.outputs})
    return {
        "ops": counts,
        "compute_dtype": "/".join(conv_dtypes),
        "weight_decompression_ops": sum(v for k, v in counts.items() if k.startswith("constexpr_")),
        "deployment_target": "iOS16 / macOS13",
        "spec_version": program.spec_version,
        "unsupported_by_reference_executor": [],
    }


#: What each path of the reference executor computes (runtime_py.mil_executor), as the manifest names it.
EXECUTOR_PATHS = {
    "fast": "fast path: conv as float32 ONNX Runtime Conv, rounded to fp16 where the program computes in fp16",
    "exact": "exact path: fp16 ops in fp16, fp32-accumulated conv",
}


def executor_name(mode: Optional[str] = None) -> str:
    """What ran a gate: real Core ML (macOS), or the reference executor and its path (``mode``: fast | exact;
    None: the default, :func:`runtime_py.mil_executor.default_mode`)."""
    import platform

    if platform.system() == "Darwin":
        return f"coreml {_ct().__version__} (macOS predict, compute units ALL)"
    from runtime_py.mil_executor import EXECUTOR_NAME, default_mode

    return f"{EXECUTOR_NAME} (numpy, {EXECUTOR_PATHS[mode or default_mode()]})"


def gate_session(paths):
    """The block the export gates its Core ML packages in (:mod:`export.api`): off macOS, the reference executor's
    shared model cores over ``paths`` (:func:`runtime_py.mil_executor.sharing_model_core`), so that a package whose
    core is an earlier one's -- the ``image`` package of a precision after its ``tensor`` one -- computes the ops
    around its core alone, with the same bytes out. On macOS, where Core ML runs them, nothing."""
    import platform

    if platform.system() == "Darwin" or not paths:
        return contextlib.nullcontext()
    from runtime_py.mil_executor import default_mode, sharing_model_core

    return sharing_model_core(paths, mode=default_mode())


def run(path, io: str, samples, threads: int = 2, keep_going=None):
    """Execute on export.samples.Samples through the runtime's Core ML engine: ((N,H,W,3) outputs, executor).
    Real Core ML on macOS, else the reference executor (its default path, which the executor string names; inside
    :func:`gate_session`, also the samples whose model core came from an identical program's run).
    ``keep_going``: as :func:`export.parity.run_samples` takes it."""
    from runtime_py.engines.coreml_engine import CoreMLEngine
    from runtime_py.memory import reuse_freed_memory
    from runtime_py.mil_executor import default_mode, runs_served_by_sharing

    from .parity import run_samples

    mode = default_mode()
    engine = CoreMLEngine(path, shape=samples.shape, io=io, executor_mode=mode)
    before = runs_served_by_sharing()
    # one block over the package's samples, not the executor's one an inference: each inference then takes the
    # memory the one before it freed instead of faulting fresh pages in (four at 1024x1360: 0.6 M page faults
    # against 2.4 M, 70.7 s against 81.0 s), the same bytes, about one inference's peak (docs/EXPORT.md, "Page faults")
    with reuse_freed_memory():
        outputs = run_samples(engine, samples, keep_going)
    served = runs_served_by_sharing() - before
    shared = (f"; model core of {served} of {len(outputs)} samples from an identical program's run on the same core "
              f"input, bit for bit" if served else "")
    return outputs, executor_name(mode) + shared
