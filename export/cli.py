"""``gmcnn-mobile export``: phone artifacts, each gated on parity with PyTorch, plus DIR/manifest.json."""
from __future__ import annotations

from pathlib import Path

from runtime_py.cli import HelpFormatter, comma_list, int_at_least, keyword_or, positive_float, shape_list

from .options import (ONNX2TF_VALIDATIONS, PAD_MODES, RANGE_METHODS, UPSAMPLE_MODES, WEIGHT_ROUNDINGS, ExportOptions,
                      default_of, help_of)

DEFAULT_SHAPES = ",".join(f"{rows}x{cols}" for rows, cols in default_of("shapes"))
DEFAULT_FORMATS = "tflite,coreml"
DEFAULT_IOS = ",".join(default_of("ios"))
ON_OFF = ("on", "off")


def _switched_off(name: str) -> str:
    """Help of a flag that turns off the option ``name`` (on by default)."""
    assert default_of(name) is True
    return f"switch off: {help_of(name)}"


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export TFLite (and Core ML) artifacts, check each against PyTorch, write DIR/manifest.json",
        formatter_class=HelpFormatter,
        description=(
            "Convert a GMCNN checkpoint to fixed-shape phone artifacts. Every artifact runs on held-out "
            "photos against PyTorch fp32 and is written only if it passes the tolerance of its precision "
            "(docs/TOLERANCES.md). Re-running with unchanged inputs reuses the files."
        ),
    )
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint (.safetensors, TF checkpoint, .pth); default: the shipped default model")
    p.add_argument("--out", type=Path, required=True, help="output folder (artifacts + manifest.json)")
    p.add_argument("--shapes", type=shape_list, default=DEFAULT_SHAPES, help=help_of("shapes"))
    p.add_argument("--formats", type=comma_list, default=None,
                   help=f"comma-separated formats (default: {DEFAULT_FORMATS}, skipping a format whose backend is not "
                        "available or that makes none of --precisions; a format named here that makes none of them "
                        "is refused)")
    p.add_argument("--precisions", type=keyword_or("all", comma_list), default="all",
                   help="comma-separated precisions, or 'all': each format's default set (tflite: fp32,fp16,"
                        "int8-dynamic,int8; coreml: fp16,w8); tflite int16x8 and coreml palettized, w8a8 only by name")
    p.add_argument("--io", type=comma_list, default=DEFAULT_IOS, help=help_of("ios"))
    p.add_argument("--calibration", type=Path, default=default_of("calibration"), help=help_of("calibration"))
    p.add_argument("--holdout", type=Path, default=default_of("holdout"), help=help_of("holdout"))
    p.add_argument("--threads", type=int_at_least(1), default=default_of("threads"), help=help_of("threads"))
    p.add_argument("--pad-mode", choices=PAD_MODES, default=default_of("pad_mode"), help=help_of("pad_mode"))
    p.add_argument("--upsample-mode", choices=UPSAMPLE_MODES, default=default_of("upsample_mode"),
                   help=help_of("upsample_mode"))
    p.add_argument("--no-int8-tail", action="store_true", help=_switched_off("int8_tail"))
    p.add_argument("--no-bias-correction", action="store_true", help=_switched_off("bias_correction"))
    p.add_argument("--range-method", choices=RANGE_METHODS, default=default_of("range_method"),
                   help=help_of("range_method"))
    p.add_argument("--weight-rounding", choices=WEIGHT_ROUNDINGS, default=default_of("weight_rounding"),
                   help=help_of("weight_rounding"))
    p.add_argument("--onnx2tf-validation", choices=ONNX2TF_VALIDATIONS, default=default_of("onnx2tf_validation"),
                   help=help_of("onnx2tf_validation"))
    p.add_argument("--quant-fallback", choices=ON_OFF, default=ON_OFF[not default_of("quant_fallback")],
                   help=help_of("quant_fallback"))
    p.add_argument("--quant-fallback-limit", type=int_at_least(1), default=default_of("fallback_limit"),
                   metavar="LAYERS", help=help_of("fallback_limit"))
    p.add_argument("--quant-fallback-branch-limit", type=int_at_least(1), default=default_of("fallback_branch_limit"),
                   metavar="LAYERS", help=help_of("fallback_branch_limit"))
    p.add_argument("--quant-fallback-prune", type=int_at_least(0), default=default_of("fallback_prune_gates"),
                   metavar="CANDIDATES", help=help_of("fallback_prune_gates"))
    p.add_argument("--quant-fallback-seeds", default=default_of("fallback_seeds"), metavar="auto|none|DIR",
                   help=help_of("fallback_seeds"))
    p.add_argument("--input-groups", type=int_at_least(1), default=default_of("input_groups"), metavar="GROUPS",
                   help=help_of("input_groups"))
    p.add_argument("--input-group-layers", type=int_at_least(1), default=default_of("input_group_layers"),
                   metavar="LAYERS", help=help_of("input_group_layers"))
    p.add_argument("--min-hole-psnr", action="append", default=None, metavar="PRECISION=DB",
                   help="lower (or raise) the parity gate's hole-PSNR limit of a quantized TFLite precision "
                        "(int8, int8-dynamic), e.g. int8=30, for a model whose activations int8 cannot hold as "
                        "well as the measured default assumes; repeatable; the limit used is recorded per artifact "
                        "in the manifest (default: docs/TOLERANCES.md)")
    p.add_argument("--memory-budget-gib", type=positive_float, default=default_of("memory_budget_gib"),
                   metavar="GIB", help=help_of("memory_budget_gib"))
    p.add_argument("--no-cache", action="store_true", help=_switched_off("use_cache"))
    p.add_argument("--keep-work", action="store_true", default=default_of("keep_work"), help=help_of("keep_work"))
    p.add_argument("--quiet", action="store_true", help=_switched_off("progress"))
    p.set_defaults(func=cmd_export)

    s = sub.add_parser(
        "fallback-seeds",
        help="keep the layers an export's quantized files kept float in a seed file beside the checkpoint",
        formatter_class=HelpFormatter,
        description=(
            "Write the layers each quantized file of an export kept float (per format, shape and precision) to "
            "a seed file. An export of a checkpoint with STEM.fallback-seeds.json beside it gates those layers "
            "first, before any search of its own, when its folder holds no earlier manifest (a fresh clone, a CI "
            "runner): commit the file beside a checkpoint you export again after each retraining."
        ),
    )
    s.add_argument("export_dir", type=Path, metavar="EXPORT", help="export folder (or its manifest.json)")
    s.add_argument("--out", type=Path, default=None,
                   help="seed file to write (default: STEM.fallback-seeds.json beside the checkpoint the export "
                        "was made from)")
    s.set_defaults(func=cmd_fallback_seeds)


