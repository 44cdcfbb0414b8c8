"""The benchmark run: configuration from the CLI, the three sections, the report."""
from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

from runtime_py.errors import UserError
from runtime_py.machine import cpu_name, cpu_simd_flags, package_version
from runtime_py.pipeline import MODES

from .merge import quality_cases_missing, quality_missing_line


def contention_note(load_avg_start: float, cpu_count: int) -> str:
    """The report's sentence on how busy the machine was, from the load average at the start."""
    tail = ("each measurement records the 1-minute load average before and after it (a measurement's own "
            "threads raise it by about their number).")
    if load_avg_start >= 0.5:
        return (f"The 1-minute load average was {load_avg_start:.1f} when the run started: other work shared the "
                f"{cpu_count} cores, so times may be inflated and noisier than on an idle machine; " + tail)
    return f"The machine was idle when the run started (1-minute load average {load_avg_start:.2f}); " + tail


def _auto(value, quick: bool, normal, quick_default):
    """An ``auto`` flag's value: the parsed value, else the default of a normal or a --quick run."""
    return value if value != "auto" else (quick_default if quick else normal)


def _all(value):
    """An ``all`` flag's value: None (no selection), else the parsed list."""
    return None if value == "all" else value


@dataclass
class BenchConfig:
    artifacts: Path
    out: Path
    photos: List[Path]
    photo_sources: List[str]
    quick: bool
    threads: List[int]
    runs: int
    warmup: int
    sections: List[str]
    shapes: Optional[List[str]]
    precisions: Optional[List[str]]
    ios: Optional[List[str]]
    checkpoint: Optional[Path]
    xnnpack_off: bool
    pipeline_precision: str
    pipeline_threads: int
    quality_per_cell: int
    quality_photos: Optional[List[str]]
    quality_modes: List[str]
    patchmatch: bool
    sgemm_n: int
    update_readme: Optional[Path]
    merge: bool = False
    pipeline_configs: Optional[List[tuple]] = None
    no_classical: bool = False
    quality_sizes: Optional[List[str]] = None
    quality_kinds: Optional[List[str]] = None
    quality_precisions: Optional[List[str]] = None
    time_budget_min: float = 0.0
    deadline: Optional[float] = None  # time.monotonic() after which no new measurement starts
    command: str = ""
    notes: List[str] = field(default_factory=list)

    @classmethod
    def from_args(cls, args) -> "BenchConfig":
        """The run from ``gmcnn-mobile bench``'s parsed flags (benchmarks.cli types them; ``auto`` and
        ``all`` are resolved here); the folders and photos are checked before any work."""
        from .photos import default_photo_dirs, find_photos

        from runtime_py.imageio import check_output_dir

        quick = bool(args.quick)
        artifacts = Path(args.artifacts)
        check_output_dir(args.out, "--out folder")
        if not (artifacts / "manifest.json").is_file():
            raise UserError(f"{artifacts}: no export manifest here (run 'gmcnn-mobile export --out {artifacts}' first)")
        sections = list(args.sections)
        threads = _auto(args.threads, quick, [1, 2], [2])
        sources = [str(p) for p in args.photos] if args.photos else [str(d) for d in default_photo_dirs()]
        for s in args.photos or []:
            if not Path(s).exists():
                raise UserError(f"{s}: photo folder or file not found")
        photos = find_photos(sources)
        if ("pipeline" in sections or "quality" in sections) and not photos:
            raise UserError("no photos found for the pipeline and quality sections"
                            + (f" in {', '.join(sources)}" if sources else "")
                            + "; pass --photos DIR or --sections latency")
        shapes = _all(args.shapes)
        return cls(
            artifacts=artifacts, out=Path(args.out), photos=photos, photo_sources=sources, quick=quick,
            threads=threads, runs=_auto(args.runs, quick, 10, 2), warmup=_auto(args.warmup, quick, 2, 1),
            sections=sections, shapes=None if shapes is None else [f"{r}x{c}" for r, c in shapes],
            precisions=_all(args.precisions), ios=_all(_auto(args.io, quick, "all", ["tensor"])),
            checkpoint=args.checkpoint, xnnpack_off=not args.no_xnnpack_off,
            pipeline_precision=args.pipeline_precision,
            pipeline_threads=args.pipeline_threads or max(threads), quality_per_cell=args.quality_per_cell,
            quality_photos=_all(args.quality_photos), quality_sizes=args.quality_sizes,
            quality_kinds=args.quality_kinds, pipeline_configs=args.pipeline_configs,
            no_classical=bool(args.no_classical), quality_precisions=_all(args.quality_precisions),
            quality_modes=_auto(args.quality_modes, quick, list(MODES), ["baseline"]), patchmatch=not args.no_patchmatch,
            sgemm_n=args.sgemm_n or (1024 if quick else 3072), update_readme=args.update_readme,
            merge=bool(args.merge), notes=list(args.note or []), time_budget_min=float(args.time_budget or 0),
            command="gmcnn-mobile " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"]
            else "gmcnn-mobile bench" + _args_text(args))


