"""Python API of the export: make phone artifacts, gate them on parity, write the manifest.

::

    from export.api import export_artifacts

    manifest = export_artifacts(
        checkpoint,            # path to any supported checkpoint, None (shipped default model),
                               # or a models.gmcnn.GMCNNGenerator object
        out_dir,               # folder for the artifacts and manifest.json (created if missing)
        ExportOptions(shapes=[(512, 680)], formats=["tflite"]),  # export.options: every option,
    )                                                            # its default and meaning
    manifest.find("tflite", (512, 680), "int8", "image").file   # -> file name inside out_dir

Options can also be given as keyword arguments (``export_artifacts(ckpt, out, shapes=[(512, 680)],
precisions=["int8"])``), alone or changing fields of ``options``: the same value is built from them.

Returns a :class:`runtime_py.manifest.Manifest` (also written to ``out_dir/manifest.json``).
Raises :class:`runtime_py.errors.UserError` with a one-line message for bad input, and
:class:`ExportFailed` (a UserError) after writing everything that passed when some
artifact failed conversion or parity; failed artifacts never appear under their final name.

Tests and benchmarks make tiny artifacts fast with a small generator and shape, e.g.
``export_artifacts(build_generator("tf", 4, seed=0), tmp, shapes=[(64, 96)],
precisions=["fp32"], ios=["tensor"])`` (about 20 s here, most of it TensorFlow start-up).

Re-running with unchanged inputs reuses the files (content-hash cache key per artifact,
stored in the manifest) without starting TensorFlow. Files appear only complete: each is
written under a ``.partial-*`` name in ``out_dir`` and renamed after passing the gate.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from runtime_py.errors import UserError
from runtime_py.manifest import (MANIFEST_NAME, SCHEMA_VERSION, Artifact, Manifest, ParityResult, artifact_digest,
                                 load_manifest)

from . import backends, parity
from .options import ExportOptions
from .samples import NUDGED_FRACTION, Samples, concatenated, load_samples, nudged, photo_dir_digest

PARTIAL_PREFIX = ".partial-"
#: after PARTIAL_PREFIX and the process id: a file that passed its gate and waits for its inventory
ACCEPTED_PREFIX = "accepted-"
WORK_DIR_NAME = ".work"
HOLDOUT_MASKS_PER_PHOTO = 2
TOOL_DISTRIBUTIONS = {
    "torch": "torch", "onnx": "onnx", "onnxsim": "onnxsim", "onnx2tf": "onnx2tf", "tensorflow": "tensorflow",
    "tf_keras": "tf_keras", "litert": "ai-edge-litert", "coremltools": "coremltools", "onnxruntime": "onnxruntime",
    "numpy": "numpy", "flatbuffers": "flatbuffers",
}


class ExportFailed(UserError):
    """Some artifacts failed; ``failures`` maps artifact file name -> reason."""

    def __init__(self, failures: Dict[str, str]):
        self.failures = failures
        parts = [f"{name}: {why}" for name, why in failures.items()]
        super().__init__(f"{len(failures)} artifact(s) failed and were not written: " + " | ".join(parts))


@dataclass
class _Planned:
    fmt: str
    shape: Tuple[int, int]
    precision: str
    io: str
    file: str
    key: str
    tolerance: Dict[str, float]
    recorded: Dict[str, object] = field(default_factory=dict)  # ExportOptions.recorded: cache key, build entry

    @property
    def kind(self) -> Tuple[str, Tuple[int, int], str]:
        """(format, shape, precision): what a fallback seed is kept by (export.fallback.Seed)."""
        return self.fmt, tuple(self.shape), self.precision


# --------------------------------------------------------------------------- helpers

def tool_versions() -> Dict[str, str]:
    from runtime_py.machine import package_version

    from .onnx_export import OPSET

    out = {label: package_version(dist) for label, dist in TOOL_DISTRIBUTIONS.items()}

    out["onnx_opset"] = str(OPSET)
    out["python"] = sys.version.split()[0]
    return out


def _code_digest() -> str:
    """Hash of the code that shapes the artifacts (the export package and the network definition)."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for p in sorted(here.glob("*.py")) + [here.parent / "models" / "gmcnn.py"]:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _generator_digest(gen) -> str:
    h = hashlib.sha256(json.dumps(gen.meta.to_dict(), sort_keys=True, default=str).encode())
    for k, v in sorted(gen.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _resolve_checkpoint(checkpoint) -> Tuple[object, Dict[str, object]]:
    """(generator, manifest checkpoint entry) for a path, None (default model) or a generator."""
    from models.gmcnn import GMCNNGenerator, count_parameters

    if isinstance(checkpoint, GMCNNGenerator):
        gen = checkpoint.eval()
        info = {"path": "", "sha256": "", "weights_sha256": _generator_digest(gen)}
    else:
        from models import default_checkpoint, load_generator
        from models.checkpoint import sha256_path

        path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
        gen = load_generator(path)  # CheckpointError (a UserError) for anything unusable
        info = {"path": str(path), "sha256": sha256_path(path), "weights_sha256": _generator_digest(gen)}
    info["meta"] = gen.meta.to_dict()
    info["parameters"] = count_parameters(gen)
    return gen, info


def artifact_name(variant: str, cnum: int, fmt: str, shape, io: str, precision: str, suffix: str) -> str:
    return f"gmcnn_{variant}_c{cnum}_{shape[0]}x{shape[1]}_{io}_{precision}{suffix}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@dataclass
class _Accepted:
    """A file that passed its gate and waits, at ``held``, for its op inventory (``_make``'s ``describe_accepted``)."""
    planned: _Planned
    backend: object
    conversion: object  # backends.ConvertResult: its details feed the inventory, its seconds the build record
    parity: ParityResult
    quantization: Optional[dict]
    held: Path


class _Progress:
    """Stage lines with elapsed time on stderr (tqdm-safe), or nothing."""

    def __init__(self, enabled: bool, total: int):
        self.t0 = time.time()
        self.bar = None
        self.enabled = enabled
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="artifacts", unit="file", file=sys.stderr, leave=False)

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.time() - self.t0:7.1f}s] {msg}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------ API

def export_artifacts(checkpoint=None, out_dir: Union[str, os.PathLike] = "artifacts",
                     options: Optional[ExportOptions] = None, measure: Optional[Callable] = None,
                     **changes) -> Manifest:
    """Export, gate and describe artifacts; see the module docstring and :class:`export.options.ExportOptions`.

    ``changes``: option fields given as keyword arguments (``shapes=...``, ``precisions=...``),
    applied to ``options`` (default: every option's default); the result is checked once.
    ``measure``: ``measure(path, threads, runs, warmup=1) -> dict`` (``benchmarks.measure.measure_file``: one
    process per file), which times the pure and the fallback file for the price recorded with a
    file the sensitivity-guided fallback made (``options.quant_fallback``, :mod:`export.fallback`);
    without it (export never starts a benchmark process itself) the price has sizes only. The
    ``gmcnn-mobile`` command passes it. A function, not an option: nothing records it.
    """
    from runtime_py.imageio import check_output_dir

    from .stages import GIB, StageLog

    t_start = time.time()
    out = Path(out_dir)
    check_output_dir(out, "export folder")  # a file, a path under a file, no write permission: before any work
    if options is None or changes:
        options = dataclasses.replace(options or ExportOptions(), **changes)
    formats, precisions = options.formats, options.precisions

    # formats, precisions and the backends' tools: a bad request fails before any work
    fmt_list = list(formats) if formats else list(backends.available_formats())
    mods = {fmt: backends.get_backend(fmt) for fmt in fmt_list}
    per_format: Dict[str, List[str]] = {}
    for fmt, mod in mods.items():
        default = getattr(mod, "DEFAULT_PRECISIONS", mod.PRECISIONS)
        wanted = list(default) if precisions is None else [p for p in precisions if p in mod.PRECISIONS]
        per_format[fmt] = wanted
    if precisions is not None:
        known = {p for mod in mods.values() for p in mod.PRECISIONS}
        unknown = [p for p in precisions if p not in known]
        if unknown:
            raise UserError(f"unknown precision(s) {', '.join(unknown)} for {', '.join(fmt_list)}; "
                            f"choose from {', '.join(sorted(known))}")
        # a format asked for by name must make something: never a manifest listing a format with no file
        empty = [fmt for fmt in fmt_list if not per_format[fmt]]
        if empty:
            makes = "; ".join(f"{fmt} makes {', '.join(mods[fmt].PRECISIONS)}" for fmt in fmt_list)
            raise UserError(f"--precisions {','.join(precisions)} gives no artifact for {', '.join(empty)} ({makes}); "
                            f"add one of its precisions or leave {', '.join(empty)} out of --formats")

    log = StageLog(int(options.memory_budget_gib * GIB))
    try:
        return _export(checkpoint, out, options, fmt_list, mods, per_format, measure=measure, log=log,
                       t_start=t_start)
    finally:
        log.close()