GATE_OVERRIDABLE = ("int8-dynamic", "int8")


def hole_psnr_overrides(items, ios):
    """``["int8=30", ...]`` -> parity tolerance rows keyed by (precision, io): the default row with
    its hole-PSNR limit replaced, so the other limits (known pixels unchanged) still hold."""
    from runtime_py.errors import UserError

    from . import parity

    rows = {}
    for item in items:
        precision, sep, value = item.partition("=")
        precision = precision.strip()
        try:
            db = float(value)
        except ValueError:
            db = None
        if not sep or db is None or not 0 < db <= parity.PSNR_IDENTICAL:
            raise UserError(f"--min-hole-psnr {item!r}: expected PRECISION=DB with DB in (0, 100], e.g. int8=30")
        if precision not in GATE_OVERRIDABLE:
            raise UserError(f"--min-hole-psnr {item!r}: only {', '.join(GATE_OVERRIDABLE)} can be changed "
                            "(float files are gated on exactness, see docs/TOLERANCES.md)")
        for io in ios:
            row = parity.tolerance_for(precision, io)
            row["min_hole_psnr_db"] = db
            rows[(precision, io)] = row
    return rows


def options_from_args(args, formats, precisions) -> ExportOptions:
    """The export's options from the parsed flags (``formats`` and ``precisions`` as resolved by
    :func:`cmd_export`; None: every available format, every precision)."""
    return ExportOptions(
        shapes=args.shapes, formats=formats, precisions=precisions, ios=args.io, calibration=args.calibration,
        holdout=args.holdout, threads=args.threads, pad_mode=args.pad_mode, upsample_mode=args.upsample_mode,
        int8_tail=not args.no_int8_tail, bias_correction=not args.no_bias_correction,
        range_method=args.range_method, weight_rounding=args.weight_rounding,
        onnx2tf_validation=args.onnx2tf_validation,
        quant_fallback=args.quant_fallback == "on", fallback_limit=args.quant_fallback_limit,
        fallback_branch_limit=args.quant_fallback_branch_limit, fallback_prune_gates=args.quant_fallback_prune,
        fallback_seeds=args.quant_fallback_seeds,
        input_groups=args.input_groups, input_group_layers=args.input_group_layers,
        tolerances=hole_psnr_overrides(args.min_hole_psnr or [], args.io) or None,
        use_cache=not args.no_cache, keep_work=args.keep_work, memory_budget_gib=args.memory_budget_gib,
        progress=not args.quiet)


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_export(args) -> int:
    import signal

    from runtime_py.errors import UserError

    # a kill (SIGTERM) unwinds like Ctrl-C, so temporary files are removed on the way out
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    from . import backends
    from .api import export_artifacts

    formats = args.formats or comma_list(DEFAULT_FORMATS)
    skipped = []
    if args.formats is None:
        available = set(backends.available_formats())
        skipped = [f"{f} (backend not available)" for f in formats if f not in available]
        formats = [f for f in formats if f in available]
        if not formats:
            raise UserError("no export format is available")
    precisions = None if args.precisions == "all" else args.precisions
    if args.formats is None and precisions is not None:
        # the default formats are "whatever can make the asked precisions": one that makes none of them is skipped
        # (a format named in --formats that makes none of them is refused by export_artifacts)
        makes = {f: backends.get_backend(f).PRECISIONS for f in formats}
        unmade = [f for f in formats if not set(precisions) & set(makes[f])]
        if len(unmade) < len(formats):
            skipped += [f"{f} (makes no {'/'.join(precisions)})" for f in unmade]
            formats = [f for f in formats if f not in unmade]
    # the fallback's price is timed by the function the gmcnn-mobile command sets (benchmarks' measurement)
    manifest = export_artifacts(args.checkpoint, args.out, options=options_from_args(args, formats, precisions),
                                measure=getattr(args, "measure_file", None))
    print(f"{'file':<52} {'MB':>7} {'max abs':>9} {'hole dB':>8}  executor")
    for a in manifest.artifacts:
        p = a.parity
        max_abs = f"{p.max_abs:.2g}" if p and p.max_abs is not None else "-"
        hole = f"{p.hole_psnr_db:.1f}" if p and p.hole_psnr_db is not None else "-"
        print(f"{a.file:<52} {a.bytes / 1e6:7.2f} {max_abs:>9} {hole:>8}  {p.executor if p else '-'}")
    print(f"wrote {Path(args.out) / 'manifest.json'} ({len(manifest.artifacts)} artifacts, "
          f"{manifest.export.get('seconds', 0):.1f}s)")
    if skipped:
        print(f"skipped format(s): {', '.join(skipped)}")
    return 0


def cmd_fallback_seeds(args) -> int:
    from runtime_py.errors import UserError
    from runtime_py.manifest import load_manifest

    from .fallback_seeds import SUFFIX, seed_file_name, write_seed_file

    manifest = load_manifest(args.export_dir)
    out = args.out
    if out is None:
        made_from = Path(str((manifest.checkpoint or {}).get("path") or ""))
        if not str(made_from) or not made_from.suffix:
            raise UserError(f"{args.export_dir}: the export was not made from a checkpoint file; name the seed file "
                            "with --out")
        out = seed_file_name(made_from)
    elif not out.name.endswith(SUFFIX):
        raise UserError(f"--out: a seed file's name ends with {SUFFIX} (the export reads it by that name)")
    written = write_seed_file(manifest, out)
    print(f"wrote {written}")
    return 0