def _args_text(args) -> str:
    parts = []
    for flag in ("artifacts", "out"):
        parts.append(f" --{flag} {getattr(args, flag)}")
    if args.quick:
        parts.append(" --quick")
    return "".join(parts)


# ----------------------------------------------------------------------------- meta

def machine_meta(cfg: BenchConfig) -> dict:
    return {
        "command": cfg.command, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()[0],
        "platform": platform.platform(), "python": platform.python_version(),
        "versions": {d: package_version(d) for d in ("ai-edge-litert", "onnxruntime", "torch", "numpy",
                                                      "opencv-python", "pypatchmatch")},
        "contention_note": contention_note(os.getloadavg()[0], os.cpu_count() or 1), "artifacts": str(cfg.artifacts), "threads": cfg.threads,
        "runs": cfg.runs, "warmup": cfg.warmup, "quick": cfg.quick, "sections": cfg.sections,
        "sgemm_n": cfg.sgemm_n, "photo_sources": cfg.photo_sources, "notes": list(cfg.notes), "skipped": [],
        "cpu_simd": cpu_simd_flags(),
    }


def section_machine(meta: dict, threads=None) -> dict:
    """What a section's tables need to say where they were measured (kept with the section, so that a merged
    report names each section's own machine, not the last merged run's); ``threads``: the section's thread
    counts (latency: ``--threads``; pipeline and quality: ``--pipeline-threads``), default the run's."""
    keys = ("started", "cpu", "cpu_count", "cpu_simd", "load_avg_start")
    return {**{k: meta.get(k) for k in keys}, "threads": list(threads if threads is not None else meta.get("threads", [])),
            "litert": (meta.get("versions") or {}).get("ai-edge-litert")}


# ----------------------------------------------------------------------------- sections

def model_tag(manifest) -> str:
    """``variant-cN`` of the network behind the artifacts: from the manifest's checkpoint metadata,
    else from the export's file names (``gmcnn_<variant>_c<N>_...``), else empty."""
    import re

    meta = (manifest.checkpoint or {}).get("meta") or {}
    if meta.get("variant") and meta.get("cnum"):
        return f"{meta['variant']}-c{meta['cnum']}"
    for a in manifest.artifacts:
        m = re.search(r"_(tf|torch)_c(\d+)_", a.file)
        if m:
            return f"{m.group(1)}-c{m.group(2)}"
    return ""


def out_of_time(cfg: BenchConfig) -> bool:
    return cfg.deadline is not None and time.monotonic() > cfg.deadline


def worker_timeout(cfg: BenchConfig) -> float:
    """Per-worker limit: 30 min, or the budget left plus 2 min of grace."""
    if cfg.deadline is None:
        return 1800.0
    return max(60.0, min(1800.0, cfg.deadline - time.monotonic() + 120.0))


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True, leave=True)


def latency_shapes(cfg: BenchConfig, manifest) -> List[str]:
    """The TFLite shapes the latency section times ("ROWSxCOLS", smallest first)."""
    tfl = [a for a in manifest.artifacts if a.format == "tflite"]
    shapes = sorted({f"{a.height}x{a.width}" for a in tfl}, key=lambda s: int(s.split("x")[0]))
    if cfg.shapes:
        return [s for s in shapes if s in cfg.shapes]
    return shapes[:1] if cfg.quick else shapes