def _export(checkpoint, out: Path, options: ExportOptions, fmt_list, mods, per_format, *, measure, log,
            t_start: float) -> Manifest:
    """:func:`export_artifacts` after the request's checks: plan, make, gate, write (``log`` times each stage)."""
    from runtime_py.imageio import make_output_dir

    previous = _previous_manifest(out, options)
    earlier = _earlier_manifest(options, previous, checkpoint)  # a bad --quant-fallback-seeds fails before any work
    gen = None
    with log.stage("checkpoint"):
        # the same checkpoint file as the previous run's: its manifest entry says what loading it would (no torch)
        ckpt_info = _known_checkpoint(checkpoint, previous)
        if ckpt_info is None:
            gen, ckpt_info = _resolve_checkpoint(checkpoint)
            _check_shapes(gen, options.shapes)
    variant, cnum = ckpt_info["meta"]["variant"], ckpt_info["meta"]["cnum"]
    with log.stage("tools and plan"):
        for mod in mods.values():  # after the cheap checks: importing a format's tools can take seconds
            mod.check_available()
        calib_dir, holdout_dir = options.calibration_dir, options.holdout_dir
        calib_digest, holdout_digest = photo_dir_digest(calib_dir), photo_dir_digest(holdout_dir)
        tools = tool_versions()
        code = _code_digest()

    # ----- plan every artifact and its cache key
    plan: List[_Planned] = []
    masks_per_photo = options.calibration_masks_per_photo
    for fmt in fmt_list:
        for shape in options.shapes:
            for io in options.ios:
                for precision in per_format[fmt]:
                    tol = parity.tolerance_for(precision, io, options.tolerances,
                                               getattr(mods[fmt], "PARITY_TOLERANCES", None))
                    recorded = options.recorded(calibrated=precision in getattr(mods[fmt], "CALIBRATED", ()),
                                                bias_corrected=precision in getattr(mods[fmt], "BIAS_CORRECTED", ()),
                                                weights_rounded=precision in getattr(mods[fmt], "WEIGHTS_ROUNDED", ()))
                    key_src = {
                        "format": fmt, "shape": list(shape), "precision": precision, "io": io,
                        "weights": ckpt_info["weights_sha256"], "options": recorded, "tolerance": tol,
                        "holdout": holdout_digest,
                        "calibration": [calib_digest, masks_per_photo] if precision not in ("fp32", "fp16") else "",
                        "tools": tools, "code": code,
                    }
                    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()
                    name = artifact_name(variant, cnum, fmt, shape, io, precision, mods[fmt].SUFFIX)
                    plan.append(_Planned(fmt, shape, precision, io, name, key, tol, recorded))
    if not plan:
        raise UserError("nothing to export: no requested precision is made by the requested formats")

    make_output_dir(out, "export folder")
    for stale in out.glob(PARTIAL_PREFIX + "*"):  # left by an interrupted run
        _remove(stale)

    with log.stage("cache check"):
        reused = _up_to_date(plan, out, options, previous)
    todo = [p for p in plan if p.key not in reused]
    if todo and gen is None:  # something must be made: now the generator (and the shapes' check against it)
        with log.stage("checkpoint load"):
            gen, ckpt_info = _resolve_checkpoint(checkpoint)
            _check_shapes(gen, options.shapes)

    show = _Progress(options.progress, len(todo))
    show(f"export: {len(plan)} artifact(s), {len(reused)} up to date, {len(todo)} to make "
         f"({variant} cnum {cnum}, {', '.join(f'{r}x{c}' for r, c in options.shapes)})")
    for p in plan:
        if p.key in reused:
            show(f"{p.file}: up to date (cache)")

    failures: Dict[str, str] = {}
    made: Dict[str, Artifact] = {}
    work_root = out / WORK_DIR_NAME
    temps: List[Path] = []
    try:
        if todo:  # each backend's converter (TFLite: one TensorFlow worker) serves the whole run, then closes
            with backends.session([mods[fmt] for fmt in dict.fromkeys(p.fmt for p in todo)], stages=log):
                made, failures = _make(todo, gen=gen, ckpt_info=ckpt_info, mods=mods, out=out, options=options,
                                       temps=temps, show=show, measure=measure, log=log, earlier=earlier)
    finally:
        # anything of this run not renamed to its final name is removed, whatever happened
        for t in list(temps) + list(out.glob(f"{PARTIAL_PREFIX}{os.getpid()}-*")):
            if t.exists() or t.is_symlink():
                _remove(t)
        show.close()
    return _finish(plan, reused, made, failures, out=out, options=options, ckpt_info=ckpt_info, tools=tools,
                   fmt_list=fmt_list, calib=(calib_dir, calib_digest), holdout=(holdout_dir, holdout_digest),
                   t_start=t_start, show=show, log=log)


def _previous_manifest(out: Path, options: ExportOptions) -> Optional[Manifest]:
    """The manifest a previous run left in ``out``, when the cache is on and it is readable."""
    if not options.use_cache or not (out / MANIFEST_NAME).is_file():
        return None
    try:
        return load_manifest(out)
    except UserError:
        return None


def _earlier_manifest(options: ExportOptions, previous: Optional[Manifest], checkpoint=None):
    """Where the fallback's seeds from an earlier export come from (``options.fallback_seeds``): ``auto``, the
    previous run's manifest in the export folder where a file of it went to the fallback (none where the cache is off
    or it is unreadable), else the seed file beside the checkpoint (:func:`export.fallback_seeds.seed_file_beside`; the shipped default model has one)
    where there is one; none (``none``); or the export folder, manifest or seed file named. One that cannot be read
    is an error, the seed file beside the checkpoint too (it would otherwise be passed over in silence)."""
    from .fallback_seeds import fallback_record, is_seed_file, read_seed_file, seed_file_beside
    from .options import SEEDS_AUTO, SEEDS_NONE

    if options.fallback_seeds == SEEDS_NONE:
        return None
    try:
        if options.fallback_seeds == SEEDS_AUTO:
            if previous is not None and any(fallback_record(a) for a in previous.artifacts):
                return previous
            beside = seed_file_beside(checkpoint)
            return read_seed_file(beside) if beside is not None and beside.is_file() else None
        if is_seed_file(options.fallback_seeds):
            return read_seed_file(options.fallback_seeds)
        return load_manifest(options.fallback_seeds)
    except UserError as exc:
        raise UserError(f"--quant-fallback-seeds: {exc}") from None


def _known_checkpoint(checkpoint, previous: Optional[Manifest]) -> Optional[Dict[str, object]]:
    """The previous manifest's checkpoint entry (weights digest, meta, parameters) when ``checkpoint`` is a file
    with the same sha256 as the one it was made from; None otherwise (a generator object, a TF checkpoint's
    files, another file: the checkpoint is loaded). Reads the file once, imports no torch."""
    if previous is None or not isinstance(checkpoint, (str, os.PathLike, type(None))):
        return None
    from models import default_checkpoint  # the package imports no torch; its generator modules do

    from .fallback_seeds import is_checkpoint_file

    old = dict(previous.checkpoint or {})
    path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    if (not is_checkpoint_file(path)
            or not all(old.get(k) for k in ("sha256", "weights_sha256", "meta", "parameters"))):
        return None
    if artifact_digest(path)[0] != old["sha256"]:  # a plain file's sha256 (models.checkpoint.sha256_path)
        return None
    return {**old, "path": str(path)}


def _check_shapes(gen, shapes) -> None:
    from models.gmcnn import check_shape

    for rows, cols in shapes:
        try:
            check_shape(gen.meta.variant, rows, cols)
        except ValueError as exc:
            raise UserError(str(exc)) from None


def _up_to_date(plan: List["_Planned"], out: Path, options: ExportOptions,
                previous: Optional[Manifest]) -> Dict[str, Artifact]:
    """The planned artifacts the previous manifest in ``out`` describes and whose files are unchanged."""
    reused: Dict[str, Artifact] = {}
    if previous is not None:
        old = {a.cache_key: a for a in previous.artifacts if a.cache_key}
        for p in plan:
            a = old.get(p.key)
            if (a is not None and a.file == p.file and (out / a.file).exists() and options.reuses(a.build, a.precision)
                    and artifact_digest(out / a.file)[0] == a.sha256):
                reused[p.key] = a
    return reused