def check_timed_artifacts(cfg: BenchConfig, manifest) -> None:
    """Refuse, before any work or output, a TFLite file the latency section would time that is not
    the one the manifest describes (latency is measured only on described files)."""
    from runtime_py.manifest import check_artifact

    if "latency" not in cfg.sections:
        return
    shapes = latency_shapes(cfg, manifest)
    for a in manifest.artifacts:
        if (a.format == "tflite" and f"{a.height}x{a.width}" in shapes
                and (not cfg.precisions or a.precision in cfg.precisions) and (not cfg.ios or a.io in cfg.ios)):
            check_artifact(Path(cfg.artifacts) / a.file, a)


def plan_roofline(cfg: BenchConfig, checkpoint: Optional[Path], shapes: List[str], cache: Path, meta: dict) -> List[dict]:
    """Worker specs for XNNPACK's speed on the checkpoint's dominant convolutions at every latency shape
    (benchmarks.roofline); the files are built once into the run's cache. Without a checkpoint or a
    TFLite converter there is no ceiling, and the report says so."""
    from .roofline import build_conv_files, dominant_convs, roofline_specs

    if checkpoint is None:
        meta["skipped"].append("XNNPACK convolution ceiling: no checkpoint to take the dominant convolutions from")
        return []
    from models import load_generator
    from models.gmcnn import conv_layers

    gen = load_generator(checkpoint)
    convs = {key: dominant_convs(conv_layers(gen, *(int(v) for v in key.split("x")))) for key in shapes}
    try:  # every shape's files in one child process
        files = build_conv_files(list(dict.fromkeys(c for cs in convs.values() for c in cs)), cache / "roofline")
    except (RuntimeError, OSError) as exc:
        meta["skipped"].append(f"XNNPACK convolution ceiling: {exc}")
        return []
    specs = []
    for key, cs in convs.items():
        specs += roofline_specs(key, {(c, p): f for (c, p), f in files.items() if c in cs}, cfg.threads, cfg.warmup,
                                cfg.runs)
    return specs


def run_latency(cfg: BenchConfig, manifest, meta: dict, cache: Path, logs: Path) -> dict:
    from .latency import android_commands, derive, plan_latency
    from .references import export_onnx, model_macs, resolve_checkpoint
    from .spawn import run_in_subprocess

    checkpoint = resolve_checkpoint(manifest, cfg.artifacts, cfg.checkpoint)
    if cfg.checkpoint is not None and checkpoint is None:
        raise UserError(f"{cfg.checkpoint}: checkpoint not found")
    shapes = latency_shapes(cfg, manifest)
    onnx_files: Dict[str, Path] = {}
    macs: Dict[str, int] = {}
    model = ""
    if checkpoint is None:
        meta["skipped"].append("PyTorch and ONNX Runtime references: no checkpoint found (pass --checkpoint)")
    else:
        meta["checkpoint"] = str(checkpoint)
        from models.checkpoint import read_project_metadata

        try:
            m = read_project_metadata(checkpoint)
            meta["checkpoint_meta"] = f"variant {m.get('variant')}, cnum {m.get('cnum')}"
            model = f"{m.get('variant')}-c{m.get('cnum')}"
        except Exception:
            pass
        for s in shapes:
            h, w = (int(v) for v in s.split("x"))
            macs[f"{model} {s}" if model else s] = model_macs(checkpoint, (h, w))
            try:
                onnx_files[s] = export_onnx(checkpoint, (h, w), cache)
            except Exception as exc:
                meta["skipped"].append(f"ONNX Runtime at {s}: ONNX export failed ({type(exc).__name__}: {exc})")
    meta["macs"] = macs
    specs = plan_latency(manifest, cfg.artifacts, cfg.threads, cfg.warmup, cfg.runs, checkpoint, onnx_files,
                         cfg.sgemm_n, shapes=shapes, precisions=cfg.precisions, ios=cfg.ios,
                         xnnpack_off=cfg.xnnpack_off, model=model,
                         roofline=plan_roofline(cfg, checkpoint, shapes, cache, meta))
    results = []  # every TFLite file in specs was checked by check_timed_artifacts (same shapes and filters)
    bar = _progress(len(specs), "latency")
    for spec in specs:
        bar.set_postfix_str(spec["label"])
        if out_of_time(cfg):
            meta["skipped"].append(f"latency {spec['label']}: --time-budget spent before it started")
        else:
            results.append(run_in_subprocess(spec, logs, timeout_s=worker_timeout(cfg)))
        bar.update(1)
    bar.close()
    out = derive(results, macs)
    out["raw"] = results
    failed = [r["spec"]["label"] for r in results if not r.get("ok")]
    if failed:
        meta["notes"].append(f"{len(failed)} latency measurement(s) failed: {', '.join(failed)} (see logs/)")
    coreml = [a for a in manifest.artifacts if a.format == "coreml"]
    if coreml:
        meta["skipped"].append(f"{len(coreml)} Core ML artifact(s): Core ML runs only on macOS/iOS, not on this Linux host")
    return out, android_commands(specs)


def pipeline_photos(cfg: BenchConfig, cache: Path):
    from .photos import describe, ensure_large_photo

    infos = describe(cfg.photos)
    if cfg.quick:
        return infos[:1], []
    notes = []
    big = sorted([p for p in infos if p.megapixels >= 4.0], key=lambda p: -p.megapixels)
    chosen = big[:1] if big else sorted(infos, key=lambda p: -p.megapixels)[:1]
    if not big:
        notes.append(f"no photo of 4 MP or more among the inputs; used the largest, {chosen[0].path.name} "
                     f"({chosen[0].megapixels:.1f} MP)")
    large = ensure_large_photo(infos, cache)
    if large is not None and large.path not in [c.path for c in chosen]:
        if large.upscaled_from:
            notes.append(f"no photo of 12 MP or more was available: {large.path.name} ({large.megapixels:.1f} MP) is "
                         f"a bicubic upscale of the real photo {large.upscaled_from}")
        chosen.append(large)
    return chosen, notes


def run_pipeline(cfg: BenchConfig, manifest, meta: dict, cache: Path, logs: Path) -> dict:
    from .pipeline_cost import CONFIGS, PIPELINE_MASK, plan_pipeline
    from .spawn import run_in_subprocess

    photos, notes = pipeline_photos(cfg, cache)
    # --quick: the cheapest mode and the high-res pass whole vs tiled (shrink's extra runs are left out)
    configs = CONFIGS if not cfg.quick else [c for c in CONFIGS if c in (("baseline", "auto"), ("two-step", "off"),
                                                                         ("two-step", "on"))]
    if cfg.pipeline_configs:
        configs = cfg.pipeline_configs
    tfl = [a for a in manifest.artifacts if a.format == "tflite" and a.io == "tensor"
           and a.precision == cfg.pipeline_precision]
    if not tfl:
        raise UserError(f"{cfg.artifacts}: no TFLite {cfg.pipeline_precision} tensor artifact for the pipeline runs "
                        "(--pipeline-precision)")
    base = min((tuple(a.shape) for a in tfl), key=lambda s: s[0] * s[1])
    if (2 * base[0], 2 * base[1]) not in {tuple(a.shape) for a in tfl}:
        configs = [c for c in configs if c[1] != "off"]
        notes.append(f"no {2 * base[0]}x{2 * base[1]} artifact: the two-step high-res pass runs tiled only")
    specs = plan_pipeline(photos, cfg.artifacts, cfg.pipeline_threads, cfg.pipeline_precision, configs)
    tag = model_tag(manifest)
    rows = []
    bar = _progress(len(specs), "pipeline")
    for spec in specs:
        bar.set_postfix_str(spec["label"])
        if out_of_time(cfg):
            meta["skipped"].append(f"{spec['label']}: --time-budget spent before it started")
            bar.update(1)
            continue
        r = run_in_subprocess(spec, logs, timeout_s=worker_timeout(cfg))
        row = {"model": tag, "photo": Path(spec["photo"]).name, "megapixels": spec["photo_mp"],
               "upscaled_from": spec["upscaled_from"],
               "mode": spec["mode"], "tiles": spec["tiles"], "threads": spec["threads"], "precision": spec["precision"]}
        if r.get("ok"):
            row.update({k: v for k, v in r.items() if k not in ("spec", "ok", "pid")})
            row["peak_rss_mib"] = r["peak_rss"] / 2 ** 20
        else:
            row["error"] = r.get("error", "failed")
        rows.append(row)
        bar.update(1)
    bar.close()
    return {"rows": rows, "mask": dict(PIPELINE_MASK), "threads": cfg.pipeline_threads,
            "precision": cfg.pipeline_precision, "notes": notes}