def _finish(plan, reused, made, failures, *, out: Path, options: ExportOptions, ckpt_info, tools, fmt_list, calib,
            holdout, t_start: float, show, log) -> Manifest:
    """Write the manifest and the stage report, clear the work folder, raise ExportFailed for failures."""
    from .stages import table, write_report

    (calib_dir, calib_digest), (holdout_dir, holdout_digest) = calib, holdout
    masks_per_photo = options.calibration_masks_per_photo
    precisions = options.precisions
    work_root = out / WORK_DIR_NAME
    artifacts = [reused.get(p.key) or made.get(p.key) for p in plan]
    artifacts = [a for a in artifacts if a is not None]
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        checkpoint=ckpt_info,
        tools=tools,
        artifacts=artifacts,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        export={
            "shapes": [list(s) for s in options.shapes], "formats": fmt_list,
            "precisions": list(precisions) if precisions else "all", "ios": list(options.ios),
            **options.recorded(calibrated=True),
            "calibration": {"folder": str(calib_dir), "sha256": calib_digest, "masks_per_photo": masks_per_photo},
            "holdout": {"folder": str(holdout_dir), "sha256": holdout_digest, "masks_per_photo": HOLDOUT_MASKS_PER_PHOTO},
            "threads": options.threads, "seconds": round(time.time() - t_start, 2),
            "reused": len(reused), "made": len(made), "failed": sorted(failures),
        },
    )
    write_manifest(manifest, out)
    if not failures and not options.keep_work and work_root.exists():
        shutil.rmtree(work_root, ignore_errors=True)
    report = log.finish({"made": len(made), "reused": len(reused), "failed": len(failures)})
    write_report(report, out, PARTIAL_PREFIX, reused_only=not made and not failures)
    if options.progress:
        print(table(report), file=sys.stderr, flush=True)
    show(f"export: done in {time.time() - t_start:.1f}s ({len(made)} made, {len(reused)} reused, "
         f"{len(failures)} failed) -> {out / MANIFEST_NAME}")
    if failures:
        raise ExportFailed(failures)
    return manifest


def write_manifest(manifest: Manifest, out: Path) -> Path:
    """Write ``out/manifest.json`` atomically (temp name in the same folder, then rename)."""
    target = out / MANIFEST_NAME
    tmp = out / f"{PARTIAL_PREFIX}{os.getpid()}-{MANIFEST_NAME}"
    tmp.write_text(manifest.to_json() + "\n")
    os.replace(tmp, target)
    return target