def run_quality(cfg: BenchConfig, manifest, meta: dict) -> dict:
    import functools

    from runtime_py.engines import open_engines
    from runtime_py.pipeline import Pipeline, PipelineConfig

    from .classical import classical_methods, patchmatch
    from .photos import describe, read_rgb
    from .quality import KINDS, SIZES, BAND_PX, MethodSpec, evaluate, make_cases, resize_method

    notes = []
    tensor_tfl = [a for a in manifest.artifacts if a.format == "tflite" and a.io == "tensor"]
    if not tensor_tfl:
        raise UserError(f"{cfg.artifacts}: the manifest has no TFLite tensor artifacts to score")
    base = min({tuple(a.shape) for a in tensor_tfl}, key=lambda s: s[0] * s[1])
    base_precisions = [p for p in ("fp32", "fp16", "int8-dynamic", "int8")
                       if any(tuple(a.shape) == base and a.precision == p for a in tensor_tfl)]
    mode_precision = "fp32" if "fp32" in base_precisions else base_precisions[0]
    engine_sets = {}

    def engines_for(precision):
        if precision not in engine_sets:
            engine_sets[precision] = open_engines("tflite", artifacts=cfg.artifacts, threads=cfg.pipeline_threads,
                                                  precision=precision)
        return engine_sets[precision]

    def model_method(mode, precision):
        def run(image, mask):
            return Pipeline(engines_for(precision), PipelineConfig(mode=mode)).run(image, mask > 0).image
        return run

    methods = [MethodSpec(f"{m} {mode_precision}", "mode", model_method(m, mode_precision), mode=m,
                          precision=mode_precision) for m in cfg.quality_modes]
    methods += [MethodSpec(f"baseline {p}", "precision", model_method("baseline", p), mode="baseline", precision=p)
                for p in base_precisions if p != mode_precision
                and (cfg.quality_precisions is None or p in cfg.quality_precisions)]
    classical = {} if cfg.no_classical else classical_methods(include_patchmatch=cfg.patchmatch)
    pm_pixels = base[0] * base[1]
    for name, fn in classical.items():
        if name == "patchmatch":
            fn = resize_method(patchmatch, pm_pixels)
            notes.append(f"PatchMatch (pypatchmatch {meta['versions'].get('pypatchmatch')}, patch 5, seed 0) runs at "
                         f"the model's pass-1 resolution ({base[0]}x{base[1]} pixels' worth) and its result is upscaled "
                         f"bicubically into the hole: at full resolution it took 30-115 s per 4 MP photo here.")
        methods.append(MethodSpec(name, "classical", fn))
    if cfg.patchmatch and not cfg.no_classical and "patchmatch" not in classical:
        meta["skipped"].append("PatchMatch: pypatchmatch is not installed (pip install pypatchmatch)")
    if classical:
        notes.append("OpenCV Telea and Navier-Stokes run at full resolution (radius 5 px).")

    chosen = cfg.photos
    if cfg.quality_photos:
        chosen = [p for p in cfg.photos if p.name in cfg.quality_photos]
        missing = sorted(set(cfg.quality_photos) - {p.name for p in chosen})
        if missing or not chosen:
            raise UserError(f"--quality-photos: {', '.join(missing) or 'none'} not among the photos found")
        notes.append(f"Scored on {', '.join(sorted({p.name for p in chosen}))} only (--quality-photos).")
    photo_paths = [str(p) for p in chosen]
    sizes = ("medium",) if cfg.quick and not cfg.quality_sizes else tuple(cfg.quality_sizes or SIZES)
    if any(z not in SIZES for z in sizes):
        raise UserError(f"--quality-sizes takes {','.join(SIZES)}, got {','.join(sizes)}")
    kinds = tuple(cfg.quality_kinds or KINDS)
    if any(k not in KINDS for k in kinds):
        raise UserError(f"--quality-kinds takes {','.join(KINDS)}, got {','.join(kinds)}")
    cases = make_cases(photo_paths, kinds=kinds, sizes=sizes, per_cell=1 if cfg.quick else cfg.quality_per_cell)
    load = functools.lru_cache(maxsize=2)(read_rgb)
    bar = _progress(len(cases) * len(methods), "quality")

    def progress(text):
        bar.set_postfix_str(text)
        bar.update(1)

    try:
        rows = evaluate(cases, methods, load, progress=progress, should_stop=lambda: out_of_time(cfg))
    finally:
        bar.close()
        for e in engine_sets.values():
            e.close()
    tag = model_tag(manifest)
    for r in rows:
        if r["group"] != "classical":
            r["model"] = tag
    done = {(r["photo"], r["kind"], r["size"], r["seed"]) for r in rows}
    planned = [[Path(c.photo).name, c.kind, c.size, c.seed] for c in cases]
    missing = quality_cases_missing({"rows": rows, "planned": planned})
    if missing:
        meta["skipped"].append(quality_missing_line(missing, len(planned)))
    errors = [r for r in rows if "error" in r]
    if errors:
        notes.append(f"{len(errors)} quality run(s) failed, first: {errors[0]['method']}: {errors[0]['error']}")
    return {"rows": rows, "cases": len(done), "planned": planned, "band_px": BAND_PX, "model_shape": list(base),
            "threads": cfg.pipeline_threads, "notes": notes}