def _make(todo, *, gen, ckpt_info, mods, out: Path, options: ExportOptions, temps: List[Path], show,
          measure: Optional[Callable] = None, log=None, earlier=None):
    """Convert, gate and move into place every planned artifact; returns (made, failures).

    ``earlier``: the manifest of an earlier export (or a seed file, :class:`export.fallback_seeds.SeedSource`) whose
    fallback files seed this run's (:func:`export.fallback.seeds_from_manifest`).

    ``log`` (:class:`export.stages.StageLog`) times every stage; its budget decides whether the TFLite
    worker converts while this process converts and gates the other formats (:func:`export.stages.side_by_side`)."""
    from models.gmcnn import conv_layers, count_macs
    from runtime_py.machine import timing_machine
    from runtime_py.memory import anon_rss_bytes, give_back, reuse_freed_memory

    from . import fallback
    from .activations import input_means, means_cache
    from .fallback import SensitivityCache
    from .fallback_seeds import SeedSource
    from .stages import StageLog, activation_values, side_by_side

    log = log if log is not None else StageLog()

    made: Dict[str, Artifact] = {}
    failures: Dict[str, str] = {}
    calib: Dict[Tuple[int, int], Samples] = {}
    hold: Dict[Tuple[int, int], Samples] = {}
    refs: Dict[Tuple[Tuple[int, int], bool], tuple] = {}  # (shape, nudged) -> (samples, reference, peak)
    gmacs: Dict[Tuple[int, int], float] = {}
    calib_dir, holdout_dir, threads = options.calibration_dir, options.holdout_dir, options.threads
    work_root = out / WORK_DIR_NAME
    # scratch files are shared only within this run (the fallback's candidates start from the pure file's
    # ONNX, calibrated model and converter output): a kept or failed run's may come from another checkpoint,
    # other photos or options, and the backends would take them for this run's (model.onnx is made only if absent)
    _remove(work_root)
    for p in todo:
        if p.shape not in calib:
            show(f"samples {p.shape[0]}x{p.shape[1]}: calibration from {calib_dir}, holdout from {holdout_dir}")
            with log.stage(f"samples {p.shape[0]}x{p.shape[1]}"):
                calib[p.shape] = load_samples(calib_dir, p.shape, options.calibration_masks_per_photo, seed=1)
                hold[p.shape] = load_samples(holdout_dir, p.shape, HOLDOUT_MASKS_PER_PHOTO, seed=2)
    sensitivity = SensitivityCache(gen, hold, show, bias_means=lambda shape: input_means(
        gen, calib[shape], means_cache(work_root, shape)))
    ranges_by_shape: Dict[Tuple[int, int], Tuple[dict, str]] = {}  # shape -> (ranges, where measured)

    def workdir_of(fmt: str, shape: Tuple[int, int], io: str) -> Path:
        """The work folder of a format, shape and I/O signature: its ONNX, saved_model and converter outputs."""
        return work_root / f"{fmt}_{shape[0]}x{shape[1]}_{io}"

    def group_plan(shape, ranked: Sequence[str]) -> Tuple[Dict[str, List[List[int]]], str]:
        """The input channel groups (export.input_groups) of the first ``options.input_group_layers`` of ``ranked``
        at ``shape``, on the calibration samples' per-channel ranges, and where those were measured: by this run's
        int8 calibration pass where it ran at ``shape`` (issue 17: work done once), else a PyTorch forward per
        calibration sample (once per shape)."""
        from .input_groups import RANGES_FROM_PYTORCH, channel_ranges, plan_groups
        from .tflite import MEASURED_BY_CALIBRATION, calibration_input_ranges

        if shape not in ranges_by_shape:
            for io in dict.fromkeys(q.io for q in todo):
                ranges = calibration_input_ranges(gen, workdir_of("tflite", shape, io))
                if ranges is not None:
                    ranges_by_shape[shape] = ranges, MEASURED_BY_CALIBRATION
                    break
            else:
                show(f"fallback {shape[0]}x{shape[1]}: input channel ranges on {len(calib[shape])} calibration samples")
                with log.stage(f"input channel ranges {shape[0]}x{shape[1]}", give_back=True):
                    ranges_by_shape[shape] = (channel_ranges(gen, calib[shape].images, calib[shape].masks),
                                              RANGES_FROM_PYTORCH)
        ranges, source = ranges_by_shape[shape]
        return plan_groups(gen, ranges, options.input_groups, layers=options.input_group_layers, order=ranked), source

    def job_for(p: _Planned, mod, extra: Optional[dict] = None, suffix: str = "") -> backends.ConvertJob:
        tmp = out / f"{PARTIAL_PREFIX}{os.getpid()}-{suffix}{p.file}"
        temps.append(tmp)
        workdir = workdir_of(p.fmt, p.shape, p.io)
        if (extra or {}).get("input_groups"):  # another graph: its own ONNX and saved_model
            workdir = workdir.with_name(workdir.name + "_groups")
        meta = {
            "generator": "GMCNN", "variant": gen.meta.variant, "cnum": gen.meta.cnum, "shape": list(p.shape),
            "io": p.io, "precision": p.precision, "layout": "NHWC",
            "normalization": "x/127.5-1" if p.io == "tensor" else "uint8 pixels",
            "mask_polarity": "1=hole" if p.io == "tensor" else "255=hole",
            "checkpoint_sha256": ckpt_info.get("sha256") or ckpt_info["weights_sha256"],
        }
        return backends.ConvertJob(key=p.key + suffix, generator=gen, shape=p.shape, precision=p.precision, io=p.io,
                                   calibration=calib[p.shape], workdir=workdir, out=tmp, options=options,
                                   metadata=meta, extra=dict(extra or {}))

    def holdout(shape, nudged_copies: bool = False):
        """(the holdout samples at ``shape``, or their nudged copies (:func:`export.samples.nudged`), their PyTorch
        reference, its peak activation): made once per shape, the copies when the first file that needs them passes
        its samples."""
        key = (shape, nudged_copies)
        if key not in refs:
            samples = nudged(hold[shape]) if nudged_copies else hold[shape]
            what = " nudged" if nudged_copies else ""
            show(f"parity {shape[0]}x{shape[1]}: PyTorch fp32 reference on {len(samples)}{what} holdout samples")
            t0 = time.time()
            # the forwards inside reuse_freed_memory: about 12 % faster at 1024x1360 for 0.8 GiB, the same bytes
            # (docs/EXPORT.md, "Page faults")
            with log.stage(f"reference {shape[0]}x{shape[1]}{what}", give_back=True), reuse_freed_memory():
                refs[key] = (samples, *parity.reference_outputs_and_peak(gen, samples))
            show(f"parity {shape[0]}x{shape[1]}: reference ready ({time.time() - t0:.1f}s)")
        return refs[key]

    def gate(p: _Planned, mod, path: Path, first: Sequence[int] = (), pairs: bool = False,
             until_failure: bool = False, every_sample: bool = False) -> ParityResult:
        """The parity gate of one file on every held-out sample; with ``first`` (sample indices: a fallback
        candidate, the samples its pure file failed, worst first), those one at a time first, stopping at
        the first that fails (the result then covers the samples run: ``details.samples_gated``);
        ``until_failure``: every sample so, in order (a pure file whose fallback will gate a seed first);
        ``every_sample``: every sample whatever it scores, and no copies (a pure file that failed, for its search).
        A file of a runtime-quantized precision (the backend's ``RUNTIME_QUANTIZED``) that passes runs the nudged
        copies of the samples as well (``holdout``) and passes only if it passes on them too: its result then covers
        both (``details.nudged``; per-sample PSNRs the samples', then their copies'). Once a file at this shape has
        made the copies' reference, a file's samples and copies run in one engine (:func:`gate_in_one_engine`) and
        the copies stop at the first that fails (``details.nudged.sample_indices``: the samples whose copies ran);
        with ``pairs`` each copy runs right after its sample (a pruning candidate). Where a gate stopped:
        ``details.stopped_at``."""
        samples, reference, peak = holdout(p.shape)
        t0 = time.time()
        if until_failure:
            first = range(len(samples))
        rest = [i for i in range(len(samples)) if i not in first]
        # samples one file runs at once: 1 where XNNPACK's threads share each inference; for a file on LiteRT's
        # single-threaded reference kernels (int16x8, minutes per inference) one per thread, in processes, and
        # then its samples go in chunks of that many, so that a candidate's first failing samples are run side by
        # side and a long gate says how far it is after each chunk
        width = mod.gate_processes(path, threads, len(samples)) if hasattr(mod, "gate_processes") else 1
        name = Path(path).name.replace(f"{PARTIAL_PREFIX}{os.getpid()}-", "")
        if width == 1:
            return gate_in_one_engine(p, mod, path, list(first) + rest, set(first), name, t0, pairs, every_sample)
        runs = [list(first[i:i + width]) for i in range(0, len(first), width)]
        runs += [rest[i:i + width] for i in range(0, len(rest), width)]
        outputs, ran = {}, []
        with log.stage(f"gate {name}", give_back=True):
            for n, indices in enumerate(runs):
                chunk = samples if len(runs) == 1 else samples.subset(indices)
                out, executor = mod.run(path, p.io, chunk, threads)
                if out is None:
                    return ParityResult(executor="structural-only", samples=0, tolerance=p.tolerance, passed=True,
                                        note=executor)
                outputs.update(zip(indices, out))
                ran += indices
                if n < len(runs) - 1:
                    m = parity.compare(reference[indices], out, chunk, p.io, peak_activation=peak)
                    show(f"{name}: {len(ran)} of {len(samples)} samples gated, hole PSNR "
                         f"{m['hole_psnr_db']:.2f} dB on the last {len(indices)} ({time.time() - t0:.0f}s)")
                    if indices[0] in first and not parity.judge(m, p.tolerance)[0]:
                        break
        return judged(p, mod, path, name, outputs, None, executor, t0)

    def gate_in_one_engine(p: _Planned, mod, path: Path, order: List[int], first: set, name: str, t0: float,
                           pairs: bool = False, every_sample: bool = False):
        """:func:`gate` of a file whose samples run one at a time in one engine (``mod.run``'s ``keep_going``): the
        samples in ``order``, each of ``first`` checked alone as it comes (the first that fails ends the gate); then,
        for a runtime-quantized file that passed them all and once the copies' reference exists, the nudged copies
        in the same order, each checked alone (the first that fails ends it). With ``pairs`` the copies are not
        kept for the end: each runs right after its sample, so that a candidate failing on the copy of the first
        sample stops after two inferences, not after every sample and that copy. Pass or fail is the same either
        way; only where a failing gate stops (``details.stopped_at``), and so what it measured, differs. A new
        engine's first inference costs more than the others (XNNPACK's packing and the arena's first touch), which a
        candidate's samples, one engine each, paid per sample: 8 inferences of a 1024x1360 int8-dynamic file took
        45.4 s in one engine against 48.9-50.2 s in five (one-off script, 2 threads, nothing else running)."""
        samples, reference, peak = holdout(p.shape)
        n = len(samples)
        copies_made = (tuple(p.shape), True) in refs
        with_copies = p.precision in getattr(mod, "RUNTIME_QUANTIZED", ()) and copies_made and not every_sample
        feed = samples.subset(order)
        runs = [(i, False) for i in order]  # what the engine runs, in order: (sample index, nudged copy)
        if with_copies:
            copies, ref_n, peak_n = holdout(p.shape, nudged_copies=True)
            feed = concatenated(feed, copies.subset(order))
            runs += [(i, True) for i in order]
            if pairs:
                paired = [k for j in range(n) for k in (j, n + j)]
                feed, runs = feed.subset(paired), [runs[k] for k in paired]
        outputs: Dict[int, np.ndarray] = {}
        copy_outputs: Dict[int, np.ndarray] = {}
        stopped: Dict[str, object] = {}
        limit_db = p.tolerance.get("min_hole_psnr_db")

        def holds(ref, y, one) -> bool:
            """The sample's hole PSNR at the limit or over (parity.hole_psnrs: cheap, the gate's own value)."""
            return limit_db is None or parity.hole_psnrs(ref, y, one, p.io)[0] >= limit_db

        # each sample, and each copy, is checked by its hole PSNR alone as it comes: under the limit fails the gate
        # whatever the rest; the gate's full judgement (every criterion, on everything run) follows the run
        def keep_going(j: int, y: np.ndarray) -> bool:
            i, copy = runs[j]
            if copy:
                copy_outputs[i] = y[0]
                ok = holds(ref_n[[i]], y, copies.subset([i]))
            else:
                outputs[i] = y[0]
                # a candidate's samples stop at the first that fails; a file that will run copies stops too, as the
                # copies would then not count
                ok = (i not in first and not with_copies) or holds(reference[[i]], y, samples.subset([i]))
            if not ok:
                stopped.update(sample=i, nudged=copy)
            return ok

        with log.stage(f"gate {name}", give_back=True):
            out, executor = mod.run(path, p.io, feed, threads, keep_going=keep_going)
        if out is None:
            return ParityResult(executor="structural-only", samples=0, tolerance=p.tolerance, passed=True, note=executor)
        return judged(p, mod, path, name, outputs, copy_outputs if with_copies else None, executor, t0, stopped)

    def judged(p: _Planned, mod, path: Path, name: str, outputs: Dict[int, np.ndarray],
               copy_outputs: Optional[Dict[int, np.ndarray]], executor: str, t0: float,
               stopped: Optional[Dict[str, object]] = None) -> ParityResult:
        """The gate's result from the outputs it ran (sample index -> (H, W, 3)): on the samples; for a
        runtime-quantized file, with its nudged copies' (``copy_outputs``) where any ran (with the samples, or
        after them all), or, for one that passed its samples and whose copies have not run yet (None), all of
        them run here in an engine of their own. ``stopped``: where the run stopped at a failing sample or copy
        (``details.stopped_at``)."""
        samples, reference, peak = holdout(p.shape)
        ran = sorted(outputs)
        partial = len(ran) < len(samples)
        gated = samples.subset(ran) if partial else samples
        ran_outputs = np.stack([outputs[i] for i in ran])
        m = parity.compare(reference[ran], ran_outputs, gated, p.io, peak_activation=peak)
        ok, why = parity.judge(m, p.tolerance)
        samples_run = len(ran)
        runtime_quantized = p.precision in getattr(mod, "RUNTIME_QUANTIZED", ())
        if runtime_quantized and (copy_outputs or (ok and not partial)):
            # passing as computed here is not enough for a file that rounds on its tensors' own extremes: every
            # sample again with 1 % of its pixel values one level off, as another platform's decoder may leave it
            copies, ref_n, peak_n = holdout(p.shape, nudged_copies=True)
            if copy_outputs is None:
                with log.stage(f"gate {name} nudged", give_back=True):
                    out_n, executor = mod.run(path, p.io, copies, threads)
                copy_outputs = dict(zip(range(len(copies)), out_n))
            copied = sorted(copy_outputs)
            some = len(copied) < len(copies)
            both = concatenated(gated, copies if not some else copies.subset(copied))
            m = parity.compare(np.concatenate([reference[ran], ref_n[copied]]),
                               np.concatenate([ran_outputs, np.stack([copy_outputs[i] for i in copied])]), both, p.io,
                               peak_activation=max(peak, peak_n))
            m["details"]["nudged"] = {"samples": len(copied), "fraction": NUDGED_FRACTION,
                                      **({"of": len(copies), "sample_indices": copied} if some else {})}
            samples_run = len(both)
            on_samples = ok
            ok, why = parity.judge(m, p.tolerance)
            if on_samples and not ok:
                why += f" on a copy of a sample with {NUDGED_FRACTION:.0%} of its pixel values one level off"
        if partial:
            m["details"]["samples_gated"] = ran
        if stopped:
            m["details"]["stopped_at"] = dict(stopped)
        what = (f"the copy of sample {stopped['sample']}" if stopped and stopped.get("nudged") else
                f"a failing one of {len(samples)}" if stopped or partial else "")
        show(f"{Path(path).name}: gated on {samples_run} samples{f' (stopped at {what})' if what else ''} "
             f"({time.time() - t0:.1f}s)")
        return ParityResult(executor=executor, samples=samples_run, max_abs=m["max_abs"],
                            mean_abs=m["mean_abs"], hole_psnr_db=m["hole_psnr_db"],
                            composite_psnr_db=m["composite_psnr_db"], tolerance=p.tolerance, passed=ok,
                            note=why, details=m["details"])

    to_describe: List[_Accepted] = []

    def accept(p: _Planned, mod, res, result: ParityResult, quantization: Optional[dict] = None) -> None:
        """``p``'s file passed its gate: it waits under a name of its own for :func:`describe_accepted`, which
        measures its inventory, moves it into place and records it."""
        held = out / f"{PARTIAL_PREFIX}{os.getpid()}-{ACCEPTED_PREFIX}{p.file}"  # each planned file is accepted once
        os.replace(res.path, held)
        to_describe.append(_Accepted(p, mod, res, result, quantization, held))

    def describe_accepted() -> None:
        """The inventory of every file accepted so far, the largest shape first, one after another inside
        ``reuse_freed_memory``: a TFLite file's gate recorded what LiteRT ran outside XNNPACK
        (:func:`export.tflite.xnnpack_fallback_ops`); one it did not (a file gated in processes) the inventory loads
        into LiteRT's interpreter, whose XNNPACK builds
        every convolution's indirection buffer (4.1-4.6 GB at 1024x1360), and a load after the first can take the
        pages the one before freed instead of faulting in fresh ones (0.5-0.8 s against 2.5-3.7 s alone and 12-18 s
        between the gates of an export; docs/EXPORT.md, "Page faults"). But a load does not always fit in what the
        block holds, and then comes on top of it (7.3 GiB anonymous at 1024x1360 in an export): so where what this
        process holds and a load as large as the largest so far would together go over the memory budget, the
        block gives back what it holds first. Then each file goes into place."""
        pending = sorted(to_describe, key=lambda a: -a.planned.shape[0] * a.planned.shape[1])
        to_describe.clear()
        largest = 0  # the most one load has added to this process's anonymous memory so far
        with reuse_freed_memory():
            described = []
            for a in pending:
                p = a.planned
                if described and log.would_exceed(largest):
                    give_back()
                before, name = anon_rss_bytes(), f"describe {p.file}"
                with log.stage(name):
                    described.append((a.backend.describe(a.held, p.io, p.shape),
                                      a.backend.inventory(a.held, threads, a.conversion.details)))
                largest = max(largest, log.last_peak_anon(name) - before)
        for a, ((inputs, outputs_info), inv) in zip(pending, described):
            place(a, inputs, outputs_info, inv)

    def place(accepted: _Accepted, inputs, outputs_info, inv) -> None:
        """Move a described file into place and record it in ``made``."""
        p, mod, res, result, quantization, held = (accepted.planned, accepted.backend, accepted.conversion,
                                                   accepted.parity, accepted.quantization, accepted.held)
        if p.shape not in gmacs:
            gmacs[p.shape] = round(count_macs(gen, *p.shape) / 1e9, 4)
        final = out / p.file
        sha, size = artifact_digest(held)
        if final.exists() or final.is_symlink():
            _remove(final)
        os.replace(held, final)
        # a file the fallback made records the fallback setting it was made under (a pure file is the same either way)
        build = {**p.recorded, **(options.fallback_recorded(p.precision) if quantization and "fallback" in quantization else {}),
                 "convert_seconds": round(res.seconds, 2),
                 "calibration_samples": len(calib[p.shape]) if p.precision not in ("fp32", "fp16") else 0,
                 "gmacs": gmacs[p.shape]}
        quantization = dict(quantization or {})
        if hasattr(mod, "quantization_summary"):
            quantization = {**mod.quantization_summary(final, p.precision, res.details), **quantization}
        if quantization:
            build["quantization"] = quantization
        made[p.key] = Artifact(
            file=p.file, format=p.fmt, shape=list(p.shape), precision=p.precision, io=p.io, sha256=sha, bytes=size,
            inputs=inputs, outputs=outputs_info, op_inventory=inv, parity=result, cache_key=p.key, build=build)
        hole = f"{result.hole_psnr_db:.1f} dB" if result.hole_psnr_db is not None else "n/a"
        show(f"{p.file}: ok (max abs {result.max_abs if result.max_abs is not None else float('nan'):.2g}, "
             f"hole PSNR {hole}, {size / 1e6:.2f} MB)")

    def jobs_of(fmt: str):
        return [job_for(p, mods[fmt]) for p in todo if p.fmt == fmt]

    # (format, shape, precision) -> the layers the first file of that kind kept float (export.fallback.Seed)
    seeds: Dict[tuple, object] = {}
    cut_short: set = set()  # pure files gated until their first failing sample, as a seed was to come
    # the same from an earlier export's manifest, for the first file of each kind
    earlier_seeds: Dict[tuple, object] = {}
    if earlier is not None:
        earlier_seeds, left_out = fallback.seeds_from_manifest(
            earlier, [c["name"] for c in conv_layers(gen, *todo[0].shape)],
            kinds={p.kind for p in todo},
            machine=timing_machine() if measure is not None else None, threads=threads)
        for line in left_out:
            show(f"fallback seeds: left out {line}")
        if earlier_seeds:
            where = f"seed file {earlier.path.name}" if isinstance(earlier, SeedSource) else "an earlier export"
            show(f"fallback seeds: {len(earlier_seeds)} from {where} (checkpoint "
                 f"{str((earlier.checkpoint or {}).get('sha256'))[:12]}, {earlier.created})")

    def gate_all(fmt: str, jobs, results) -> None:
        """:func:`gate_each` inside the format's gate session (a backend's ``gate_session(paths)``, e.g.
        :func:`export.coreml.gate_session`), given every converted file's path."""
        session = getattr(mods[fmt], "gate_session", None)
        paths = [results[job.key].path for job in jobs if results[job.key].path is not None]
        with session(paths) if session is not None else contextlib.nullcontext():
            gate_each(fmt, jobs, results)

    def gate_each(fmt: str, jobs, results) -> None:
        mod = mods[fmt]
        by_key = {p.key: p for p in todo if p.fmt == fmt}
        pending = []
        for job in jobs:
            p = by_key[job.key]
            res = results[job.key]
            if res.path is None:
                failures[p.file] = res.error or "conversion failed"
                show(f"{p.file}: FAILED ({failures[p.file]})")
                show.step()
                continue
            # a file whose fallback will gate a seed first (an earlier export's, or the one the pending file of its
            # kind will leave) stops at its first failing sample: where the seed passes, the other samples' PSNRs of
            # a file not written are not needed (its own search, if it comes to one, gates it in full first)
            # (this run's seeds are left by fallbacks, which start once every pure file of the format is gated)
            seed_to_come = (options.quant_fallback and p.precision in getattr(mod, "FALLBACK_PRECISIONS", ())
                            and (p.kind in earlier_seeds or any(q.kind == p.kind for q, _, _ in pending)))
            # a file that will run the nudged copies stops at its first failing sample whatever comes after it
            stops_anyway = p.precision in getattr(mod, "RUNTIME_QUANTIZED", ()) and (tuple(p.shape), True) in refs
            until_failure = seed_to_come and not stops_anyway
            result = gate(p, mod, res.path, until_failure=until_failure)
            if until_failure and "samples_gated" in (result.details or {}):
                cut_short.add(p.key)
            if result.passed:
                accept(p, mod, res, result)
                show.step()
            elif options.quant_fallback and p.precision in getattr(mod, "FALLBACK_PRECISIONS", ()):
                show(f"{p.file}: misses the gate ({result.note}); trying the sensitivity-guided fallback")
                pending.append((p, res, result))
            else:
                failures[p.file] = f"parity: {result.note}"
                show(f"{p.file}: FAILED parity ({result.note})")
                _remove(res.path)
                show.step()
        first_of_kind = {}  # the sensitivities they will need (a pass can measure several): a later file of a kind
        for p, res, result in pending:  # gates the first one's layers first (a Seed) and may never rank
            first_of_kind.setdefault((p.shape, p.precision), (p, result))
        for p, result in first_of_kind.values():
            if p.precision in fallback.SENSITIVITY_ROUNDING:
                sensitivity.expect(p.shape, _sensitivity_rounding(p, mod, options),
                                   fallback.failing_samples(result, p.tolerance.get("min_hole_psnr_db", 0.0)))
        for p, res, result in pending:
            try:
                groups = (group_plan if p.fmt == "tflite" and p.precision == "int8-dynamic" and options.input_groups > 1
                          and gen.meta.variant == "tf" else None)
                _fallback(p, mod, res, result, sensitivity, job_for, gate, accept, failures, options, show, measure,
                          log, seeds, group_plan=groups, earlier_seeds=earlier_seeds,
                          pure_cut_short=p.key in cut_short)
            finally:
                _remove(res.path)
                show.step()

    formats = list(dict.fromkeys(p.fmt for p in todo))
    background = [f for f in formats if hasattr(mods[f], "start_many")]
    together = False
    if background and len(formats) > 1:
        together, why = side_by_side(log.budget_bytes, activation_values(gen, {p.shape for p in todo}))
        log.schedule[f"{', '.join(background)} conversion and {', '.join(f for f in formats if f not in background)}"] = why
        show(f"schedule: {why}")
    if together:  # the worker converts while this process converts and gates the other formats
        formats = background + [f for f in formats if f not in background]
    started = []  # (format, jobs, conversion still running in the background)
    try:
        for fmt in formats:
            jobs = jobs_of(fmt)
            if together and fmt in background:
                started.append((fmt, jobs, backends.start_all(mods[fmt], jobs, progress=show, stages=log)))
            else:
                gate_all(fmt, jobs, backends.convert_all(mods[fmt], jobs, progress=show, stages=log))
                backends.done(mods[fmt])  # its files gated, fallbacks included: its converter may go now
                describe_accepted()  # after the converter went: the inventory's loads are the largest allocations
        for fmt, jobs, conversion in started:
            gate_all(fmt, jobs, conversion.wait())
            describe_accepted()
    finally:
        for _, _, conversion in started:
            conversion.cancel()  # stops a worker still converting (an interrupted export); at once otherwise
    return made, failures