def run_bench(cfg: BenchConfig) -> Dict[str, Path]:
    from runtime_py.manifest import load_manifest

    from .report import write_report

    manifest = load_manifest(cfg.artifacts)
    check_timed_artifacts(cfg, manifest)  # before the output folder, the SGEMM peak and the ONNX references
    cfg.out.mkdir(parents=True, exist_ok=True)
    cache, logs = cfg.out / "cache", cfg.out / "logs"
    cache.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    if cfg.time_budget_min > 0:
        cfg.deadline = time.monotonic() + 60.0 * cfg.time_budget_min
    meta = machine_meta(cfg)
    results = {"meta": meta}
    if "latency" in cfg.sections:
        results["latency"], results["android"] = run_latency(cfg, manifest, meta, cache, logs)
    if "pipeline" in cfg.sections:
        results["pipeline"] = run_pipeline(cfg, manifest, meta, cache, logs)
    if "quality" in cfg.sections:
        results["quality"] = run_quality(cfg, manifest, meta)
    meta["wall_s"] = time.perf_counter() - t0
    meta["load_avg_end"] = os.getloadavg()[0]
    source = {"artifacts": str(cfg.artifacts), "checkpoint": meta.get("checkpoint"), "command": cfg.command,
              "started": meta["started"]}
    for section in cfg.sections:
        if isinstance(results.get(section), dict):
            threads = cfg.threads if section == "latency" else [cfg.pipeline_threads]
            results[section]["source"] = dict(source, machine=section_machine(meta, threads),
                                              model_sha256=(manifest.checkpoint or {}).get("sha256"))
    previous = cfg.out / "results.json"
    if cfg.merge and previous.is_file():
        import json

        from .latency import derive
        from .merge import merge_results

        results = merge_results(json.loads(previous.read_text()), results, derive)
    files = write_report(cfg.out, results)
    if cfg.update_readme is not None:
        from .readme import update_readme

        update_readme(cfg.update_readme, results)
        files["README"] = Path(cfg.update_readme)
    return files