def _sensitivity_rounding(p, mod, options) -> tuple:
    """What the fallback's sensitivity and simulations round for the file ``p``: its precision's rounding, with the
    biases corrected where the file's are (the simulation's then are too)."""
    from . import fallback

    return fallback.sensitivity_rounding(
        p.precision, options.bias_correction and p.precision in getattr(mod, "BIAS_CORRECTED", ()))


def _fallback(p, mod, pure, pure_result, sensitivity, job_for, gate, accept, failures, options, show,
              measure=None, log=None, seeds: Optional[Dict[tuple, object]] = None,
              group_plan: Optional[Callable] = None, earlier_seeds: Optional[Dict[tuple, object]] = None,
              pure_cut_short: bool = False) -> None:
    """Keep the fewest most sensitive layers of a failing quantized file in float (export.fallback).

    ``seeds``: (format, shape, precision) -> :class:`export.fallback.Seed`, shared by the run's files: the first
    file of a kind to pass through the fallback leaves its layers there, and the next (the other I/O signature
    of the same network) gates them first, before any sensitivity or search of its own. ``earlier_seeds``: the same
    from an earlier export (:func:`export.fallback.seeds_from_manifest`), for a file no file of this run has seeded.
    ``group_plan(shape, ranked layer names)``: the input channel groups (export.input_groups) of a file whose
    first candidate keeps every convolution quantized, the most sensitive ones' inputs split into groups, and where
    the ranges they were chosen on were measured. ``pure_cut_short``: ``pure_result`` stopped at the pure file's first
    failing sample because a seed was to come; if none passes, the pure file is gated on every sample first."""
    import contextlib

    from models.gmcnn import conv_branches, conv_layers

    from . import fallback, tflite
    from .activations import direct_consumers

    def stage(name):
        return log.stage(f"fallback {name} {p.file}") if log is not None else contextlib.nullcontext()

    limit_db = p.tolerance.get("min_hole_psnr_db", 0.0)
    samples = fallback.failing_samples(pure_result, limit_db)
    # what the file leaves float as converted is neither ranked, nor simulated rounded, nor a candidate's layer: at
    # 512x680 on default model v2 the int8-dynamic file's second candidate added only mergeconv18 (432 values, under
    # the dynamic-range quantizer's 1,024) and scored what the first did
    unrounded = getattr(mod, "unrounded_convs", lambda generator, precision: set())(sensitivity.generator,
                                                                                      p.precision)
    rounding = _sensitivity_rounding(p, mod, options)
    seed_key = p.kind
    seed = (seeds or {}).get(seed_key) or (earlier_seeds or {}).get(seed_key)
    # by (layers kept float, with their inputs): the second phase's first candidates are often the first's
    built: Dict[tuple, fallback.Candidate] = {}
    branch_record: Dict[str, object] = {}
    branch_phase = None

    def build_for(phase, tag: str = ""):
        # a phase-6 candidate is the input-grouped file with those layers float: another file than phase 1's
        grouped_file = phase.number == fallback.GROUPED_FLOAT_PHASE

        def build(ks):
            names = {k: phase.kept(k) for k in ks}
            key = {k: (tuple(names[k]), phase.inputs_float, grouped_file) for k in ks}
            todo = [k for k in ks if key[k] not in built]
            extra = {k: {"keep_float": names[k], **({"keep_float_inputs": True} if phase.inputs_float else {}),
                         **({"input_groups": group_state["plan"]} if grouped_file else {})}
                     for k in todo}
            jobs = {k: job_for(p, mod, extra[k], suffix=f"p{phase.number}{tag}k{k}-") for k in todo}
            if todo:
                what = "branch(es)" if phase.branches is not None else "layer(s)"
                show(f"{p.file}: converting {len(todo)} candidate(s) keeping {', '.join(str(k) for k in todo)} "
                     f"{what} float" + (" with the convolutions producing their inputs" if phase.inputs_float else "")
                     + (", the others' inputs in channel groups" if grouped_file else ""))
                results = backends.convert_all(mod, list(jobs.values()), progress=show, stages=log)
            for k, job in jobs.items():
                res = results[job.key]
                built[key[k]] = fallback.Candidate(
                    k, res.path, dict(res.details), conversion=res, layers=names[k], inputs_float=phase.inputs_float,
                    phase=phase.number)
            return {k: built[key[k]] for k in ks}
        return build

    def producers(layers) -> set:
        """The convolutions whose output a convolution of ``layers`` reads with no convolution between: what a
        candidate keeping its layers float "with their inputs" keeps float too."""
        readers = direct_consumers(sensitivity.downstream())
        return {c for c, r in readers.items() if r & set(layers)}

    def check(c, first: Sequence[int] = (), pairs: bool = False):
        if c.result is None:  # else gated in an earlier phase
            c.result = gate(p, mod, c.path, first=first or samples, pairs=pairs)
            what = (f"{c.k} branch(es) ({len(c.layers)} layers) float" if c.phase == fallback.BRANCH_PHASE
                    else f"every convolution int8, {c.k} split into input channel groups"
                    if c.phase == fallback.GROUPS_PHASE else f"{c.k} layer(s) float, the others' inputs in channel "
                    "groups" if c.phase == fallback.GROUPED_FLOAT_PHASE else f"{c.k} layer(s) float")
            show(f"{p.file}: {what}{' with their inputs' if c.inputs_float else ''}: hole PSNR "
                 f"{c.result.hole_psnr_db:.2f} dB on {c.result.samples} sample(s) "
                 f"({'passes' if c.result.passed else 'fails'})")
        return c.result.passed

    def then(rest):
        """The phases after the first: the second and the branch phase, in the order the simulation says."""
        nonlocal branch_phase
        branches = {b: [n for n in layers if n not in unrounded]
                    for b, layers in conv_branches(sensitivity.generator).items()}
        branches = {b: layers for b, layers in branches.items() if layers}
        configs = {f"branch {b}": layers for b, layers in branches.items()}
        second = next((ph for ph in rest if ph.number == 2), None)
        if second is not None:
            kept = set(second.kept(second.size))
            if second.inputs_float:
                kept |= producers(kept)
            configs["phase 2"] = [n for n, _ in ranking if n not in kept]
        # on the worst failing sample alone, as for phase 1: the simulation only orders what the files' own gates
        # then decide (at 1024x1360 on default model v2, 4 samples took 470 s of the int8-dynamic file's search)
        with stage("branch simulation"):
            sim = sensitivity.simulated(p.shape, rounding, samples[:1], configs)
        scores = {b: sim[f"branch {b}"] for b in branches}
        predicted = sim.get("phase 2")
        if second is not None:
            predictions[(tuple(second.kept(second.size)), second.inputs_float)] = predicted
        branch_phase = fallback.branch_phase(scores, branches, options.fallback_branch_limit)
        order = fallback.after_first(rest, branch_phase, predicted, limit_db)
        show(f"{p.file}: hole PSNR with only one branch rounded: "
             + ", ".join(f"{b} {db:.1f} dB" for b, db in sorted(scores.items(), key=lambda kv: kv[1]))
             + (f"; the second phase's largest candidate predicted at {predicted:.1f} dB" if predicted is not None
                else "") + f"; trying phase(s) {', '.join(str(ph.number) for ph in order)}")
        branch_record.update({
            "ranking": [{"branch": b, "hole_psnr_db": round(db, 2), "layers": len(branches[b])}
                        for b, db in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]))],
            "limit": options.fallback_branch_limit,
            "phase_2_predicted_hole_psnr_db": round(predicted, 2) if predicted is not None else None})
        return order

    def first_or_last(first):
        """Phase 1 first, or last where the simulation puts its largest candidate far under the gate. On the
        worst failing sample alone: more samples could only lower the prediction, and this one runs for every
        file the fallback serves, those that pass in phase 1 included."""
        if not first:
            return first, []
        kept = first[0].kept(first[0].size)
        floats = set(kept)
        with stage("phase 1 simulation"):
            sim = sensitivity.simulated(p.shape, rounding, samples[:1],
                                        {"phase 1": [n for n, _ in ranking if n not in floats]})
        predictions[(tuple(kept), first[0].inputs_float)] = sim["phase 1"]
        deferred = fallback.defer_first(sim["phase 1"], limit_db)
        show(f"{p.file}: the first phase's largest candidate ({first[0].size} layer(s) float) predicted at "
             f"{sim['phase 1']:.1f} dB" + (f", over {fallback.DEFER_MARGIN_DB:g} dB under the gate: trying it "
                                           "after the others" if deferred else ""))
        first_record.update(phase_1_predicted_hole_psnr_db=round(sim["phase 1"], 2), phase_1_deferred=deferred)
        return ([], first) if deferred else (first, [])

    def alone_first(phase):
        """Each branch kept float alone, in the phase's order, until one passes: (that candidate, phase); else
        (None, the phase re-ranked by what the files measured)."""
        measured = {}
        for single in fallback.singles(phase):
            (candidate,) = build_for(single)([1]).values()
            passed = check(candidate)
            if not any(candidate is g for g in gated):
                gated.append(candidate)
            name = single.branches[0][0]
            measured[name] = candidate.result.hole_psnr_db
            branch_record.setdefault("alone_float", []).append(
                {"branch": name, "hole_psnr_db": candidate.result.hole_psnr_db,
                 "samples": candidate.result.samples, "passed": passed})
            if passed:
                return candidate, phase
        again = fallback.reranked(phase, measured)
        show(f"{p.file}: no branch passes kept float alone; keeping whole branches float in the order their files "
             "measured: " + ", ".join(f"{b} {measured[b]:.1f} dB" for b, _, _ in again.branches))
        return None, again

    def pruned(start):
        """The passing candidate ``start`` with as many of its float convolutions quantized again as still pass
        (:func:`export.fallback.prune`; with their producers, where it kept them float too, as layers of their
        own); ``start`` itself when none can go."""
        layers = list(start.layers)
        if start.inputs_float:
            layers += sorted(producers(layers) - set(layers))
        if len(layers) < 2:
            return start
        snr = dict(ranking)
        order = fallback.prune_order(layers, macs, snr)
        # every held-out sample, the ones the passing candidate came closest to failing on first; then the one the
        # last failing candidate failed on (itself or its nudged copy) goes first (at 512x680 on default model v2
        # the int8-dynamic `image` file's failing candidates all failed on the last of the passing candidate's order)
        first = fallback.failing_samples(start.result, float("inf"))
        passing: Dict[tuple, fallback.Candidate] = {}

        def passes(left):
            nonlocal first
            phase = fallback.Phase(fallback.PRUNE_PHASE, [(n, snr.get(n, float("nan"))) for n in left], False)
            (candidate,) = build_for(phase, tag=f"c{len(gated)}")([phase.size]).values()
            fresh = candidate.result is None
            # only pass or fail decides the pruning, and where a candidate fails orders the next one's samples: each
            # copy can then run with its sample (the search's phases compare failing candidates' PSNRs, and keep
            # the copies for the end)
            ok = candidate.path is not None and check(candidate, first, pairs=True)
            if not any(candidate is g for g in gated):
                gated.append(candidate)
            if ok:
                passing[tuple(left)] = candidate
            elif fresh and candidate.result is not None:
                stopped = (candidate.result.details or {}).get("stopped_at")
                if stopped:  # the sample, or the sample whose copy, it failed on
                    first = fallback.move_to_front(first, stopped["sample"])
            return ok

        show(f"{p.file}: pruning the {len(layers)} float convolution(s), most MACs first, at most "
             f"{options.fallback_prune_gates} candidate(s)")
        left, tried = fallback.prune(layers, order, passes, options.fallback_prune_gates)
        smallest = passing.get(tuple(left), start)
        removed = [n for n in layers if n not in left]
        prune_record.update({"from_phase": start.phase, "from_layers": len(layers),
                             "from_inputs_float": start.inputs_float, "candidates": tried,
                             "max_candidates": options.fallback_prune_gates, "quantized_again": removed})
        show(f"{p.file}: " + (f"{len(removed)} of {len(layers)} float convolution(s) quantized again, "
                              f"{len(left)} left float" if removed else "no float convolution could be quantized again")
             + f" ({tried} candidate(s))")
        return smallest

    def grouped(gate_it: bool = True):
        """Every convolution quantized, the inputs of the most sensitive ones split into channel groups with a
        run-time grid each (phase :data:`export.fallback.GROUPS_PHASE`): the candidate, if it passes (with
        ``gate_it`` false, only converted: the file phase-6 candidates start from). Sets ``group_state["plan"]``
        where the candidate was made. Made once, gated once: a seed's grouped candidate that failed is not gated
        again by the file's own search, which goes on to phase 6."""
        made_already = built.get(("input groups",))
        if made_already is not None:
            if not gate_it or made_already.path is None:  # could not be made for the seed: not again
                return None
            if made_already.result is None:  # converted for a seed's phase-6 candidate, not judged yet
                check(made_already)
                gated.append(made_already)
            return made_already if made_already.result.passed else None
        plan, ranges_source = group_plan(p.shape, [n for n, _ in ranking])
        if not plan:
            return None
        job = job_for(p, mod, {"input_groups": plan}, suffix=f"p{fallback.GROUPS_PHASE}k{len(plan)}-")
        show(f"{p.file}: converting a candidate with every convolution int8, the inputs of the {len(plan)} most "
             f"sensitive split into up to {options.input_groups} channel groups")
        res = backends.convert_all(mod, [job], progress=show, stages=log)[job.key]
        candidate = fallback.Candidate(len(plan), res.path, dict(res.details), conversion=res,
                                       phase=fallback.GROUPS_PHASE)
        built[("input groups",)] = candidate
        group_record.update({"groups": options.input_groups, "layers": options.input_group_layers,
                             "channels": {name: [len(g) for g in groups] for name, groups in plan.items()},
                             "ranges_measured_by": ranges_source})
        group_record.update(res.details.get("input_groups") or {})  # what the backend could not do to its filters
        if res.path is None:
            group_record["error"] = res.error
            show(f"{p.file}: the input-grouped candidate could not be made ({res.error})")
            return None
        group_state["plan"] = plan
        if not gate_it:
            return None
        check(candidate)
        gated.append(candidate)
        return candidate if candidate.result.passed else None

    def grouped_float(phase_one):
        """The input-grouped file with the first k of the first phase's layers float, the fewest that pass
        (phase :data:`export.fallback.GROUPED_FLOAT_PHASE`): the candidate, or None."""
        phase = fallback.Phase(fallback.GROUPED_FLOAT_PHASE, list(phase_one.layers), False)
        show(f"{p.file}: the input-grouped candidate with up to {phase.size} of the first phase's layers float")
        found, tried = fallback.search(fallback.search_order(phase.size), build_for(phase), check)
        gated.extend(c for c in tried if not any(c is g for g in gated))
        return found

    def seeded():
        """The seed's layers (another I/O signature's passing set) as the one candidate of phase 0; or, where the
        seed passed with input channel groups, the input-grouped candidate (phase 5), with the seed's layers float
        where it kept some (phase 6: the grouped file is converted first, unjudged, as those candidates start from
        it). None when that candidate fails or cannot be made: the file's own search follows (its phase 5 gates
        the grouped file only if no candidate of the seed did, its phase 6 starts from it)."""
        if seed.input_groups and group_plan is None:  # an earlier export's, made with input groups this run has not
            show(f"{p.file}: {seed.source} passed with its inputs in channel groups, which this file does not use")
            return None
        if seed.input_groups and not seed.layers:
            show(f"{p.file}: first the input-grouped candidate, as {seed.source} passed with")
            return grouped()
        if seed.input_groups:  # the grouped file first, unjudged: its candidates start from it
            show(f"{p.file}: first the input-grouped candidate with the {len(seed.layers)} layer(s) {seed.source} "
                 "passed with float")
            grouped(gate_it=False)
            if "plan" not in group_state:  # the grouped file could not be made: this file's own search
                return None
            phase = fallback.Phase(fallback.GROUPED_FLOAT_PHASE, fallback.seed_phase(seed).layers, False)
        else:
            phase = fallback.seed_phase(seed)
            show(f"{p.file}: first the {len(seed.layers)} layer(s) {seed.source} keeps float"
                 + (" with their inputs" if seed.inputs_float else ""))
        (candidate,) = build_for(phase)([phase.size]).values()
        check(candidate)
        gated.append(candidate)
        return candidate if candidate.result.passed else None

    winner, gated = None, []
    first_record: Dict[str, object] = {}
    group_record: Dict[str, object] = {}
    group_state: Dict[str, object] = {}  # "plan": the input channel groups of this file's grouped candidates
    phase_one = None  # the first phase, whose layers phase 6 keeps float in the grouped file
    prune_record: Dict[str, object] = {}
    # (layers kept float, with their inputs) -> the simulated hole PSNR of that candidate, where simulated
    predictions: Dict[tuple, float] = {}
    ranking = list(seed.ranking) if seed is not None else []
    limit = min(options.fallback_limit, len(ranking) or options.fallback_limit)
    macs = {layer["name"]: layer["macs"] for layer in conv_layers(sensitivity.generator, *p.shape)}
    try:
        winner = seeded() if seed is not None else None
        todo, rest, last = [], None, []
        if winner is None and pure_cut_short:
            # gated until its first failing sample for a seed that did not pass (or, where the file of its kind that
            # was to leave one failed, never came): the search ranks on every sample the pure file fails
            show(f"{p.file}: gating the pure file on every sample for its own search")
            pure_result = gate(p, mod, pure.path, every_sample=True)
            samples = fallback.failing_samples(pure_result, limit_db)
            sensitivity.expect(p.shape, rounding, samples)
        if winner is None:
            with stage("sensitivity"):
                ranking = [(n, db) for n, db in sensitivity.ranking(p.shape, rounding, samples) if n not in unrounded]
            limit = min(options.fallback_limit, len(ranking))
            show(f"{p.file}: most sensitive layers: " + ", ".join(f"{n} {db:.1f} dB" for n, db in ranking[:5]))
            with_inputs = p.precision in getattr(mod, "FALLBACK_INPUT_PRECISIONS", ())
            phases = fallback.phases(ranking, macs, limit, with_inputs)
            phase_one = next((ph for ph in phases if ph.number == 1), None)
            todo, last = first_or_last([ph for ph in phases if ph.number == 1])
            rest = [ph for ph in phases if ph.number != 1]
        while todo or rest is not None:
            if not todo:
                # nothing within the MAC budget passed: every convolution int8, inputs in channel groups, before
                # any phase that keeps more float
                if group_plan is not None:
                    winner = grouped()
                    if winner is None and "plan" in group_state and phase_one is not None:
                        winner = grouped_float(phase_one)
                    if winner is not None:
                        break
                todo, rest = then(rest) + last, None
                branch_record["order"] = [ph.number for ph in todo]
                continue
            phase = todo.pop(0)
            if phase.number == 2:
                show(f"{p.file}: " + ("" if last else f"no candidate within {fallback.FLOAT_MAC_BUDGET:.0%} of the MACs "
                                                        "passed; ")
                     + f"keeping the first {len(phase.layers)} ranked layers float whatever their MACs"
                     + (", with the convolutions producing their inputs" if phase.inputs_float else ""))
            elif phase.number == fallback.BRANCH_PHASE:
                show(f"{p.file}: keeping whole branches float, most costly first: "
                     + ", ".join(f"{b} ({len(layers)} layers)" for b, _, layers in phase.branches))
            if phase.number == fallback.BRANCH_PHASE and phase.size > 1:
                winner, phase = alone_first(phase)
                if winner is not None:
                    break
            winner, tried = fallback.search(fallback.search_order(phase.size), build_for(phase), check)
            gated += [c for c in tried if not any(c is g for g in gated)]  # once, in the phase that built it
            if winner is not None:
                break
        if winner is None:
            best = max((c for c in gated if c.result is not None), key=lambda c: c.result.hole_psnr_db, default=None)
            failures[p.file] = fallback.limit_message(p.file, p.precision, limit, ranking, best, branch_phase,
                                                      options.fallback_branch_limit)
            show(f"{p.file}: FAILED ({failures[p.file]})")
            return
        # a file on LiteRT's reference kernels (int16x8) is not pruned: its gate takes minutes a sample
        reference = p.fmt == "tflite" and tflite.reference_kernel_convs(pure.path) > 0
        found = winner
        # phase 6's layers are the fewest of the first phase's order already, and pruning's candidates are not grouped
        if options.fallback_prune_gates and winner.phase not in (fallback.SEED_PHASE, *fallback.GROUPED_PHASES) \
                and not reference:
            with stage("pruning"):
                winner = pruned(winner)
        t0 = time.time()
        with stage("price"):
            # the other I/O signature's file of this run timed it, or an earlier export's on a machine like this one
            if seed is not None and seed.price is not None and fallback.same_float(winner, seed):
                price = fallback.shared_price(pure.path, winner.path, seed.price, seed.source)
            else:
                price = fallback.price(pure.path, winner.path, options.threads, p.fmt, measure,
                                       reference_kernels=reference)
        show(f"{p.file}: priced against the pure file ({time.time() - t0:.1f}s"
             + (f"; the latency ratio of {seed.source}" if "latency_ratio_of" in price else "") + ")")
        snr = dict(ranking)
        kept = [{"layer": n, "snr_db": round(snr[n], 2)} for n in winner.layers]
        if found.phase == fallback.BRANCH_PHASE:
            kept_layers = set(winner.layers)
            branch_record["kept_float"] = [b for b, _, layers in branch_phase.branches if set(layers) <= kept_layers]
        elif winner.phase == fallback.SEED_PHASE and seed.branches_kept_float:
            branch_record["kept_float"] = list(seed.branches_kept_float)
        if seeds is not None and seed_key not in seeds:  # the first file of its kind in this run
            seeds[seed_key] = fallback.Seed(p.file, list(winner.layers), winner.inputs_float, tuple(ranking),
                                            branch_record.get("kept_float"),
                                            input_groups=winner.phase in fallback.GROUPED_PHASES,
                                            price=price if price.get("latency_ratio") is not None else None)
        record = {"fallback": {
            "layers_kept_float": kept, "inputs_kept_float": winner.inputs_float, "limit": limit,
            "float_mac_budget": fallback.FLOAT_MAC_BUDGET, "ranked_on_samples": samples,
            "sensitivity_rounding": list(rounding),
            "ranking": [{"layer": n, "snr_db": round(db, 2)} for n, db in ranking],
            "pure_file": {"hole_psnr_db": pure_result.hole_psnr_db, "note": pure_result.note,
                          "samples": pure_result.samples,
                          **({"stopped_at": pure_result.details["stopped_at"]}
                             if "stopped_at" in (pure_result.details or {}) else {})},
            "phase": winner.phase,
            **({"seeded_from": seed.file} if seed is not None else {}),
            **({"seeded_from_earlier_export": dict(seed.earlier)} if seed is not None and seed.earlier else {}),
            "search": [{"phase": c.phase, "layers": len(c.layers), "inputs_float": c.inputs_float,
                        **({"branches": c.k} if c.phase == fallback.BRANCH_PHASE else {}),
                        **({"grouped_layers": c.k} if c.phase == fallback.GROUPS_PHASE else
                           {"grouped_layers": len(group_state["plan"])} if c.phase == fallback.GROUPED_FLOAT_PHASE
                           else {}),
                        "hole_psnr_db": c.result.hole_psnr_db, "samples": c.result.samples,
                        "passed": c.result.passed,
                        **({"predicted_hole_psnr_db": round(predictions[(tuple(c.layers), c.inputs_float)], 2)}
                           if (tuple(c.layers), c.inputs_float) in predictions
                           and c.phase != fallback.GROUPED_FLOAT_PHASE else {})}
                       for c in gated if c.result is not None],
            **first_record,
            **({"input_groups": group_record} if group_record else {}),
            **({"branches": branch_record} if branch_record else {}),
            **({"pruning": prune_record} if prune_record else {}),
            "price": price, **(winner.details.get("fallback") or {})}}
        accept(p, mod, winner.conversion, winner.result, record)
    finally:
        for c in built.values():
            if c.path is not None and c is not winner:
                _remove(Path(c.path))
